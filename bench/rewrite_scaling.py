"""Capture, planning and emitting time of a Sparse Wide rewrite of the built-in GPT vs depth.

    python bench/rewrite_scaling.py            # 6, 12, 24, 48, 96 layers
"""
from __future__ import annotations

import argparse
import time

import sparsegraph as sg
from sparsegraph.models import builtin
from sparsegraph.passes.emit_torch import emit
from sparsegraph.passes.sparse_ift import make_plan

from common import print_table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, nargs="+", default=[6, 12, 24, 48, 96])
    p.add_argument("--sparsity", type=float, default=0.75)
    args = p.parse_args()
    rows = []
    for n in args.layers:
        spec = builtin("gpt-mini", n_layer=n)
        t0 = time.perf_counter()
        g = sg.capture(spec.model, spec.example_inputs)
        t1 = time.perf_counter()
        plan = make_plan(g, "sparse_wide", args.sparsity)
        t2 = time.perf_counter()
        emit(g.source, plan)
        t3 = time.perf_counter()
        rows.append({"layers": n, "ops": len(g), "capture_s": t1 - t0, "plan_s": t2 - t1, "emit_s": t3 - t2,
                     "plan_emit_s": t3 - t1, "plan_emit_ms_per_layer": 1000 * (t3 - t1) / n})
    print_table(f"Sparse Wide rewrite of gpt-mini, s={args.sparsity}", rows,
                ["layers", "ops", "capture_s", "plan_s", "emit_s", "plan_emit_s", "plan_emit_ms_per_layer"])
    print("wrote", write_json("rewrite_scaling", rows, sparsity=args.sparsity))


if __name__ == "__main__":
    main()
