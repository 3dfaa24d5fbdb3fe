"""`sparsegraph train`: the whole stack, resumable, interrupt-safe."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import sparsegraph as sg
from sparsegraph.graph import SparsegraphError
from sparsegraph.train.trainer import CHECKPOINT, METRICS, TrainConfig, read_metrics, train

TINY_GPT = {"n_layer": 1, "n_embd": 64, "n_head": 2}


def config(**kw):
    base = dict(model="gpt-mini", model_options=TINY_GPT, transform="sparse_wide", sparsity=0.75, dst="rigl",
                parameterization="supar", steps=12, batch_size=4, block_size=32, update_interval=3,
                eval_interval=6, checkpoint_interval=4, eval_batches=2)
    return TrainConfig(**(base | kw))


def test_resume_gives_the_same_loss_curve(tmp_path):
    whole = train(config(), str(tmp_path / "a"), progress=False)
    train(config(), str(tmp_path / "b"), progress=False, stop_after=8)  # "interrupted" after a checkpoint
    with open(tmp_path / "b" / METRICS, "a") as f:  # killed in the middle of writing step 9's line
        f.write('{"step": 9, "loss": 5.4')
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "b" / f".sparsegraph-{dead.stdout.strip()}@{socket.gethostname()}-x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")  # and a save killed half-way, earlier
    resumed = train(config(), str(tmp_path / "b"), resume=True, progress=False)
    assert not stale.exists()
    assert [m["step"] for m in resumed] == list(range(1, 13))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole]
    assert [m.get("val_loss") for m in resumed] == [m.get("val_loss") for m in whole]
    plan = sg.plan_of(sg.load(tmp_path / "b" / CHECKPOINT))
    assert plan.history and plan.history == sg.plan_of(sg.load(tmp_path / "a" / CHECKPOINT)).history
    assert (tmp_path / "b" / "curves.png").stat().st_size > 1000


def test_refuses_a_checkpoint_of_another_run(tmp_path):
    train(config(steps=4), str(tmp_path), progress=False)
    log = (tmp_path / METRICS).read_bytes()
    with pytest.raises(SparsegraphError, match=r"checkpoint of a different run: sparsity 0.75 there, 0.5 here \("):
        train(config(steps=4, sparsity=0.5), str(tmp_path), resume=True, progress=False)
    with pytest.raises(SparsegraphError, match=r"different run: seed 0 there, 1 here \(resume with the same"):
        train(config(steps=4, seed=1), str(tmp_path), resume=True, progress=False)
    assert (tmp_path / METRICS).read_bytes() == log
    # the logging and saving cadence may change on a resume; a finished run has nothing left to train
    with pytest.warns(UserWarning, match=r"already finished \(step 4 of 4\); nothing to train"):
        metrics = train(config(steps=4, eval_interval=2, checkpoint_interval=1), str(tmp_path), resume=True,
                        progress=False)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def test_a_fresh_run_refuses_a_directory_that_holds_a_run(tmp_path):
    train(config(steps=4), str(tmp_path), progress=False)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(files) == {CHECKPOINT, METRICS, "curves.png"}
    with pytest.raises(SparsegraphError, match=r"already holds a run \(checkpoint.sgm, metrics.jsonl, curves.png\): "
                                               r"--resume continues it, --overwrite replaces it"):
        train(config(steps=4, seed=1), str(tmp_path), progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # nothing deleted, nothing written
    with pytest.raises(SparsegraphError, match="choose one"):
        train(config(steps=4), str(tmp_path), resume=True, overwrite=True, progress=False)
    with pytest.warns(UserWarning, match="replacing the run in"):
        metrics = train(config(steps=2, seed=1), str(tmp_path), overwrite=True, progress=False)
    assert [m["step"] for m in metrics] == [1, 2]
    assert sg.load(tmp_path / CHECKPOINT, with_extra=True).extra["config"]["seed"] == 1


@pytest.mark.parametrize("field, value, message", [
    ("eval_interval", 0, "--eval-interval must be a positive integer, got 0"),
    ("checkpoint_interval", 0, "--checkpoint-interval must be a positive integer, got 0"),
    ("update_interval", -5, "--update-interval must be a positive integer, got -5"),
    ("steps", 0, "--steps must be a positive integer, got 0"),
    ("batch_size", 2.5, "--batch-size must be a positive integer, got 2.5"),
    ("lr", 0.0, "--lr must be positive, got 0.0"),
    ("sparsity", False, "--sparsity must be a number, got False"),
    ("warmup_steps", -1, "--warmup-steps must be a non-negative integer, got -1"),
    ("model_options", {"n_layr": 1}, "built-in 'gpt-mini' takes the options .*, not n_layr"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, field, value, message):
    with pytest.raises(SparsegraphError, match=message):
        train(config(**{field: value}), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_file_is_not_a_run_directory(tmp_path):
    (tmp_path / "run").write_text("notes")
    with pytest.raises(SparsegraphError, match=r"cannot use .*run as a run directory: it is a file"):
        train(config(), str(tmp_path / "run"), progress=False)
    assert (tmp_path / "run").read_text() == "notes"


def test_read_metrics_drops_only_a_torn_last_line(tmp_path):
    log = tmp_path / METRICS
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(str(log)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(SparsegraphError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_metrics(str(log))


def test_digits_resnet_with_sparseopt_learns(tmp_path):
    metrics = train(TrainConfig(model="resnet-mini", transform="sparse_wide", sparsity=0.9, dst="rigl",
                                sparseopt=True, steps=40, batch_size=32, lr=3e-3, update_interval=10,
                                eval_interval=20, checkpoint_interval=40), str(tmp_path), progress=False)
    assert metrics[-1]["val_acc"] > 0.3  # 10 classes: chance is 0.1
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


@pytest.mark.slow
def test_sigint_leaves_the_last_checkpoint_intact(tmp_path):
    cmd = [sys.executable, "-m", "sparsegraph.cli", "train", "gpt-mini", "--model-option", "n_layer=1",
           "--model-option", "n_embd=64", "--model-option", "n_head=2", "--steps", "100000", "--batch-size", "4",
           "--block-size", "32", "--checkpoint-interval", "2", "--eval-interval", "1000", "--no-progress",
           "-o", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / CHECKPOINT
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    time.sleep(1.0)  # let it write a few more, so the signal lands mid-run
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    model = sg.load(ckpt, with_extra=True)
    step = model.extra["step"]
    assert step >= 2 and step % 2 == 0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    logged = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert len(logged) >= step
    x = torch.randint(0, 256, (1, 16))
    assert torch.isfinite(model(x)).all()


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    from sparsegraph.train.trainer import lr_factor

    cfg = TrainConfig(steps=1000)  # warm-up: min(100, 1000 // 10) = 100 steps
    assert lr_factor(cfg, 0) == pytest.approx(0.01)
    assert lr_factor(cfg, 99) == pytest.approx(1.0)
    assert lr_factor(cfg, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 550) == pytest.approx(0.55)  # half-way through the decay: 0.1 + 0.9 / 2
    assert lr_factor(cfg, 1000) == pytest.approx(0.1)
    assert lr_factor(TrainConfig(steps=1000, lr_schedule="constant"), 5) == 1.0


def test_resnet_builtins_take_widths_and_blocks():
    from sparsegraph.models import builtin

    spec = builtin("resnet-mini", widths="8,16,32")
    assert [stage[0].conv1.out_channels for stage in spec.model.layers] == [8, 16, 32]
    assert [len(stage) for stage in spec.model.layers] == [1, 1, 1]  # resnet-mini's own blocks kept
    assert spec.model(spec.example_inputs[0]).shape == (2, 10)
    assert [len(s) for s in builtin("resnet18", blocks=(1, 1, 1, 1)).model.layers] == [1, 1, 1, 1]
    with pytest.raises(SparsegraphError, match="takes the options widths and blocks, not depth"):
        builtin("resnet-mini", depth=3)
    with pytest.raises(SparsegraphError, match=r"option widths='a,b': expected positive integers"):
        builtin("resnet-mini", widths="a,b")
    with pytest.raises(SparsegraphError, match="widths has 2 stages and blocks 3"):
        builtin("resnet-mini", widths="8,16")
    with pytest.raises(SparsegraphError, match=r"option blocks=\(1, 0, 1\): expected positive integers"):
        builtin("resnet-mini", blocks=(1, 0, 1))


@pytest.mark.parametrize("options, message", [
    ({"n_layr": 1}, "takes the options vocab_size, block_size, n_layer, n_head, n_embd, dropout, not n_layr"),
    ({"n_layer": "two"}, "option n_layer='two': expected a positive integer"),
    ({"n_head": 0}, "option n_head=0: expected a positive integer"),
    ({"dropout": 1.5}, r"option dropout=1.5: expected a number in \[0, 1\)"),
    ({"n_embd": 100, "n_head": 3}, "n_embd=100 is not a multiple of n_head=3"),
])
def test_gpt_options_are_checked(options, message):
    from sparsegraph.models import builtin

    with pytest.raises(SparsegraphError, match=message):
        builtin("gpt-mini", **options)


def test_hard_digits_are_shifted_noisy_copies():
    from sparsegraph.data import digits

    plain, hard = digits("train"), digits("train", hard=True)
    assert len(hard) == 4 * len(plain) and hard.images.shape[1:] == plain.images.shape[1:]
    assert torch.equal(hard.labels[:len(plain)], plain.labels)
    noise = hard.images[:len(plain)] - plain.images
    assert 0.9 < noise.std() < 1.3  # unit Gaussian noise (plus the shifts)
    assert torch.equal(digits("val", hard=True).images, digits("val", hard=True).images)  # fixed seed
    assert len(digits("val", hard=True)) == len(digits("val"))


def test_build_wires_the_parameterization_optimizer_and_schedule():
    from sparsegraph.train.trainer import build

    cfg = config(optimizer="sgd", momentum=0.8, weight_decay=0.1, sparseopt=True)
    model, optimizer, schedule, _ = build(cfg)
    assert isinstance(optimizer, sg.SparseOpt) and isinstance(optimizer.optimizer, torch.optim.SGD)
    assert isinstance(schedule, sg.dst.RigL)
    expected = sg.supar.param_groups(model, cfg.lr, cfg.weight_decay, optimizer="sgd")  # SμPar's per-weight lr / wd
    got = {(g["lr"], g["weight_decay"], g["momentum"]) for g in optimizer.param_groups}
    assert got == {(g["lr"], g["weight_decay"], 0.8) for g in expected} and len(got) > 1
    sp = build(config(parameterization="sp"))[1]
    assert {(g["lr"], g["weight_decay"]) for g in sp.param_groups} == {(3e-3, 0.0)}  # SP: the base values


@pytest.mark.parametrize("storage", ["masked", "compact"])
def test_recompute_trains_the_same_run_with_each_block_run_twice(tmp_path, storage, monkeypatch):
    """--recompute (sg.checkpoint_blocks) changes memory, not numbers: the same losses step by step, RigL
    updates included, with every block's forward run once more for backward; a run may resume without it."""
    from sparsegraph.models import gpt

    calls = []
    forward = gpt.Block.forward
    monkeypatch.setattr(gpt.Block, "forward", lambda self, x: calls.append(1) or forward(self, x))
    kw = dict(storage=storage, mask="balanced_block:16", steps=6, eval_interval=6, checkpoint_interval=3)
    plain = train(config(**kw), str(tmp_path / "plain"), progress=False)
    n_plain = len(calls)
    again = train(config(recompute=True, **kw), str(tmp_path / "again"), progress=False)
    assert [m["loss"] for m in again] == [m["loss"] for m in plain]
    assert again[-1]["val_loss"] == plain[-1]["val_loss"]
    assert len(calls) - n_plain == n_plain + 6  # one block (n_layer=1): once more per training step
    train(config(recompute=True, **kw), str(tmp_path / "half"), progress=False, stop_after=3)
    resumed = train(config(**kw), str(tmp_path / "half"), resume=True, progress=False)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in plain]
    with pytest.raises(SparsegraphError, match="--recompute is not available with --fsdp"):
        config(recompute=True, fsdp=True).validate()
