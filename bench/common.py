"""Shared bits for the benchmarks: the machine, honest timing, dense baselines, tables, JSON.

Every benchmark states what it ran on (`machine()`: CPU model, threads, the CPU's measured fp32 FMA
peak) and times its candidates with `medians()`: interleaved rounds, each in a new order, so all of
them see the same machine state and none always runs after the same neighbour, and the median of
each, so one lucky or unlucky round does not decide. Dense baselines are the faster of PyTorch's
default (MKL) and oneDNN with a pre-packed weight (`dense_linear`), printed with their GFLOP/s and
fraction of peak. Benchmarks never assert on time.
"""
from __future__ import annotations

import json
import os
import platform
import resource
from typing import Callable

import torch
import torch.nn.functional as F

from sparsegraph.backends import cpu, cpu_op
from sparsegraph.backends.cost_model import cpu_name, cpuinfo, medians as cost_medians, packed_linear
from sparsegraph.fsutil import atomic_write


def cpu_id() -> str:
    """The CPU's family and model numbers (x86), which tell apart CPUs that share a model name: a
    virtual machine's 'AMD EPYC' is a Zen 3 (family 25, model 1), a Zen 4 (family 25, model 17) or a
    Zen 5 (family 26)."""
    info = cpuinfo("cpu family", "model")
    return f"family {info['cpu family']}, model {info['model']}" if len(info) == 2 else ""


def machine() -> dict:
    """What a speed figure depends on: CPU model, threads, the measured fp32 FMA peak (GFLOP/s), the
    native kernels' vector width (bytes: 64 with AVX-512, 32 with AVX2), whether the op's CPU kernel
    is the C++ one (`cpu_op`), load."""
    threads = torch.get_num_threads()
    peak = cpu.fma_peak(threads)
    return {"cpu": cpu_name(), "cpu_id": cpu_id(), "threads": threads, "cores": os.cpu_count(),
            "fp32_peak_gflops": round(peak / 1e9, 1) if peak else None,
            "vector_bytes": cpu.library().vector_bytes if cpu.available() else None,
            "op_kernel": "C++" if cpu_op.loaded() else "Python", "torch": torch.__version__,
            "python": platform.python_version(), "load": [round(v, 2) for v in os.getloadavg()]}


def add_keep_heap(p) -> None:
    """The `--keep-heap` option of the timing benchmarks (see `keep_heap`)."""
    p.add_argument("--keep-heap", action="store_true", help="keep freed memory in the heap (cpu.keep_heap)")


def keep_heap(p, args) -> str:
    """`--keep-heap`: `cpu.keep_heap()` now (glibc only, else the parser's error), so that wide activations
    freed and allocated again are not faulted back in on every call; returns the result name's suffix."""
    if not args.keep_heap:
        return ""
    if not cpu.keep_heap():
        p.error("--keep-heap: glibc's malloc only")
    return "_heap_kept"


def describe(m: dict | None = None) -> str:
    """One line naming the machine, printed at the top of every benchmark."""
    m = m or machine()
    return (f"{m['cpu']}" + (f" ({m['cpu_id']})" if m.get("cpu_id") else "") +
            f", {m['threads']} thread(s), fp32 FMA peak {m['fp32_peak_gflops']} GFLOP/s"
            + (f" ({m['vector_bytes']}-byte vectors)" if m.get("vector_bytes") else "") + ", "
            f"torch {m['torch']}, load {m['load']}")


def medians(fns: dict[str, Callable[[], object]], rounds: int = 9, budget_s: float | None = None,
            inner: int = 1) -> dict[str, float]:
    """`rounds` interleaved rounds, each in a new order, ending early after three once `budget_s` has
    passed: the library's own timing (`cost_model.medians`), which its calibration uses too."""
    return cost_medians(fns, rounds, seconds=budget_s, inner=inner)


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, Callable]:
    """The dense baselines of y = x w^T + bias: PyTorch's default (`mkl`) and oneDNN with the weight
    pre-packed for this batch (`onednn`, what a frozen Inductor graph with a dynamic batch runs), when
    this build has it."""
    fns = {"mkl": lambda: F.linear(x, w, bias)}
    if (onednn := packed_linear(x, w, bias)) is not None:
        fns["onednn"] = onednn
    return fns


def page_faults(fn: Callable[[], object]) -> int:
    """Minor page faults during one call of `fn`: memory the allocator gave back to the OS and takes
    again, zeroed page by page (glibc does this to large tensors freed and re-allocated every call)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def gflops(flop: float, seconds: float) -> float:
    return flop / seconds / 1e9


def dense_rate(flop: float, seconds: float, m: dict) -> dict:
    """A dense baseline's `gflops` and its fraction of the machine's FMA peak (`peak_frac`), for its row."""
    rate, peak = gflops(flop, seconds), m["fp32_peak_gflops"]
    return {"gflops": round(rate, 1), "peak_frac": round(rate / peak, 3) if peak else None}


def write_json(name: str, rows: list[dict], **extra) -> str:
    folder = os.path.join(os.path.dirname(__file__), "results")
    path = os.path.join(folder, f"{name}.json")
    text = json.dumps({"benchmark": name, "machine": machine(), **extra, "rows": rows}, indent=1)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
    return path


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, header_style="bold")
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns])
    Console(width=160).print(t)
