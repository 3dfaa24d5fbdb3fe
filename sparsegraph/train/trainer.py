"""The whole stack in one loop: rewrite, SμPar, dynamic sparsity, SparseOpt, checkpoints, metrics.

`train(TrainConfig(...))` is what `sparsegraph train` runs. A run directory holds
  checkpoint.sgm   the model (sg.load-able) with optimizer, sparsity-schedule and RNG state
  metrics.jsonl    one JSON object per logged step (train loss, val loss/accuracy, density, lr)
  curves.png       the curves drawn from metrics.jsonl
  checkpoint.dcp/  instead of checkpoint.sgm with `fsdp` (sharded weights: a sg.dist checkpoint)
Under torchrun (`torchrun --nproc_per_node N -m sparsegraph.cli train ...`) the run is data-parallel
with DDP, or FSDP2 with `fsdp`: see sparsegraph/train/distributed.py and docs/distributed.md.
Checkpoints are written atomically; an interrupted run (Ctrl-C, SIGINT, a kill) keeps the last one,
and `--resume` continues to the same loss curve as an uninterrupted run with the same seed: it
refuses a checkpoint trained with other settings, and drops a metrics line torn by a kill. A fresh
run refuses a directory that already holds a run unless asked to replace it (`overwrite`).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..fsutil import OutputError, atomic_write, check_writable
from ..graph import SparsegraphError
from .distributed import Distributed
from .supar import make_optimizer

CHECKPOINT = "checkpoint.sgm"
CHECKPOINT_DCP = "checkpoint.dcp"  # a directory: the FSDP2 checkpoint (sg.dist.save)
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    model: str = "gpt-mini"
    transform: str | None = "sparse_wide"  # None: train the dense original
    sparsity: float = 0.75
    mask: str = "uniform"
    storage: str = "masked"  # masked (weight * mask) | compact (sg.lower: stored blocks, optimizer state per value)
    dst: str = "static"  # static | rigl | set | gmp
    parameterization: str = "sp"  # sp | mup | supar
    sparseopt: bool = False
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    lr_schedule: str = "cosine"  # cosine (linear warm-up, then cosine decay to lr/10) | constant
    warmup_steps: int | None = None  # default: a tenth of the steps, at most 100
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adam | sgd
    momentum: float = 0.9  # sgd only
    data: str | None = None  # chars | digits | digits-hard | pkg.module:callable (default: by model)
    block_size: int = 64  # character corpus context
    update_interval: int = 50  # DST
    drop_fraction: float = 0.3
    eval_interval: int = 50
    eval_batches: int = 8
    checkpoint_interval: int = 100
    seed: int = 0
    fsdp: bool = False  # under torchrun: FSDP2 (sharded) instead of DDP
    recompute: bool = False  # activation checkpointing per block (sg.checkpoint_blocks): less memory, same numbers
    model_options: dict = field(default_factory=dict)  # e.g. {"n_layer": 2} for gpt-mini

    def run_settings(self) -> dict:
        """What a resumed run must share with its checkpoint: everything but the logging and saving
        cadence (model, rewrite, seed, data, optimizer, schedules, steps), as JSON values."""
        return run_settings(asdict(self))

    def fingerprint(self) -> str:
        """A hash of `run_settings()`: a checkpoint of another run is refused."""
        return hashlib.sha1(json.dumps(self.run_settings(), sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        """One clear error for settings that cannot run, named as the CLI option."""
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SparsegraphError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise SparsegraphError(f"--warmup-steps must be a non-negative integer, got {self.warmup_steps!r}")
        for name in ("lr", "momentum", "weight_decay", "drop_fraction", "sparsity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SparsegraphError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
        if self.lr <= 0:
            raise SparsegraphError(f"--lr must be positive, got {self.lr}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise SparsegraphError(f"unknown --lr-schedule {self.lr_schedule!r}; choose cosine or constant")
        if self.storage not in STORAGES:
            raise SparsegraphError(f"unknown --storage {self.storage!r}; choose {' or '.join(STORAGES)}")
        if self.recompute and self.fsdp:
            raise SparsegraphError("--recompute is not available with --fsdp; use DDP (no --fsdp)")
        if self.storage == "compact" and self.fsdp:
            raise SparsegraphError("--storage compact does not shard with --fsdp (FSDP2 would split the stored "
                                   "blocks across ranks); use DDP (no --fsdp) or --storage masked")
        if not isinstance(self.model_options, dict):
            raise SparsegraphError(f"model_options must be a dict, got {type(self.model_options).__name__}")


RESUME_FREE = ("eval_interval", "checkpoint_interval", "eval_batches", "fsdp", "recompute")  # may change on
#               --resume (fsdp, recompute: the same arithmetic; fsdp's checkpoint format is checked by name)
POSITIVE_INTS = ("steps", "batch_size", "block_size", "update_interval", "eval_interval", "eval_batches",
                 "checkpoint_interval")


STORAGES = ("masked", "compact")


def run_settings(config: dict) -> dict:
    """The settings of a config dict that a resumed run must share, as JSON values (see TrainConfig)."""
    settings = {k: v for k, v in config.items() if k not in RESUME_FREE}
    if settings.get("storage") == "masked":  # the default keeps the fingerprint of runs from before the option
        del settings["storage"]
    return json.loads(json.dumps(settings))


# ---------------------------------------------------------------------------------------------
# data: a task is (sample_train(batch, gen) -> (x, y), val_batches() -> iterable, loss, metrics)
# ---------------------------------------------------------------------------------------------
@dataclass
class Task:
    train_batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    val_batches: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]
    kind: str  # "lm" (next-token cross-entropy) | "classify"


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def task_loss(task: Task, out: Any, y: torch.Tensor) -> torch.Tensor:
    logits = _logits(out)
    if task.kind == "lm":
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    return F.cross_entropy(logits, y)


def make_task(cfg: TrainConfig, default: str) -> Task:
    from .. import data

    name = cfg.data or default
    if name == "chars":
        train, val = data.char_corpus("train", cfg.block_size), data.char_corpus("val", cfg.block_size)
        vg = torch.Generator().manual_seed(1234)
        fixed = [val.batch(cfg.batch_size, vg) for _ in range(cfg.eval_batches)]
        return Task(train.batch, lambda: fixed, "lm")
    if name in ("digits", "digits-hard"):
        hard = name == "digits-hard"
        train, val = data.digits("train", hard=hard), data.digits("val", hard=hard)

        def sample(batch: int, gen: torch.Generator):
            idx = torch.randint(0, len(train), (batch,), generator=gen)
            return train.images[idx], train.labels[idx]

        fixed = list(val.batches(256, torch.Generator(), shuffle=False))
        return Task(sample, lambda: fixed, "classify")
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            made = getattr(importlib.import_module(mod), attr)()
        except (ImportError, AttributeError) as e:
            raise SparsegraphError(f"cannot import data {name!r}: {e}") from e
        if not isinstance(made, Task):
            raise SparsegraphError(f"{name} must return a sparsegraph.train.trainer.Task, got {type(made).__name__}")
        return made
    raise SparsegraphError(f"unknown data {name!r}: expected chars, digits, digits-hard or package.module:callable")


# ---------------------------------------------------------------------------------------------
# building the model and its optimizer
# ---------------------------------------------------------------------------------------------
def build(cfg: TrainConfig, dist: Distributed | None = None):
    """(model, optimizer, schedule, task) for a config: rewrite, SμPar, DST, SparseOpt; under
    torchrun (`dist`) the model is DDP-wrapped or FSDP2-sharded before its optimizer is made."""
    import sparsegraph as sg
    from ..models import BUILTINS, builtin, load_model

    torch.manual_seed(cfg.seed)
    if cfg.model_options and cfg.model not in BUILTINS:
        raise SparsegraphError(f"--model-option applies to the built-in models ({', '.join(BUILTINS)}), "
                               f"not {cfg.model}")
    spec = builtin(cfg.model, **cfg.model_options) if cfg.model_options else load_model(cfg.model)
    if spec.kind != "torch":
        raise SparsegraphError(f"{spec.name}: training needs a PyTorch model")
    default_data = "chars" if "gpt" in spec.name else "digits"
    task = make_task(cfg, default_data)
    x, _ = task.train_batch(2, torch.Generator().manual_seed(0))
    if cfg.transform:
        model = sg.sparsify(spec.model, (x,), cfg.transform, cfg.sparsity, mask=cfg.mask, seed=cfg.seed)
    else:  # the dense original, captured like the others so every run trains the same kind of module
        model = sg.sparsify(spec.model, (x,), "sparse_wide", 0.0, seed=cfg.seed)
    sg.supar.annotate(model, parameterization=cfg.parameterization)
    sg.supar.init_(model)
    if cfg.storage == "compact":  # judged at the training batch; layers the cost model keeps dense stay masked
        model = sg.lower(model, example_inputs=(task.train_batch(cfg.batch_size, torch.Generator().manual_seed(0))[0],))
    if cfg.recompute:
        sg.checkpoint_blocks(model)
    if dist is not None:
        model = dist.wrap(model)
    groups = sg.supar.param_groups(model, cfg.lr, cfg.weight_decay, optimizer=cfg.optimizer)
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.momentum)
    if cfg.sparseopt:
        optimizer = sg.SparseOpt(optimizer, model)
    schedule = None
    if sg.plan_of(model).sparse_weights:
        kinds = {"static": sg.dst.Static, "rigl": sg.dst.RigL, "set": sg.dst.SET, "gmp": sg.dst.GMP}
        if cfg.dst not in kinds:
            raise SparsegraphError(f"unknown --dst {cfg.dst!r}; choose from {', '.join(kinds)}")
        schedule = kinds[cfg.dst](model, optimizer, cfg.steps, update_interval=cfg.update_interval,
                                  **({} if cfg.dst in ("static", "gmp") else {"drop_fraction": cfg.drop_fraction}))
    return model, optimizer, schedule, task


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning-rate multiplier at `step` (0-based): a pure function of the step, so a resumed
    run continues the schedule exactly."""
    if cfg.lr_schedule == "constant":
        return 1.0
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, cfg.steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(cfg.steps - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def evaluate(model, task: Task) -> dict:
    training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in task.val_batches():
            out = model(x)
            total += task_loss(task, out, y).item() * len(y)
            if task.kind == "classify":
                correct += (_logits(out).argmax(-1) == y).sum().item()
            count += len(y)
    model.train(training)
    metrics = {"val_loss": total / count}
    if task.kind == "classify":
        metrics["val_acc"] = correct / count
    return metrics


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _state(obj) -> Any:
    return obj.state_dict() if obj is not None and hasattr(obj, "state_dict") else None


def save_checkpoint(path: str, cfg: TrainConfig, model, optimizer, schedule, step: int, gen: torch.Generator,
                    dist: Distributed | None = None):
    """checkpoint.sgm, written by rank 0 (DDP: every rank holds the same state); with FSDP2 every rank
    writes its shards to checkpoint.dcp (sg.dist.save), the rest of the state as JSON."""
    from ..io import save
    from ..unwrap import unwrap

    if dist is not None and dist.fsdp:
        from .. import dist as sgdist

        sgdist.save(os.path.join(os.path.dirname(path), CHECKPOINT_DCP), model, optimizer, schedule,
                    extra={"config": asdict(cfg), "fingerprint": cfg.fingerprint(), "step": step,
                           "generator": gen.get_state().tolist(), "torch_rng": torch.get_rng_state().tolist()})
        return
    if dist is not None and not dist.is_main:
        return
    save(unwrap(model), path, extra={"config": asdict(cfg), "fingerprint": cfg.fingerprint(), "step": step,
                             "optimizer": optimizer.state_dict(), "schedule": _state(schedule),
                             "generator": gen.get_state(), "torch_rng": torch.get_rng_state()})


def _differences(saved: dict, cfg: TrainConfig) -> str:
    theirs, mine = run_settings(saved), cfg.run_settings()
    diffs = [f"{k} {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in sorted(set(theirs) | set(mine))
             if theirs.get(k) != mine.get(k)]
    return "; ".join(diffs) or "its settings fingerprint differs"


def _fsdp_resume(path: str, cfg: TrainConfig, model, optimizer, schedule, gen: torch.Generator) -> int:
    from .. import dist as sgdist

    with open(os.path.join(path, sgdist.META)) as f:
        extra = json.load(f)["extra"]
    if extra.get("fingerprint") != cfg.fingerprint():
        raise SparsegraphError(f"{path} is a checkpoint of a different run: {_differences(extra['config'], cfg)} "
                               "(resume with the same settings, or train into another directory)")
    sgdist.load(path, model, optimizer, schedule)
    gen.set_state(torch.tensor(extra["generator"], dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(extra["torch_rng"], dtype=torch.uint8))
    return int(extra["step"])


def load_checkpoint(path: str, cfg: TrainConfig, model, optimizer, schedule, gen: torch.Generator) -> int:
    from ..io import read
    from ..unwrap import unwrap

    if cfg.fsdp:
        return _fsdp_resume(os.path.join(os.path.dirname(path), CHECKPOINT_DCP), cfg, model, optimizer, schedule, gen)
    _, state, extra = read(path)  # checked, no model built: the run already has its own
    if not isinstance(extra.get("config"), dict) or "step" not in extra:
        raise SparsegraphError(f"{path} is not a checkpoint of `sparsegraph train` (no training state in it)")
    if extra.get("fingerprint") != cfg.fingerprint():
        raise SparsegraphError(f"{path} is a checkpoint of a different run: {_differences(extra['config'], cfg)} "
                               "(resume with the same settings, or train into another directory)")
    unwrap(model).load_state_dict(state)
    optimizer.load_state_dict(extra["optimizer"])
    if schedule is not None and extra.get("schedule") is not None:
        schedule.load_state_dict(extra["schedule"])
    gen.set_state(extra["generator"])
    torch.set_rng_state(extra["torch_rng"])
    return int(extra["step"])


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, out_dir: str, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, overwrite: bool = False) -> list[dict]:
    """Train as configured; returns the logged metrics. `stop_after` ends early (tests, budgets).

    `resume` continues the run in `out_dir` from its checkpoint; otherwise `out_dir` must not hold
    a run already, unless `overwrite` (its checkpoint, metrics and curves are then replaced).
    Under torchrun every rank calls it: data-parallel (DDP, or FSDP2 with `cfg.fsdp`), `batch_size`
    the global batch, and only rank 0 writes metrics and curves."""
    cfg.validate()
    dist = Distributed.from_env(fsdp=cfg.fsdp)
    try:
        return _train(cfg, out_dir, resume, progress, stop_after, overwrite, dist)
    finally:
        dist.close()


def _train(cfg: TrainConfig, out_dir: str, resume: bool, progress: bool, stop_after: int | None, overwrite: bool,
           dist: Distributed) -> list[dict]:
    dist.check_batch(cfg.batch_size)
    ckpt, log_path = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, METRICS)
    _check_run_dir(out_dir, resume, overwrite, cfg.fsdp)
    model, optimizer, schedule, task = build(cfg, dist)
    gen = torch.Generator().manual_seed(cfg.seed)
    main = dist.is_main
    dist.barrier()  # every rank has checked the directory before rank 0 changes it
    if main:
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    start = 0
    if resume:
        start = load_checkpoint(ckpt, cfg, model, optimizer, schedule, gen)
        if main:
            _truncate_log(log_path, start)
        if start >= cfg.steps and main:
            warnings.warn(f"the run in {out_dir} already finished (step {start} of {cfg.steps}); nothing to train",
                          stacklevel=2)
    elif _run_files(out_dir):
        if main:
            warnings.warn(f"replacing the run in {out_dir} ({', '.join(_run_files(out_dir))})", stacklevel=2)
            for name in _run_files(out_dir):
                _remove(os.path.join(out_dir, name))
        dist.barrier()
    base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = _progress(progress and main, cfg, start, end)
    try:
        for step in range(start, end):
            x, y = task.train_batch(cfg.batch_size, gen)  # the global batch, the same on every rank
            x, y = dist.shard_batch(x), dist.shard_batch(y)
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * lr_factor(cfg, step)
            optimizer.zero_grad(set_to_none=True)
            loss = task_loss(task, model(x), y)
            value = dist.mean(loss).item()  # the global batch's loss
            if not math.isfinite(value):
                raise SparsegraphError(f"loss is {value} at step {step}; lower --lr")
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            record = {"step": step + 1, "loss": value, "lr": optimizer.param_groups[0]["lr"],
                      "time": time.time()}
            if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps:
                record.update(evaluate(model, task))  # every rank: FSDP2's forward needs them all
            if main:
                _append(log_path, record)
            if (step + 1) % cfg.checkpoint_interval == 0 or step + 1 == end:
                save_checkpoint(ckpt, cfg, model, optimizer, schedule, step + 1, gen, dist)
            bar(step + 1, record)
    finally:
        bar(None, None)
    dist.barrier()  # the last metrics line is written before anyone reads the log
    metrics = read_metrics(log_path)
    if main:
        plot_curves(metrics, os.path.join(out_dir, "curves.png"), title=_title(cfg))
    return metrics


