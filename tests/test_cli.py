"""The command line, as a user runs it."""
import json
import os
import resource
import subprocess
import sys

import pytest

from sparsegraph.cli import main


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sparsegraph.cli", *args], capture_output=True, text=True, **kw)


def test_analyze_builtin_json(capsys):
    assert main(["analyze", "resnet-mini", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dense_flops"] > 0 and data["layers"][0]["role"] == "stem"


def test_analyze_default_model_table(capsys):
    assert main(["analyze", "--groups"]) == 0
    out = capsys.readouterr().out
    assert "gpt-mini" in out and "dimension groups" in out


def test_input_shape_changes_flops(capsys):
    main(["analyze", "resnet-mini", "--json", "--input-shape", "1,1,16,16"])
    one = json.loads(capsys.readouterr().out)["dense_flops"]
    main(["analyze", "resnet-mini", "--json", "--input-shape", "4,1,16,16"])
    assert json.loads(capsys.readouterr().out)["dense_flops"] == 4 * one


def test_user_callable(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)), torch.randn(2, 8)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["analyze", "mymodels:make", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dense_flops"] == 2 * 2 * (8 * 16 + 16 * 2)


def test_user_callable_from_the_working_directory(tmp_path):
    """`sparsegraph analyze mymodels:make` finds a module in the current directory, like `python -m`."""
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Linear(8, 16), torch.randn(2, 8)\n")
    out = subprocess.run([sys.executable, "-m", "sparsegraph.cli", "analyze", "mymodels:make", "--json"],
                         cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["dense_flops"] == 2 * 2 * 8 * 16


@pytest.mark.parametrize("args, message", [
    (["analyze", "no-such-model"], "unknown model 'no-such-model'"),
    (["analyze", "missing.onnx"], "ONNX file not found: missing.onnx"),
    (["analyze", "resnet-mini", "--input-shape", "1,x,3"], "bad --input-shape '1,x,3'"),
    (["analyze", "resnet-mini", "--input-shape", "2,3,16,16"],
     "resnet-mini does not run on its example inputs (float32[2, 3, 16, 16]): RuntimeError: Given groups=1"),
    (["analyze", "torchvision:nonet"], "unknown torchvision model 'nonet'"),
    (["analyze", "hf:nonet"], "unknown Hugging Face architecture 'nonet'"),
    (["analyze", "os:nonexistent_fn"], "cannot import 'os:nonexistent_fn'"),
])
def test_bad_input_is_one_line_and_nonzero(args, message):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("sparsegraph analyze: error:")


def test_corrupt_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(os.urandom(256))
    r = run("analyze", str(bad))
    assert r.returncode == 2 and "bad.onnx" in r.stderr.strip().splitlines()[-1]


def test_unknown_op_strict(tmp_path):
    (tmp_path / "flipper.py").write_text(
        "import torch\n"
        "class F(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.l = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return torch.flip(self.l(x), dims=[-1])\n"
        "def make():\n"
        "    return F(), torch.randn(2, 4)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    loose = run("analyze", "flipper:make", env=env)
    assert loose.returncode == 0 and "aten.flip.default" in loose.stdout
    strict = run("analyze", "flipper:make", "--strict", env=env)
    assert strict.returncode == 2 and "no dimension rule for op(s) aten.flip.default" in strict.stderr


@pytest.mark.slow
def test_llama_7b_is_analysed_on_meta_without_allocating():
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = run("analyze", "hf:llama", "--json")
    assert r.returncode == 0, r.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert max(peak_kib, before) < 2 * 1024 * 1024  # under 2 GiB for a ~7B-parameter model
    data = json.loads(r.stdout)
    L, d, ff, V, H = 32, 4096, 11008, 32000, 32  # default LlamaConfig
    B, T = 2, 128
    assert 6.5e9 < data["params"] < 7e9
    weights = L * (4 * d * d + 3 * d * ff) + V * d  # every matmul weight, lm_head included
    attention = L * 2 * (2 * B * H * T * T * (d // H))  # q k^T and p v
    rope = data["dense_flops"] - 2 * B * T * weights - attention
    assert 0 <= rope <= 1e-5 * data["dense_flops"]  # only the rotary-frequency matmul is left


def test_rewrite_default_model_prints_plan(capsys):
    assert main(["rewrite"]) == 0
    out = capsys.readouterr().out
    assert "gpt-mini: sparse_wide, sparsity 0.75" in out and "original dense FLOPs" in out
    assert "h.0.mlp.c_fc.weight" in out and "1024×256" in out  # widened from 512x128


def test_rewrite_save_then_analyze_with_spectra(tmp_path, capsys):
    out = tmp_path / "par.sgm"
    assert main(["rewrite", "resnet-mini", "--transform", "sparse_parallel", "--sparsity", "0.5",
                 "--mask", "block:4", "--json", "-o", str(out)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["transform"] == "sparse_parallel" and out.exists()
    assert main(["analyze", str(out), "--json", "--spectral"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sparse_flops"] == plan["totals"]["sparse_flops"]
    assert {r["weight"] for r in report["spectral"]} == {w["name"] for w in plan["weights"] if w["mask"] != "none"}


@pytest.mark.slow
def test_rewrite_plan_only_llama_without_allocating():
    r = run("rewrite", "hf:llama", "--transform", "sparse_wide", "--sparsity", "0.75", "--plan-only", "--json")
    assert r.returncode == 0, r.stderr
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 * 1024 * 1024
    plan = json.loads(r.stdout)
    assert abs(plan["totals"]["sparse_flops"] / plan["totals"]["original_dense_flops"] - 1) < 1e-3
    mlp = next(w for w in plan["weights"] if w["name"] == "model.layers.0.mlp.up_proj.weight")
    assert mlp["shape"] == [22016, 8192] and mlp["mask"] == "uniform"  # 11008 x 4096 widened 2x


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], r"sparsity must be in [0, 1), got 1.5"),
    (["--mask", "nm:5:4"], "nm:5:4"),
    (["--transform", "sparse_parallel", "--budget-ratio", "0.5"], "a FLOP budget applies to sparse_wide only"),
])
def test_rewrite_bad_input_leaves_no_output(tmp_path, args, message):
    out = tmp_path / "out.sgm"
    r = run("rewrite", "resnet-mini", *args, "-o", str(out))
    assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []
