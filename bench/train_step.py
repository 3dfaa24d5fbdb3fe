"""Training-step time and memory of Sparse Wide models against their dense original.

    python bench/train_step.py                          # gpt-mini and HF GPT-2, s = 0.75 and 0.9
    python bench/train_step.py --quick                  # fewer rounds and measured steps
    python bench/train_step.py --models hf-gpt2 --sparsity 0.9 --threads 2
    python bench/train_step.py --quick --threads 1 --keep-heap    # freed memory kept (cpu.keep_heap) while timing

A step is forward, loss, backward, AdamW `step` and `zero_grad()` (gradients set to None). For
every model and sparsity s, three variants:

  dense          the original model
  masked-dense   sg.sparsify(model, x, "sparse_wide", s, mask="balanced_block:32"): each sparse weight a
                 dense parameter times its mask, AdamW state for every entry
  compact        sg.lower(masked-dense): each sparse weight stored as its nonzero blocks (`weight_values`
                 and int32 BSR index buffers), its gradient and AdamW state per stored value
  compact+ckpt   the same with activation checkpointing per transformer block (`sg.checkpoint_blocks`):
                 Sparse Wide widens the activations by 1/sqrt(1 - s), which compact storage does not
                 shrink; recomputing each block in backward keeps only the blocks' inputs

Models: the built-in gpt-mini (4 layers, d 128, batch 16 x 128 tokens) and a Hugging Face GPT-2 built
from its config (2 layers, n_embd 512, vocab 2048, n_positions 128, batch 8 x 128 tokens,
use_cache=False, random init; nothing is downloaded).

Time is the median of interleaved rounds of one step per variant (`common.medians`), all variants of
a (model, s) in one process. Memory is reported two ways:

  state   parameters, gradients, optimizer state and buffers, in bytes, counted exactly (`state_bytes`)
  peak    each variant alone in a fresh process: the highest resident set size during the measured
          steps minus the resident size before the model was built. Building (the dense original,
          `sg.sparsify`, `sg.lower`) is not part of training, so its garbage is collected and returned
          to the system (malloc_trim) and the high-water mark reset (/proc/self/clear_refs) before the
          steps; the peak then holds the model, its optimizer state, gradients and activations. The
          process runs with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_): every
          tensor of that size or more is its own mapping, returned to the system when freed, so the
          resident size follows live memory instead of the allocator's free lists (with the default,
          adaptive threshold, freed activations stay resident and the peak depends on allocation order).

`--keep-heap` runs `cpu.keep_heap()` before timing (the memory runs keep their own setting): a
step frees and allocates its activations again, and glibc otherwise returns the large ones to the
system and takes them back, zeroed page by page (see the README).

Ratios are to the dense original, whose row also gives its GFLOP/s (FlopCounterMode's count of one
step's forward and backward) and that rate's fraction of the machine's FMA peak. The targets (issue
15): a step within 1.4x of the dense step, and at s = 0.9 the compact form's peak within 1.5x of
the dense original's.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph.checks import call_flops
from sparsegraph.models import builtin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_keep_heap, dense_rate, describe, keep_heap, machine, medians,  # noqa: E402
                    print_table, write_json)

MASK = "balanced_block:32"
VARIANTS = ("dense", "masked-dense", "compact", "compact+ckpt")
MODELS = ("gpt-mini", "hf-gpt2")
MB = 2 ** 20
RESULT = "RESULT "  # the line a memory run reports on
MMAP_THRESHOLD = 65536  # bytes: glibc serves (and returns) every allocation this large by its own mapping


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """A dense original and its training batch."""
    name: str
    build: Callable[[], nn.Module]  # the dense original, random init
    vocab: int
    batch: tuple[int, int]  # (B, T) tokens

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): token ids (B, T) and next-token targets (B, T), fixed by a seed."""
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randint(0, self.vocab, self.batch, generator=g) for _ in range(2))


def _gpt_mini(**options) -> nn.Module:
    return builtin("gpt-mini", **options).model


def _hf_gpt2(**options) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(**({"n_layer": 2, "n_embd": 512, "n_head": 8, "vocab_size": 2048, "n_positions": 128,
                                      "bos_token_id": 0, "eos_token_id": 0, "use_cache": False} | options))
    return transformers.GPT2LMHeadModel(cfg)


def workload(name: str, options: dict | None = None, batch: tuple[int, int] | None = None) -> Workload:
    """A workload by name (`gpt-mini`, `hf-gpt2`); `options` change the model config (smaller test models)."""
    options = options or {}
    if name == "gpt-mini":
        return Workload(name, lambda: _gpt_mini(**options), 256, tuple(batch or (16, 128)))
    if name == "hf-gpt2":
        return Workload(name, lambda: _hf_gpt2(**options), options.get("vocab_size", 2048), tuple(batch or (8, 128)))
    raise SystemExit(f"unknown model {name!r}; choose gpt-mini or hf-gpt2")


def build_variants(w: Workload, sparsity: float, variants=VARIANTS, dense: nn.Module | None = None,
                   verify: bool = True) -> dict:
    """{variant: model} for the requested variants at `sparsity` (the dense original made once);
    `verify=False` skips sg.sparsify's check of the rewritten module against its graph."""
    dense = dense if dense is not None else w.build()
    out = {"dense": dense} if "dense" in variants else {}
    if set(variants) - {"dense"}:
        x = w.inputs()[0]
        wide = sg.sparsify(dense, (x,), "sparse_wide", sparsity, mask=MASK, verify_module=verify)
        if "masked-dense" in variants:
            out["masked-dense"] = wide
        if "compact" in variants or "compact+ckpt" in variants:
            low = sg.lower(wide, example_inputs=(x,))
            if "compact" in variants:
                out["compact"] = low
            if "compact+ckpt" in variants:
                out["compact+ckpt"] = sg.checkpoint_blocks(copy.deepcopy(low) if "compact" in variants else low)
    return {v: m.train() for v, m in out.items()}


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with PyTorch's defaults and a weight decay: one state tensor pair per trainable parameter."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward, next-token cross-entropy, backward, AdamW step, zero_grad; returns the loss."""
    loss = F.cross_entropy(logits(model(x)).flatten(0, 1), y.flatten())  # (B T, vocab) vs (B T,)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FlopCounterMode's count of one `train_step`, on a copy of `model` (a step updates its weights)."""
    probe = copy.deepcopy(model)
    return call_flops(lambda: train_step(probe, optimizer(probe), x, y))


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Exact bytes of what training keeps: parameters, their gradients (one per trainable parameter,
    alive from backward to zero_grad), the optimizer's state tensors, and buffers (masks, BSR indices)."""
    params = list(model.parameters())
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out = {"params": _nbytes(params), "grads": _nbytes(p for p in params if p.requires_grad),
           "optimizer": _nbytes(state), "buffers": _nbytes(model.buffers())}
    out["total"] = sum(out.values())
    return out


def _status(key: str) -> int:
    """A /proc/self/status size (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _release() -> None:
    """Collect garbage and hand freed heap memory back to the system, so it no longer counts as resident."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset this process's resident high-water mark (Linux >= 4.0); False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status("VmHWM") <= _status("VmRSS") + 4 * MB


TINY = {"gpt-mini": ({"n_layer": 1, "n_embd": 64, "n_head": 2}, (2, 32)),
        "hf-gpt2": ({"n_layer": 1, "n_embd": 64, "n_head": 2, "vocab_size": 128, "n_positions": 32}, (2, 16))}


def _warm_up(name: str) -> None:
    """Build and train a tiny model of the same kind in every variant first, so that what building and
    training load for any variant (torch.export and its imports, the native kernels, the thread pool) is
    resident before the baseline of every variant alike, and only the model's own memory is counted."""
    options, batch = TINY[name]
    w = workload(name, options, batch)
    x, y = w.inputs()
    for model in build_variants(w, 0.75, verify=False).values():
        train_step(model, optimizer(model), x, y)


def formats_of(model: nn.Module) -> dict | None:
    """What sg.lower chose for `model` ({format: layers}), None if it was not lowered."""
    plan = sg.plan_of(model)
    return plan.lowering.get("formats") if plan is not None else None


def memory_run(job: dict) -> dict:
    """One variant's memory, measured in this (fresh) process: see the module docstring."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    _warm_up(job["model"])
    _release()
    base = _status("VmRSS")
    w = workload(job["model"], job.get("options"), job.get("batch"))
    model = build_variants(w, job["sparsity"], (job["variant"],))[job["variant"]]
    formats = formats_of(model)
    _release()
    built = _status("VmRSS") - base
    opt = optimizer(model)
    x, y = w.inputs()
    reset = _reset_peak()
    losses = [train_step(model, opt, x, y) for _ in range(job["steps"])]
    peak = _status("VmHWM") - base if reset else None
    return {"model": job["model"], "variant": job["variant"], "sparsity": job["sparsity"], "steps": job["steps"],
            "resident_after_build": built, "step_peak": peak, "state": state_bytes(model, opt),
            "formats": formats, "losses": losses,
            "note": None if reset else "the kernel refused to reset the high-water mark (/proc/self/clear_refs)"}


def measure_memory(job: dict, timeout: float = 1800) -> dict:
    """`memory_run(job)` in a fresh Python process (this script with --memory-child)."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(job)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    return parse_result(proc.stdout, proc.stderr, proc.returncode, job)


def parse_result(stdout: str, stderr: str, returncode: int, job: dict) -> dict:
    """The dict a memory run printed on its RESULT line; a clear error with its stderr's tail otherwise."""
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT)]
    if returncode != 0 or not lines:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"memory run {job} failed (exit {returncode}): {tail or 'no RESULT line'}")
    return json.loads(lines[-1][len(RESULT):])


