"""End-to-end inference time of Sparse-IFT models against their dense original.

    python bench/end_to_end.py                 # gpt-mini and resnet18, s = 0.75 and 0.9
    python bench/end_to_end.py --quick         # fewer repeats, s = 0.75 only
    python bench/end_to_end.py --models gpt-mini --sparsity 0.75
    python bench/end_to_end.py --models hf-gpt2 --threads 1 2   # HF GPT-2 (2 layers, d 512, vocab 2048)
    python bench/end_to_end.py --models resnet18 --threads 1    # one model: end_to_end_resnet18_t1.json
    python bench/end_to_end.py --models resnet18 --threads 1 --keep-heap   # freed memory kept (cpu.keep_heap)

For each built-in model and sparsity: the dense original; Sparse Wide run masked-dense (the
trainable `weight * mask` graph), and lowered with `sg.lower` (balanced block masks and uniform
masks); for ResNet-18 also Sparse Wide's graph form with BatchNorm folded into its masked
convolutions (`sg.fold`), then lowered; Sparse Parallel, Factorized and Doped folded back with
`sg.fold`; and the dense original captured and folded the same way (BatchNorm into convolutions),
the fair reference for the folded variants. All run in eval mode
under `torch.inference_mode()` (lowered layers take their one-native-call eager path), timed in
interleaved rounds in one process and reported as medians (`common.medians`); the ratio is to the
dense original (iso-FLOP: the goal is 1.0x). The table names the CPU, its measured fp32 FMA peak
and the thread count, and gives the dense original's GFLOP/s (FlopCounterMode's count) and its
fraction of that peak, and each variant's minor page faults in one call after the timed rounds
(glibc returns large freed blocks to the OS, and a model whose activations are wider can take them
back, zeroed page by page, on every call: `--keep-heap` runs `cpu.keep_heap()` first, which keeps them,
and writes `..._heap_kept.json`; see the README). The lowered variants are decided at the first thread count
given (the cost model is calibrated per thread count).
"""
from __future__ import annotations

import argparse
import time

import torch

import sparsegraph as sg
from sparsegraph.checks import count_flops
from sparsegraph.models import builtin

from common import (add_keep_heap, dense_rate, describe, keep_heap, machine, medians, page_faults,
                    print_table, write_json)

INPUTS = {"gpt-mini": lambda: torch.randint(0, 256, (16, 128), generator=torch.Generator().manual_seed(0)),
          "resnet18": lambda: torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
          "hf-gpt2": lambda: torch.randint(0, 2048, (8, 128), generator=torch.Generator().manual_seed(0))}
MASKS = {"gpt-mini": "balanced_block:32", "resnet18": "balanced_block:16", "hf-gpt2": "balanced_block:32"}


class _Spec:
    def __init__(self, model, example_inputs):
        self.model, self.example_inputs = model, example_inputs


def hf_gpt2() -> _Spec:
    """A Hugging Face GPT-2 from config (2 layers, d 512, vocab 2048, 128 positions), random init."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=512, n_head=8, vocab_size=2048, n_positions=128,
                                  use_cache=False, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return _Spec(transformers.GPT2LMHeadModel(cfg).eval(), (INPUTS["hf-gpt2"](),))


def variants(name: str, sparsity: float, x: torch.Tensor, log) -> dict:
    spec = hf_gpt2() if name == "hf-gpt2" else builtin(name)
    dense = spec.model.eval()
    if name == "hf-gpt2":  # sparse_wide only (the HF model's module form); fold needs a traced model
        out = {"dense original": dense}
        wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", sparsity, mask=MASKS[name]).eval()
        out["sparse_wide masked-dense"] = wide
        out["sparse_wide lowered"] = sg.lower(wide, example_inputs=(x,))
        return out
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
        if mask == MASKS[name] and name == "resnet18":  # the graph form folds BatchNorm into the masked convs
            gm = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", sparsity, mask=mask, graph=graph,
                             output="graph")
            out[f"sparse_wide {mask} BatchNorm folded, lowered"] = sg.lower(sg.fold(gm, (x,)), example_inputs=(x,))
    for family in ("sparse_parallel", "sparse_factorized", "sparse_doped"):
        model = sg.sparsify(spec.model, spec.example_inputs, family, sparsity, graph=graph).eval()
        out[f"{family} folded"] = sg.fold(model, (x,))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt-mini", "resnet18", "hf-gpt2"], choices=list(INPUTS))
    p.add_argument("--sparsity", type=float, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    p.add_argument("--quick", action="store_true", help="s = 0.75 only, fewer rounds")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: PyTorch's)")
    add_keep_heap(p)
    args = p.parse_args()
    heap_kept = keep_heap(p, args)
    sparsities = args.sparsity or ([0.75] if args.quick else [0.75, 0.9])
    rounds = args.rounds or (7 if args.quick else 15)
    rows, machines = [], []
    if args.threads:  # `sg.lower` decides with the cost model of the thread count it runs at: the first one timed
        torch.set_num_threads(args.threads[0])
    for name in args.models:
        x = INPUTS[name]()
        for s in sparsities:
            print(f"{name}, s={s}: building variants", flush=True)
            models = variants(name, s, x, lambda m: print(m, flush=True))
            flop = count_flops(models["dense original"], (x,))
            for threads in args.threads or [torch.get_num_threads()]:
                torch.set_num_threads(threads)
                machines.append(machine() | {"heap_kept": args.keep_heap})
                print(describe(machines[-1]), flush=True)
                with torch.inference_mode():
                    times = medians({k: (lambda m=m: m(x)) for k, m in models.items()}, rounds)
                    faults = {k: page_faults(lambda m=m: m(x)) for k, m in models.items()}
                base = times["dense original"]
                for k, t in times.items():
                    rows.append({"model": name, "input": "x".join(map(str, x.shape)), "sparsity": s,
                                 "threads": threads, "variant": k, "ms": round(t * 1e3, 3),
                                 "ratio_to_dense": round(t / base, 3), "page_faults": faults[k]})
                    if k == "dense original":
                        rows[-1] |= dense_rate(flop, base, machines[-1])
                print_table(f"{name} s={s}, input {tuple(x.shape)}, {threads} thread(s), {machines[-1]['cpu']}: "
                            "inference time vs the dense original",
                            [r for r in rows if r["model"] == name and r["sparsity"] == s and r["threads"] == threads],
                            ["variant", "ms", "ratio_to_dense", "gflops", "peak_frac", "page_faults"])
    subset = sorted(args.models) != sorted(p.get_default("models"))
    models = "_" + "-".join(args.models) if subset else ""  # a subset of the models writes its own file
    name = ("end_to_end" + models + ("_quick" if args.quick else "") + "".join(f"_s{s:g}" for s in args.sparsity or [])
            + "".join(f"_t{t}" for t in args.threads or []) + heap_kept)
    print("wrote", write_json(name, rows, machines=machines, heap_kept=args.keep_heap, rounds=rounds,
                              timing="median of interleaved rounds"))


if __name__ == "__main__":
    main()
