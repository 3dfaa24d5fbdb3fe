"""End-to-end inference time of Sparse-IFT models against their dense original.

    python bench/end_to_end.py                 # gpt-mini and resnet18, s = 0.75 and 0.9
    python bench/end_to_end.py --quick         # fewer repeats, s = 0.75 only
    python bench/end_to_end.py --models gpt-mini --sparsity 0.75

For each built-in model and sparsity: the dense original; Sparse Wide run masked-dense (the
trainable `weight * mask` graph), and lowered with `sg.lower` (balanced block masks and uniform
masks); Sparse Parallel, Factorized and Doped folded back with `sg.fold`; and the dense original
captured and folded the same way (BatchNorm into convolutions), the fair reference for the folded
families. All run in eval mode
under `torch.inference_mode()`, timed interleaved in one process (minimum over the repeats, which
is robust to other processes on the machine); the ratio is to the dense original (iso-FLOP: the
goal is 1.0x).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import sparsegraph as sg
from sparsegraph.models import builtin

from common import print_table, write_json

INPUTS = {"gpt-mini": lambda: torch.randint(0, 256, (16, 128), generator=torch.Generator().manual_seed(0)),
          "resnet18": lambda: torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
MASKS = {"gpt-mini": "balanced_block:32", "resnet18": "balanced_block:16"}


def best_times(fns: dict, repeat: int) -> dict:
    """Minimum wall time of each callable, interleaved so all see the same machine state."""
    with torch.inference_mode():
        for f in fns.values():
            f()
        best = {k: float("inf") for k in fns}
        for _ in range(repeat):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t)
    return best


def variants(name: str, sparsity: float, x: torch.Tensor, log) -> dict:
    spec = builtin(name)
    dense = spec.model.eval()
    graph = sg.capture(spec.model, spec.example_inputs)
    out = {"dense original": dense, "dense original, folded": sg.fold(dense, (x,))}
    for mask in (MASKS[name], "uniform"):
        t = time.perf_counter()
        wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", sparsity, mask=mask, graph=graph).eval()
        out[f"sparse_wide {mask} masked-dense"] = wide
        low = sg.lower(wide, example_inputs=(x,))
        out[f"sparse_wide {mask} lowered"] = low
        formats = low.plan.lowering["formats"]
        log(f"  sparse_wide {mask}: hidden sparsity {wide.plan.sparsity_used:.3f}, lowered {formats} "
            f"({time.perf_counter() - t:.1f}s)")
    for family in ("sparse_parallel", "sparse_factorized", "sparse_doped"):
        model = sg.sparsify(spec.model, spec.example_inputs, family, sparsity, graph=graph).eval()
        out[f"{family} folded"] = sg.fold(model, (x,))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt-mini", "resnet18"], choices=list(INPUTS))
    p.add_argument("--sparsity", type=float, nargs="+", default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="s = 0.75 only, fewer repeats")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = args.sparsity or ([0.75] if args.quick else [0.75, 0.9])
    repeat = args.repeat or (5 if args.quick else 15)
    rows, load0 = [], os.getloadavg()
    for name in args.models:
        x = INPUTS[name]()
        for s in sparsities:
            print(f"{name}, s={s}: building variants", flush=True)
            models = variants(name, s, x, lambda m: print(m, flush=True))
            times = best_times({k: (lambda m=m: m(x)) for k, m in models.items()}, repeat)
            base = times["dense original"]
            for k, t in times.items():
                rows.append({"model": name, "input": "x".join(map(str, x.shape)), "sparsity": s, "variant": k,
                             "ms": round(t * 1e3, 3), "ratio_to_dense": round(t / base, 3)})
            print_table(f"{name} s={s}, input {tuple(x.shape)}: inference time vs the dense original",
                        [r for r in rows if r["model"] == name and r["sparsity"] == s],
                        ["variant", "ms", "ratio_to_dense"])
    name = "end_to_end" + ("_quick" if args.quick else "") + (f"_t{args.threads}" if args.threads else "")
    print("wrote", write_json(name, rows, repeat=repeat, timing="min over interleaved repeats",
                              threads=torch.get_num_threads(), load_before=load0, load_after=os.getloadavg()))


if __name__ == "__main__":
    main()