# ---------------------------------------------------------------------------------------------
# rows and ratios
# ---------------------------------------------------------------------------------------------
def ratios(rows: list[dict]) -> list[dict]:
    """Each row with its time, peak and state ratios to the dense row of the same model and sparsity."""
    out = []
    for r in rows:
        base = [d for d in rows if d["model"] == r["model"] and d["sparsity"] == r["sparsity"]
                and d["variant"] == "dense"]
        if len(base) != 1:
            raise ValueError(f"{r['model']} s={r['sparsity']}: expected one dense row to compare with, "
                             f"found {len(base)}")
        d = base[0]

        def ratio(key: str) -> float | None:
            return round(r[key] / d[key], 3) if r.get(key) is not None and d.get(key) else None
        out.append(r | {"time_ratio": ratio("ms"), "peak_ratio": ratio("peak_mb"), "state_ratio": ratio("state_mb")})
    return out


def row(model: str, sparsity: float, variant: str, seconds: float, mem: dict) -> dict:
    st = mem["state"]
    return {"model": model, "sparsity": sparsity, "variant": variant, "ms": round(seconds * 1e3, 2),
            "peak_mb": None if mem["step_peak"] is None else round(mem["step_peak"] / MB, 1),
            "state_mb": round(st["total"] / MB, 1), "params_mb": round(st["params"] / MB, 1),
            "optimizer_mb": round(st["optimizer"] / MB, 1), "buffers_mb": round(st["buffers"] / MB, 1),
            "resident_mb": round(mem["resident_after_build"] / MB, 1), "formats": mem["formats"]}


def check_same_lowering(job: dict, timed: dict | None, measured: dict | None) -> None:
    """The memory run of `job` must have lowered its model as the timed one was: a fresh process with
    another cost model, or without the native kernels (one warning in its stderr), would keep layers dense."""
    if timed != measured:
        raise RuntimeError(f"{job['model']} s={job['sparsity']} {job['variant']}: the memory run lowered to "
                           f"{measured}, the timed model to {timed}; the two processes disagree on the cost model "
                           f"or on the native kernels")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.75, 0.9])
    p.add_argument("--quick", action="store_true", help="3 timing rounds and 2 measured steps per memory run")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 9, 3 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    add_keep_heap(p)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(RESULT + json.dumps(memory_run(json.loads(args.memory_child))), flush=True)
        return
    heap_kept = keep_heap(p, args)
    threads = torch.get_num_threads()
    rounds = args.rounds or (3 if args.quick else 9)
    steps = 2 if args.quick else 3
    here = machine()
    print(describe(here), flush=True)
    rows = []
    for name in args.models:
        w = workload(name)
        x, y = w.inputs()
        dense = w.build().train()
        flop = step_flops(dense, x, y)
        dense_mem = measure_memory({"model": name, "variant": "dense", "sparsity": 0.0, "steps": steps,
                                    "threads": threads})
        for s in args.sparsity:
            print(f"{name}, s={s}: building, timing {rounds} interleaved rounds", flush=True)
            models = build_variants(w, s, dense=dense)
            opts = {v: optimizer(m) for v, m in models.items()}
            times = medians({v: (lambda m=m, o=opts[v]: train_step(m, o, x, y)) for v, m in models.items()},
                            rounds=rounds)
            formats = {v: formats_of(m) for v, m in models.items()}
            del models, opts
            _release()
            for v in VARIANTS:
                job = {"model": name, "variant": v, "sparsity": s, "steps": steps, "threads": threads}
                mem = dense_mem if v == "dense" else measure_memory(job)
                check_same_lowering(job, formats[v], mem["formats"])
                rows.append(row(name, s, v, times[v], mem) | (dense_rate(flop, times[v], here) if v == "dense" else {}))
            done = ratios([r for r in rows if r["model"] == name and r["sparsity"] == s])
            print_table(f"{name} s={s}, batch {w.batch[0]}x{w.batch[1]}: one AdamW training step vs the dense original",
                        done, ["variant", "ms", "time_ratio", "gflops", "peak_frac", "peak_mb", "peak_ratio",
                               "state_mb", "state_ratio", "params_mb", "optimizer_mb", "buffers_mb"])
    rows = ratios(rows)
    out = "train_step" + ("_quick" if args.quick else "") + (f"_t{args.threads}" if args.threads else "") \
        + heap_kept
    print("wrote", write_json(out, rows, heap_kept=args.keep_heap, rounds=rounds, measured_steps=steps, mask=MASK,
                              timing="median of interleaved rounds (common.medians)",
                              memory="peak: VmHWM during the steps minus VmRSS before the build, fresh process per "
                                     f"variant, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; state: exact bytes of "
                                     "parameters, gradients, optimizer state, buffers",
                              optimizer="torch.optim.AdamW(lr=1e-4, weight_decay=0.01), PyTorch defaults"))


if __name__ == "__main__":
    main()
