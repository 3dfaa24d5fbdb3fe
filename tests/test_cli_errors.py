"""Bad input through the console script, as a user meets it: one line naming the problem on stderr,
exit status 2, nothing written (no output, no temporary file, no run directory)."""
import os
import resource
import subprocess
import sys

import onnx
import pytest

import sparsegraph as sg
from sparsegraph.models import builtin

SCRIPT = os.path.join(os.path.dirname(sys.executable), "sparsegraph")  # the installed console script


def sparsegraph(*args, cwd, fsize: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return subprocess.run([SCRIPT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=limit if fsize else None, env={**os.environ, **(env or {})})


def one_line_error(r: subprocess.CompletedProcess, command: str, message: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no traceback, no torch log before it
    assert lines[0].startswith(f"sparsegraph {command}: error: "), lines[0]
    assert message in lines[0], lines[0]
    assert "\x1b" not in lines[0]  # no terminal colour codes
    return lines[0]


def listing(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs} | \
        {os.path.relpath(d, folder) for d, _, _ in os.walk(folder)}


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """A Sparse Wide resnet-mini export, and a dense one whose weights live in an external data file."""
    folder = tmp_path_factory.mktemp("onnx_inputs")
    spec = builtin("resnet-mini", widths="8,8,8")
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75).eval()
    sg.export_onnx(wide, spec.example_inputs, folder / "wide.onnx")
    onnx.save(onnx.load(str(folder / "wide.onnx")), str(folder / "ext.onnx"), save_as_external_data=True,
              location="ext.data", size_threshold=0)
    (folder / "ext.data").unlink()
    return folder


@pytest.mark.parametrize("args, command, message", [
    (["rewrite", "resnet-mini", "-o", "/proc/x.sgm"], "rewrite",
     "cannot write /proc/x.sgm: cannot create a file in /proc"),
    (["rewrite", "resnet-mini", "-o", "existing_dir"], "rewrite", "cannot write existing_dir: it is a directory"),
    (["export", "resnet-mini", "-o", "existing_dir.onnx"], "export",
     "cannot write existing_dir.onnx: it is a directory"),
    (["coord-check", "resnet-mini", "-o", "/proc/cc.png"], "coord-check", "cannot write /proc/cc.png"),
    (["train", "resnet-mini", "-o", "notes.txt"], "train", "cannot use notes.txt as a run directory: it is a file"),
    (["train", "resnet-mini", "--checkpoint-interval", "0", "-o", "run"], "train",
     "--checkpoint-interval must be a positive integer, got 0"),
    (["train", "resnet-mini", "--eval-interval", "0", "-o", "run"], "train",
     "--eval-interval must be a positive integer, got 0"),
    (["train", "--recompute", "--fsdp", "-o", "run"], "train", "--recompute is not available with --fsdp"),
    (["train", "--model-option", "n_layr=1", "-o", "run"], "train",
     "built-in 'gpt-mini' takes the options vocab_size, block_size, n_layer, n_head, n_embd, dropout, not n_layr"),
    (["train", "resnet-mini", "--model-option", "widths=a,b", "-o", "run"], "train",
     "built-in 'resnet-mini' option widths='a,b': expected positive integers"),
    (["analyze", "--input-shape", "2,3,64"], "analyze",
     "gpt-mini does not run on its example inputs (int64[2, 3, 64]): ValueError: expected token ids of shape "
     "(batch, sequence)"),
    (["analyze", "gpt-mini", "--input-shape", "1,5000"], "analyze",
     "ValueError: sequence length 5000 is longer than the context of 128 tokens"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args, command, message):
    (tmp_path / "existing_dir").mkdir()
    (tmp_path / "existing_dir.onnx").mkdir()
    (tmp_path / "notes.txt").write_text("notes")
    before = listing(tmp_path)
    one_line_error(sparsegraph(*args, cwd=tmp_path), command, message)
    assert listing(tmp_path) == before


def test_onnx_inputs(onnx_files, tmp_path):
    one_line_error(sparsegraph("lower", onnx_files / "wide.onnx", "--block", "0", "-o", "low.onnx", cwd=tmp_path),
                   "lower", "block must be a positive integer, got 0")
    one_line_error(sparsegraph("analyze", onnx_files / "ext.onnx", cwd=tmp_path), "analyze",
                   "the external data file ext.data of tensor conv1.weight is missing")
    assert listing(tmp_path) == {"."}


def test_export_failure_names_the_cause_without_colour_codes(tmp_path):
    (tmp_path / "datadep.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 2 if x.sum() > 0 else x - 1\n"
        "def make():\n"
        "    return M(), torch.ones(2, 3)\n")
    before = listing(tmp_path)
    one_line_error(sparsegraph("export", "datadep:make", "-o", "m.onnx", cwd=tmp_path), "export",
                   "torch.onnx.export failed for M: GuardOnDataDependentSymNode")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("args, name", [(["rewrite", "resnet-mini"], "out.sgm"),
                                        (["export", "resnet-mini"], "out.onnx")])
def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, args, name):
    """`ulimit -f` (RLIMIT_FSIZE) smaller than the output: the write fails part-way (safetensors for .sgm,
    a plain write for ONNX); the error names the limit, the previous file stays."""
    (tmp_path / name).write_bytes(b"the previous good file")
    r = sparsegraph(*args, "-o", name, cwd=tmp_path, fsize=64 * 1024)
    one_line_error(r, args[0], f"cannot write {name}: File too large (the file size limit, ulimit -f, is 65536 bytes)")
    assert (tmp_path / name).read_bytes() == b"the previous good file"
    assert listing(tmp_path) == {".", name}


@pytest.mark.slow
def test_train_resume_and_run_directories(tmp_path):
    """A finished run: resuming it with another seed is refused, a fresh run over it is refused
    (nothing deleted), --overwrite replaces it and says so."""
    common = ["train", "gpt-mini", "--model-option", "n_layer=1", "--model-option", "n_embd=32",
              "--model-option", "n_head=2", "--steps", "2", "--batch-size", "2", "--block-size", "16",
              "--no-progress", "-o", "run"]
    r = sparsegraph(*common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    one_line_error(sparsegraph(*common, "--resume", "--seed", "1", cwd=tmp_path), "train",
                   "is a checkpoint of a different run: seed 0 there, 1 here")
    one_line_error(sparsegraph(*common, "--seed", "1", cwd=tmp_path), "train",
                   "run already holds a run (checkpoint.sgm, metrics.jsonl, curves.png): --resume continues it")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    r = sparsegraph(*common, "--seed", "1", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0 and "sparsegraph: warning: replacing the run in run" in r.stderr, r.stderr
    assert sg.load(run / "checkpoint.sgm", with_extra=True).extra["config"]["seed"] == 1
