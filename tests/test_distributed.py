"""Past one machine: DDP and FSDP2 on 2 gloo ranks (CPU), RigL with SμPar groups, DCP round trips,
and `sparsegraph train` under torchrun.

Each rank gets its half of a global batch; the single-process reference trains on the whole batch,
so DDP and FSDP2 (both average gradients over ranks) must follow it within float tolerance.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph.models import builtin
from sparsegraph.sharded import full
from sparsegraph.unwrap import unwrap

GPT = dict(n_layer=2, n_embd=32, n_head=2, block_size=16)
GLOBAL_BATCH, SEQ, VOCAB = 8, 16, 256
TOTAL, INTERVAL = 8, 2  # RigL: T_end = 6, mask updates after steps 2 and 4
FAMILIES = ("sparse_wide", "sparse_parallel")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SPARSIFIED: dict = {}  # per process, by family: the rewritten gpt-mini (capturing it takes seconds)
_ANNOTATED: dict = {}


def _sparsified(transform: str):
    if transform not in _SPARSIFIED:
        spec = builtin("gpt-mini", **GPT)
        _SPARSIFIED[transform] = sg.sparsify(spec.model, (torch.zeros(1, SEQ, dtype=torch.long),), transform, 0.5,
                                             seed=0)
    return _SPARSIFIED[transform]


def _build(transform: str, init_seed: int = 0):
    """A fresh gpt-mini rewritten by `transform`, SμPar-annotated and initialised from `init_seed`."""
    if transform not in _ANNOTATED:
        model = copy.deepcopy(_sparsified(transform))
        sg.supar.annotate(model, "supar")
        _ANNOTATED[transform] = model
    model = copy.deepcopy(_ANNOTATED[transform])
    torch.manual_seed(init_seed)
    sg.supar.init_(model)
    return model


def _spawn(worker, *args) -> None:
    """Run `worker(rank, 2, port, models, *args)` on 2 processes; the rewritten models travel pickled."""
    import torch.multiprocessing as mp

    models = {t: _sparsified(t) for t in FAMILIES}
    mp.spawn(worker, args=(2, _free_port(), models, *args), nprocs=2, join=True)


def _wrap(model, mode: str):
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        return fully_shard(model)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, broadcast_buffers=False)  # masks are not synced: the ranks' decisions must agree
    return model


def _trainer(model, optimizer: str = "sgd"):
    """SμPar groups; SGD (momentum) for parity with one process: Adam divides float noise by float
    noise wherever a gradient vanishes exactly (attention key biases), so two exact schedules of
    the same sums differ there, while SGD keeps such differences at rounding size."""
    groups = sg.supar.param_groups(model, 1e-2 if optimizer == "sgd" else 1e-3, weight_decay=0.1, optimizer=optimizer)
    opt = torch.optim.SGD(groups, momentum=0.9) if optimizer == "sgd" else torch.optim.AdamW(groups)
    return opt, sg.dst.RigL(model, opt, total_steps=TOTAL, update_interval=INTERVAL, drop_fraction=0.5)


def _batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _train(model, opt, rigl, steps: range, rank: int = 0, world: int = 1) -> list[float]:
    losses = []
    for step in steps:
        x, y = _batch(step, rank, world)
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt.step()
        rigl.step()
        mean = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    return losses


def _snapshot(model, opt) -> dict:
    """Full (gathered) weights, masks and AdamW moments, by unwrapped name: a collective under FSDP2."""
    inner = unwrap(model)
    state = {k: full(v).detach().clone() for k, v in inner.state_dict().items() if torch.is_tensor(v)}
    moments = {}
    for name, p in inner.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            moments[f"{name}:{key}"] = full(value).detach().clone()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"state": state, "moments": moments, "plan": sg.plan_of(inner).to_dict(), "groups": groups}


def _init(rank: int, world: int, port: int, models: dict) -> None:
    _SPARSIFIED.update(models)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _masks(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith("_mask")}


# ---------------------------------------------------------------------------------------------
# DDP and FSDP2 against one process on the whole batch
# ---------------------------------------------------------------------------------------------
def _parity_worker(rank: int, world: int, port: int, models: dict, out: str) -> None:
    _init(rank, world, port, models)
    try:
        for mode in ("ddp", "fsdp"):
            for transform in FAMILIES:
                model = _wrap(_build(transform), mode)
                opt, rigl = _trainer(model)
                losses = _train(model, opt, rigl, range(TOTAL - 2), rank, world)
                masks = _masks({k: v for k, v in unwrap(model).state_dict().items() if torch.is_tensor(v)})
                gathered = {}
                for name, mask in masks.items():  # every rank's own mask buffer, side by side
                    parts = [torch.empty_like(mask) for _ in range(world)]
                    torch.distributed.all_gather(parts, mask)
                    gathered[name] = parts
                sharded = any(type(p).__name__ == "DTensor" for p in unwrap(model).parameters())
                snap = _snapshot(model, opt)
                if rank == 0:
                    torch.save({"losses": losses, "gathered": gathered, "sharded": sharded,
                                "history": sg.plan_of(unwrap(model)).history, **snap},
                               os.path.join(out, f"{mode}-{transform}.pt"))
        _checkpointed_run(rank, world, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parity"))
    _spawn(_parity_worker, out)
    runs = {(mode, t): torch.load(os.path.join(out, f"{mode}-{t}.pt"), weights_only=False)
            for mode in ("ddp", "fsdp") for t in FAMILIES}
    return {**runs, "dir": out}


@pytest.mark.parametrize("transform", FAMILIES)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_on_the_whole_batch(parity_runs, mode, transform):
    run = parity_runs[(mode, transform)]
    assert run["sharded"] == (mode == "fsdp")  # FSDP2 really sharded the weights as DTensors
    start = _masks(_build(transform).state_dict())
    model = _build(transform)
    opt, rigl = _trainer(model)
    ref_losses = _train(model, opt, rigl, range(TOTAL - 2))
    ref = _snapshot(model, opt)
    assert [h["step"] for h in run["history"]] == [2, 4]
    assert run["history"] == sg.plan_of(model).history  # the same drops and grows, layer by layer
    for name, (mine, theirs) in run["gathered"].items():
        assert torch.equal(mine, theirs), name  # identical masks on both ranks
        assert torch.equal(mine, ref["state"][name]), name  # ... and the ones one process chose
    assert any(not torch.equal(run["state"][k], start[k]) for k in start)  # the updates changed masks
    for name, mask in _masks(run["state"]).items():
        assert int(mask.sum()) == int(start[name].sum()), name  # RigL keeps the nonzero count
        weight = run["state"][name[:-len("_mask")]]
        assert bool((weight[mask == 0] == 0).all()), name  # masked weights are exactly zero
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref_losses))
    assert run["state"].keys() == ref["state"].keys() and run["moments"].keys() == ref["moments"].keys()
    for key in ref["state"]:
        torch.testing.assert_close(run["state"][key], ref["state"][key], msg=key)
    for key in ref["moments"]:
        torch.testing.assert_close(run["moments"][key], ref["moments"][key], msg=key)
    assert run["plan"] == ref["plan"]


# ---------------------------------------------------------------------------------------------
# torch.distributed.checkpoint: save from a 2-rank FSDP2 run, load in a new one, continue
# ---------------------------------------------------------------------------------------------
SAVE_AT = 3  # after the mask update at step 2, before the one at step 4


def _checkpointed_run(rank: int, world: int, out: str) -> None:
    """FSDP2 + AdamW + RigL: train to SAVE_AT, save with sg.dist.save, train on to TOTAL - 2."""
    model = _wrap(_build("sparse_wide"), "fsdp")
    opt, rigl = _trainer(model, "adamw")
    _train(model, opt, rigl, range(SAVE_AT), rank, world)
    for group in opt.param_groups:  # as a schedule does: a new lr, the base one kept under a key of its own
        group["initial_lr"], group["lr"] = group["lr"], group["lr"] / 2
    saved = _snapshot(model, opt)
    sg.dist.save(os.path.join(out, "ckpt"), model, opt, rigl, extra={"step": SAVE_AT})
    losses = _train(model, opt, rigl, range(SAVE_AT, TOTAL - 2), rank, world)
    final = _snapshot(model, opt)
    if rank == 0:
        torch.save({"saved": saved, "dst": {"method": "rigl", "step": SAVE_AT}, "losses": losses, "final": final},
                   os.path.join(out, "uninterrupted.pt"))


def _resume_worker(rank: int, world: int, port: int, models: dict, out: str) -> None:
    _init(rank, world, port, models)
    try:
        model = _wrap(_build("sparse_wide", init_seed=1), "fsdp")  # other weights, the starting masks
        opt, rigl = _trainer(model, "adamw")
        fresh = _snapshot(model, opt)
        extra = sg.dist.load(os.path.join(out, "ckpt"), model, opt, rigl)
        loaded = _snapshot(model, opt)
        dst = rigl.state_dict()
        losses = _train(model, opt, rigl, range(SAVE_AT, TOTAL - 2), rank, world)
        final = _snapshot(model, opt)
        if rank == 0:
            torch.save({"fresh": fresh, "extra": extra, "loaded": loaded, "dst": dst, "losses": losses,
                        "final": final}, os.path.join(out, "resumed.pt"))
        _trainer_under_ddp(rank, world, out)  # the process group is up: the trainer's DDP mode joins it
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def resumed_runs(parity_runs):
    out = parity_runs["dir"]  # the parity workers also ran the checkpointed FSDP2 run
    _spawn(_resume_worker, out)
    return out


def _assert_equal(a: dict, b: dict) -> None:
    assert a["plan"] == b["plan"] and a["groups"] == b["groups"]
    for part in ("state", "moments"):
        assert a[part].keys() == b[part].keys(), part
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), key


def test_dcp_round_trip_restores_everything_and_training_continues_identically(resumed_runs):
    out = resumed_runs
    ref = torch.load(os.path.join(out, "uninterrupted.pt"), weights_only=False)
    run = torch.load(os.path.join(out, "resumed.pt"), weights_only=False)
    saved, fresh = ref["saved"], run["fresh"]
    assert [h["step"] for h in saved["plan"]["history"]] == [2]
    assert saved["moments"] and not fresh["moments"] and not fresh["plan"]["history"]
    assert "initial_lr" in saved["groups"][0] and "initial_lr" not in fresh["groups"][0]
    assert any(not torch.equal(fresh["state"][k], saved["state"][k]) for k in _masks(saved["state"]))
    assert not torch.equal(fresh["state"]["wte.weight"], saved["state"]["wte.weight"])
    _assert_equal(run["loaded"], saved)  # weights, masks, AdamW moments and plan, bit for bit
    assert run["dst"] == ref["dst"] and run["extra"] == {"step": SAVE_AT}
    assert run["losses"] == ref["losses"]  # ... and the next steps, a mask update included
    assert [h["step"] for h in run["final"]["plan"]["history"]] == [2, 4]
    _assert_equal(run["final"], ref["final"])


# ---------------------------------------------------------------------------------------------
# `sparsegraph train` under torchrun
# ---------------------------------------------------------------------------------------------
TRAIN_ARGS = ["gpt-mini", "--model-option", "n_layer=1", "--model-option", "n_embd=32", "--model-option", "n_head=2",
              "--model-option", "block_size=16", "--block-size", "16", "--batch-size", "8", "--steps", "4",
              "--dst", "rigl", "--update-interval", "2", "--optimizer", "sgd", "--lr", "0.05",
              "--eval-interval", "4", "--no-progress"]


def _train_config(**changes):
    from sparsegraph.commands.train import _options
    from sparsegraph.train.trainer import TrainConfig

    return TrainConfig(model="gpt-mini", dst="rigl", steps=4, batch_size=8, block_size=16, update_interval=2,
                       optimizer="sgd", lr=0.05, eval_interval=4,
                       model_options=_options(["n_layer=1", "n_embd=32", "n_head=2", "block_size=16"]), **changes)


def _trainer_under_ddp(rank: int, world: int, out: str) -> None:
    from sparsegraph.train.trainer import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    train(_train_config(), os.path.join(out, "train-ddp"), progress=False)
    resumed = _train_config(fsdp=True, checkpoint_interval=2)  # stopped after the mask update, resumed
    train(resumed, os.path.join(out, "train-fsdp-resumed"), progress=False, stop_after=2)
    train(resumed, os.path.join(out, "train-fsdp-resumed"), progress=False, resume=True)


@pytest.fixture(scope="module")
def single_train(tmp_path_factory):
    """`sparsegraph train` in one process: the reference of the DDP and FSDP2 runs."""
    from sparsegraph.train.trainer import train

    out = str(tmp_path_factory.mktemp("single"))
    return out, train(_train_config(), out, progress=False)


def _metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _same_run(run_dir, single: list[dict]) -> None:
    lines = _metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in lines] == [1, 2, 3, 4]  # one writer: no line twice
    torch.testing.assert_close(torch.tensor([r["loss"] for r in lines]), torch.tensor([r["loss"] for r in single]))
    torch.testing.assert_close(lines[-1]["val_loss"], single[-1]["val_loss"])


def _same_state(mine: dict, state: dict) -> None:
    masks = [k for k in state if k.endswith("_mask")]
    assert masks and all(torch.equal(mine[k], state[k]) for k in masks)  # the same mask decisions
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(mine[key], value, msg=key)


def test_sparsegraph_train_under_ddp_follows_the_single_process_run(resumed_runs, single_train):
    from sparsegraph.io import read

    run_dir = os.path.join(resumed_runs, "train-ddp")
    _same_run(run_dir, single_train[1])
    assert sorted(os.listdir(run_dir)) == ["checkpoint.sgm", "curves.png", "metrics.jsonl"]
    meta, state, extra = read(os.path.join(run_dir, "checkpoint.sgm"))  # rank 0's, of the unwrapped model
    assert extra["step"] == 4 and [h["step"] for h in meta["plan"]["history"]] == [2]
    _same_state(state, read(os.path.join(single_train[0], "checkpoint.sgm"))[1])


def test_sparsegraph_train_with_fsdp_resumes_from_its_sharded_checkpoint(resumed_runs, single_train):
    """Stopped at step 2 (just after RigL's update), resumed from checkpoint.dcp by a new train():
    the same losses as the uninterrupted single-process run; the lr schedule resumes too."""
    run_dir = os.path.join(resumed_runs, "train-fsdp-resumed")
    _same_run(run_dir, single_train[1])
    assert [r["lr"] for r in _metrics(os.path.join(run_dir, "metrics.jsonl"))] == [r["lr"] for r in single_train[1]]


def test_sparsegraph_train_under_torchrun_with_fsdp_follows_the_single_process_run(tmp_path, single_train):
    from sparsegraph.io import read
    from sparsegraph.train.trainer import build

    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sparsegraph.cli", "train", *TRAIN_ARGS, "--fsdp", "-o", str(tmp_path / "fsdp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("4 steps logged") == 1  # rank 0 reports, rank 1 does not
    _same_run(tmp_path / "fsdp", single_train[1])
    assert sorted(os.listdir(tmp_path / "fsdp")) == ["checkpoint.dcp", "curves.png", "metrics.jsonl"]
    # the sharded checkpoint, loaded into one process, holds the masks and weights of the single run
    model, opt, rigl, _ = build(_train_config(fsdp=True))
    extra = sg.dist.load(str(tmp_path / "fsdp" / "checkpoint.dcp"), model, opt, rigl)
    assert extra["step"] == 4 and rigl.t == 4
    assert [h["step"] for h in sg.plan_of(model).history] == [2]
    _same_state(model.state_dict(), read(os.path.join(single_train[0], "checkpoint.sgm"))[1])