RUN_FILES = (CHECKPOINT, CHECKPOINT_DCP, METRICS, "curves.png")


def _run_files(out_dir: str) -> list[str]:
    return [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def _check_run_dir(out_dir: str, resume: bool, overwrite: bool, fsdp: bool = False) -> None:
    """Before any work: the directory can hold a run, and holds the right one."""
    check_writable(out_dir, directory=True)
    if resume and overwrite:
        raise SparsegraphError("--resume continues a run and --overwrite replaces it: choose one")
    if resume and not os.path.exists(os.path.join(out_dir, CHECKPOINT_DCP if fsdp else CHECKPOINT)):
        raise SparsegraphError(f"--resume: no {'FSDP2 ' if fsdp else ''}checkpoint in {out_dir}")
    existing = _run_files(out_dir)
    if not resume and not overwrite and existing:
        raise SparsegraphError(f"{out_dir} already holds a run ({', '.join(existing)}): --resume continues it, "
                               "--overwrite replaces it, or choose another directory")


def _title(cfg: TrainConfig) -> str:
    what = cfg.transform or "dense"
    return f"{cfg.model} {what} s={cfg.sparsity:g} {cfg.dst} {cfg.parameterization}" + (" +SparseOpt" if cfg.sparseopt else "")


def _append(path: str, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e


def _truncate_log(path: str, step: int) -> None:
    """Rewrite the log with the steps up to the checkpoint's: later lines are trained again after a
    resume, and a line torn by a kill is dropped."""
    if os.path.exists(path):
        keep = [r for r in read_metrics(path) if r["step"] <= step]

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)

        atomic_write(path, write)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a kill in the middle of a write) is
    dropped; a bad line anywhere else is an error naming it."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                break
            raise SparsegraphError(f"{path}, line {i + 1}: not a JSON record ({line[:40]!r})") from None
    return records


def _progress(enabled: bool, cfg: TrainConfig, start: int, end: int):
    if not enabled:
        return lambda *a: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                 TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    p.start()
    tid = p.add_task(_title(cfg), total=end, completed=start, info="")

    def update(step, record):
        if step is None:
            p.stop()
            return
        info = f"loss {record['loss']:.4f}" + (f" val {record['val_loss']:.4f}" if "val_loss" in record else "")
        p.update(tid, completed=step, info=info)
    return update


def plot_curves(metrics: list[dict], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return
    has_acc = any("val_acc" in m for m in metrics)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train", alpha=0.6)
    val = [m for m in metrics if "val_loss" in m]
    ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.set_title(title)
    if has_acc:
        acc = [m for m in metrics if "val_acc" in m]
        axes[0][1].plot([m["step"] for m in acc], [m["val_acc"] for m in acc], "o-")
        axes[0][1].set_xlabel("step"), axes[0][1].set_ylabel("validation accuracy")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
