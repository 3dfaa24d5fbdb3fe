"""Shared bits for the benchmarks: timing, tables, JSON output. Benchmarks never assert on time."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable

import torch

from sparsegraph.fsutil import atomic_write


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


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
        t.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns])
    Console(width=160).print(t)
