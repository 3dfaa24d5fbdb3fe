"""sparsegraph calibrate: measure the lowering cost model on this machine, cache it, print it.

    sparsegraph calibrate                 remeasure (a few seconds), cache per CPU and thread count
    sparsegraph calibrate --quick         a shorter, noisier measurement
    sparsegraph calibrate --threads 1     for 1 thread (lowering uses the calibration of its thread count)
    sparsegraph calibrate -o model.json   also write the model, to pin it: SPARSEGRAPH_COST_MODEL=model.json
    sparsegraph calibrate --check         then time dense against sparse on GPT-2 layers: is sparse
                                          faster wherever the model picks it?
    sparsegraph calibrate --check-only    check the model lowering uses now, without remeasuring
    sparsegraph calibrate --check --onednn  the same against oneDNN with pre-packed weights (the dense
                                          linear layers of a frozen graph with a dynamic batch)

The check reports; it does not fail on a slower configuration (timings on a busy machine are noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from ..backends import cost_model as cm
from ..cli import console
from ..fsutil import check_writable
from ..graph import SparsegraphError

HELP = "measure this machine's lowering cost model (cached per CPU) and print it; --check tests its choices"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="threads to calibrate for (default: PyTorch's thread count)")
    p.add_argument("--quick", action="store_true",
                   help=f"time for about {cm.QUICK_BUDGET_S:g} s instead of {cm.BUDGET_S:g} s (noisier); "
                        "with --check, shorter timings per layer")
    p.add_argument("--check", action="store_true",
                   help="after calibrating, time dense vs sparse on GPT-2 layers where the model picks sparse")
    p.add_argument("--check-only", action="store_true",
                   help="check the model lowering uses now (cached, pinned or calibrated on first use)")
    p.add_argument("--onednn", action="store_true",
                   help="check against dense oneDNN with pre-packed weights (what a frozen torch.compile graph "
                        "with a dynamic batch runs) instead of F.linear")
    p.add_argument("-o", "--output", help="also write the model as JSON here (for SPARSEGRAPH_COST_MODEL=FILE)")
    p.add_argument("--json", action="store_true", help="print the machine, model and check rows as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None and args.threads < 1:
        raise SparsegraphError(f"--threads must be at least 1, got {args.threads}")
    if args.check and args.check_only:
        raise SparsegraphError("give --check (calibrate, then check) or --check-only, not both")
    if args.onednn and not (args.check or args.check_only):
        raise SparsegraphError("--onednn chooses the dense baseline of --check or --check-only; give one of them")
    if args.check_only and args.output:
        raise SparsegraphError("--output writes a new calibration; --check-only does not calibrate")
    if args.output:
        check_writable(args.output)
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..backends import cpu, cpu_op

    threads = torch.get_num_threads()
    peak = cpu.fma_peak(threads)
    machine = {"cpu": cm.cpu_name(), "threads": threads, "cores": os.cpu_count(),
               "fp32_peak_gflops": round(peak / 1e9, 1) if peak else None,
               "native_kernels": cpu.available(), "cpp_op": cpu_op.loaded(),
               "load_before": [round(v, 2) for v in os.getloadavg()]}
    cache, busy = None, cm.busy()
    if busy:
        print(f"note: {busy}; timings will be noisy and slow", file=sys.stderr, flush=True)
    if args.check_only:
        model = cm.load()
    else:
        budget = cm.QUICK_BUDGET_S if args.quick else cm.BUDGET_S
        print(f"calibrating for {machine['cpu']} at {threads} thread(s), about {budget + 1:.0f} s ...",
              file=sys.stderr, flush=True)
        model = cm.calibrate(budget, save=False)
        cache = cm.save_cache(model)
        if args.output:
            model.save(args.output)
    progress = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    rows = cm.check(model, seconds=0.03 if args.quick else 0.1, log=progress, onednn=args.onednn) \
        if args.check or args.check_only else None
    machine["load_after"] = [round(v, 2) for v in os.getloadavg()]
    if args.json:
        print(json.dumps({"machine": machine, "model": asdict(model), "cache": cache, "output": args.output,
                          "check": rows}, indent=1))
        return 0
    _print_model(model, machine, peak)
    if cache:
        print(f"cached in {cache}" + (f"; written to {args.output}" if args.output else ""))
    pinned = os.environ.get(cm.ENV, "").strip()
    if pinned not in ("", "auto"):
        print(f"note: {cm.ENV}={pinned} is set, so lowering uses that model, not this calibration")
    if rows is not None:
        _print_check(rows, args.onednn)
    return 0


def _print_model(model: cm.CostModel, machine: dict, peak: float | None) -> None:
    from rich.table import Table

    print(f"{machine['cpu']}, {machine['threads']} thread(s) of {machine['cores']} cores, fp32 FMA peak "
          + (f"{peak / 1e9:.1f} GFLOP/s" if peak else "unknown (no native kernels)")
          + f", load average {machine['load_before']} -> {machine['load_after']}")
    print(f"model: {model.source}")
    densities = sorted(model.flops_sparse, key=int)
    blocks = sorted({b for by_b in model.flops_sparse.values() for b in by_b}, key=int)
    t = Table(title="linear rates, GFLOP/s of useful work (t = c + 2 MACs / F)", header_style="bold")
    onednn = ["dense (oneDNN, pre-packed)"] if model.flops_dense_packed else []
    for col in ["rows M", "dense (F.linear)", *onednn, "stored", *(f"sparse b={b}" for b in blocks)]:
        t.add_column(col, justify="right")
    for M in sorted(model.flops_dense, key=int):
        dense = [M, f"{model.flops_dense[M] / 1e9:.3g}",
                 *([f"{model.rate_dense(int(M), onednn=True) / 1e9:.3g}"] if onednn else [])]
        for d in densities:  # one line per density, the dense columns on the first
            sparse = (model.rate_sparse(int(M), int(b), int(d) / 100) for b in blocks)
            t.add_row(*dense, f"{d}%", *(f"{r / 1e9:.3g}" for r in sparse))
            dense = [""] * len(dense)
    console().print(t)
    top = max(model.flops_dense, key=int)
    dense = model.flops_dense[top]
    print(f"dense GEMM at {top} rows: {dense / 1e9:.1f} GFLOP/s"
          + (f" = {dense / peak:.0%} of the FMA peak" if peak else "")
          + (f"; oneDNN pre-packed {model.flops_dense_packed[top] / 1e9:.1f}" if top in model.flops_dense_packed
             else ""))
    print(f"fixed cost per call: dense {model.c_dense * 1e6:.1f} us, sparse {model.c_sparse * 1e6:.1f} us"
          + (f" (convolution {model.c_sparse_conv * 1e6:.1f} us)" if model.c_sparse_conv is not None else ""))
    print(f"conv 3x3: dense (oneDNN) {model.flops_conv / 1e9:.1f} GFLOP/s, sparse "
          + "; ".join(f"{d}% stored: " + ", ".join(f"b={b} {by_b[b] / 1e9:.3g}" for b in sorted(by_b, key=int))
                      for d, by_b in sorted(model.flops_cols.items(), key=lambda i: int(i[0]))))


def _print_check(rows: list[dict], onednn: bool = False) -> None:
    from rich.table import Table

    dense = "dense oneDNN (pre-packed)" if onednn else "dense F.linear"
    t = Table(title=f"check: {dense} vs the op in the format the model picks (x = dense time / sparse time)",
              header_style="bold")
    for col in ("layer", "batch", "sparsity", "mask block", "choice", "predicted x", "measured x", "dense us",
                "sparse us", "verdict"):
        t.add_column(col, justify="right")
    for r in rows:
        verdict = ("faster" if r["ok"] else "SLOWER") if r["picked"] else \
            ("kept dense; sparse faster" if r["measured_x"] > 1 else "kept dense")
        t.add_row(r["layer"], str(r["batch"]), f"{r['sparsity']:g}", str(r["mask_block"]), r["choice"],
                  f"{r['predicted_x']:.2f}", f"{r['measured_x']:.2f}", f"{r['dense_us']:.1f}",
                  f"{r['sparse_us']:.1f}", verdict)
    console().print(t)
    picked = [r for r in rows if r["picked"]]
    slower = [r for r in picked if not r["ok"]]
    missed = [r for r in rows if not r["picked"] and r["measured_x"] > 1 / cm.MARGIN]
    print(f"the model picks sparse in {len(picked)} of {len(rows)} configurations; sparse measured slower than "
              f"dense in {len(slower)} of them" + (" (timings are noisy on a busy machine: rerun to confirm)"
                                                   if slower else "")
              + f"; kept dense where sparse measured more than {1 / cm.MARGIN:.2f}x faster: {len(missed)}")
