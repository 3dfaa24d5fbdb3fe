"""ONNX Runtime (CPU): dense MatMul vs the `ort-block` and `ort-sparse` lowerings, side by side.

Single layers: y = x W^T for PyTorch-layout weights W (out, in) with balanced block masks, as the
lowering passes produce them (`sg.onnx.lower(model, "ort-block" | "ort-sparse")` on a one-MatMul
model with the masked weight as an initializer); GPT-2 small's projections and ResNet-18's
im2col GEMMs (rows = batch x output pixels). End to end: the built-in gpt-mini and CIFAR ResNet-18,
dense and Sparse Wide (balanced block masks), exported with `sg.export_onnx` in every lower mode.

    eta = t_dense(same shape) * rho / t_sparse     (rho = the weight's density; 1 is the physical limit)

All variants of one configuration are timed in the same process, interleaved round by round
(best of the rounds: the machine is shared), on the same inputs.

    python bench/onnx_runtime.py            # the full grid (about 20 minutes on 2 cores)
    python bench/onnx_runtime.py --quick    # a few configurations (about 2 minutes)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, write_json  # noqa: E402

import sparsegraph as sg  # noqa: E402
from sparsegraph.masks import make_mask  # noqa: E402
from sparsegraph.models import builtin  # noqa: E402

GPT2 = [("gpt2 attn.c_proj", 768, 768, 1), ("gpt2 mlp.c_fc", 3072, 768, 1), ("gpt2 mlp.c_proj", 768, 3072, 1)]
# ResNet-18 (CIFAR, 32x32) 3x3 convolutions as im2col GEMMs: (out channels, in channels * 9, output pixels)
RESNET = [("resnet18 layer1 3x3", 64, 576, 1024), ("resnet18 layer2 3x3", 128, 1152, 256),
          ("resnet18 layer3 3x3", 256, 2304, 64), ("resnet18 layer4 3x3", 512, 4608, 16)]


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def side_by_side(calls: dict[str, callable], budget: float, rounds: int = 9) -> dict[str, float]:
    """Seconds per call of every callable: interleaved rounds (each callable runs back to back for a
    fraction of the budget, in turn), the best round of each. The machine is shared, so the fastest
    round is the least disturbed estimate; all variants get the same treatment."""
    per_call = {}
    for name, fn in calls.items():  # warm up, and size each round to ~budget / rounds
        fn()
        t = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - t, 1e-7)
    reps = {name: max(1, int(budget / rounds / len(calls) / t)) for name, t in per_call.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - t) / reps[name])
    return {name: float(np.min(s)) for name, s in samples.items()}


def _session(model, threads: int):
    return sg.onnx.Session(model, threads=threads)


# ---------------------------------------------------------------------------------------------
# single layers
# ---------------------------------------------------------------------------------------------
def _layer_model(W: np.ndarray, rows: int):
    """y = x @ W^T, x (rows, in), W (out, in) read through a Transpose (as exported linears are)."""
    out_f, in_f = W.shape
    g = helper.make_graph([helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
                          "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, in_f])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, out_f])],
                          [numpy_helper.from_array(W, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def bench_layer(name: str, out_f: int, in_f: int, rows: int, sparsity: float, block: int, threads: int,
                budget: float, modes: tuple[str, ...]) -> dict:
    mask = make_mask(f"balanced_block:{block}", (out_f, in_f), 1 - sparsity, seed=0, name=name).numpy()
    W = (np.random.default_rng(0).standard_normal((out_f, in_f)) * mask).astype(np.float32)
    rho = float(np.count_nonzero(W)) / W.size
    x = np.random.default_rng(1).standard_normal((rows, in_f)).astype(np.float32)
    dense = _layer_model(W, rows)
    models = {"dense": dense}
    if "ort-block" in modes:
        models["ort-block"] = sg.onnx.lower(dense, "ort-block", fold=False, block=block, max_density=1.0, check=False)
    if "ort-sparse" in modes:
        models["ort-sparse"] = sg.onnx.lower(dense, "ort-sparse", fold=False, max_density=1.0, check=False)
    sessions = {k: _session(m, threads) for k, m in models.items()}
    ref = sessions["dense"](x)
    for k, s in sessions.items():  # the lowering is exact
        assert np.abs(s(x) - ref).max() <= 1e-3 * np.abs(ref).max(), k
    t = side_by_side({k: (lambda s=s: s(x)) for k, s in sessions.items()}, budget)
    row = {"layer": name, "shape": f"{out_f}x{in_f}", "rows": rows, "sparsity": sparsity, "block": block,
           "density": round(rho, 4), "dense_us": t["dense"] * 1e6}
    for k in modes:
        row[f"{k}_us"] = t[k] * 1e6
        row[f"eta_{k}"] = t["dense"] * rho / t[k]
        row[f"speedup_{k}"] = t["dense"] / t[k]
    return row


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def bench_model(name: str, batch: int, sparsities: list[float], block: int, threads: int, budget: float,
                folder: str) -> list[dict]:
    spec = builtin(name)
    inputs = spec.make_input((batch, *spec.example_inputs[0].shape[1:]))
    feed = [x.numpy() for x in inputs]
    spec.model.eval()
    sessions, flops = {}, {}
    sessions["original dense"] = _session(sg.export_onnx(spec.model, inputs, os.path.join(folder, f"{name}.onnx")),
                                          threads)
    flops["original dense"] = sg.analyze(spec.model, inputs).dense_flops
    modes = ("dense", "ort-block", "ort-sparse") if batch == 1 else ("dense", "ort-block")  # ort-sparse: seconds a call
    for s in sparsities:
        wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", s, mask=f"balanced_block:{block}").eval()
        for mode in modes:
            path = sg.export_onnx(wide, inputs, os.path.join(folder, f"{name}_{s}_{mode}.onnx"), lower=mode)
            sessions[f"wide s={s} {mode}"] = _session(path, threads)
        flops[f"wide s={s}"] = wide.plan.totals["sparse_flops"] * batch // spec.example_inputs[0].shape[0]
    ref = {k: s(*feed) for k, s in sessions.items()}
    for s in sparsities:
        a = ref[f"wide s={s} dense"]
        for mode in modes[1:]:
            assert np.abs(ref[f"wide s={s} {mode}"] - a).max() <= 1e-3 * np.abs(a).max(), mode
    t = side_by_side({k: (lambda s=s: s(*feed)) for k, s in sessions.items()}, budget, rounds=7)
    base = t["original dense"]
    rows = []
    for k, v in t.items():
        rows.append({"model": name, "batch": batch, "variant": k, "ms": v * 1e3, "vs_original": v / base,
                     "sparse_flops": flops.get(k, flops.get(k.rsplit(" ", 1)[0], 0))})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few configurations only")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime intra-op threads")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per configuration")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    quick = args.quick
    budget = args.budget or (0.6 if quick else 1.5)
    shapes = GPT2[:2] + RESNET[2:3] if quick else GPT2 + RESNET
    sparsities = [0.9] if quick else [0.5, 0.75, 0.9, 0.95]
    blocks = [32] if quick else [16, 32, 64]
    batches = [1, 64]
    rows = []
    configs = [(sh, s, b, n) for sh in shapes for s in sparsities for b in blocks for n in batches]
    t0 = time.time()
    for i, ((name, out_f, in_f, pix), s, b, n) in enumerate(configs, 1):
        modes = ("ort-block", "ort-sparse")
        if pix * n * out_f * in_f * (1 - s) > 3e8:  # SparseToDenseMatMul is single-threaded Eigen: seconds a call
            modes = ("ort-block",)
        row = bench_layer(name, out_f, in_f, pix * n, s, b, args.threads, budget, modes)
        row["batch"] = n
        rows.append(row)
        print(f"[{i}/{len(configs)} {time.time() - t0:5.0f}s] {name} {out_f}x{in_f} rows={pix * n} s={s} b={b}: "
              f"dense {row['dense_us']:.0f}us, ort-block {row['ort-block_us']:.0f}us (eta {row['eta_ort-block']:.2f})"
              + (f", ort-sparse {row['ort-sparse_us']:.0f}us (eta {row['eta_ort-sparse']:.2f})"
                 if "ort-sparse_us" in row else ""), flush=True)
    cols = ["layer", "shape", "batch", "rows", "sparsity", "block", "density", "dense_us", "ort-block_us",
            "eta_ort-block", "speedup_ort-block", "ort-sparse_us", "eta_ort-sparse"]
    for r in rows:
        for c in cols:
            r.setdefault(c, float("nan"))
    print_table(f"single layers, ONNX Runtime {ort.__version__} CPU, {args.threads} threads", rows, cols)

    e2e = []
    with tempfile.TemporaryDirectory() as folder:
        models = [("gpt-mini", [0.9] if quick else [0.75, 0.9])] + ([] if quick else [("resnet18", [0.75, 0.9])])
        for name, sps in models:
            for n in ([64] if quick else [1, 64]):
                print(f"[{time.time() - t0:5.0f}s] end to end: {name} batch {n}", flush=True)
                e2e += bench_model(name, n, sps, 32, args.threads, budget * 2, folder)
    print_table("end to end (Sparse Wide, balanced_block:32)", e2e,
                ["model", "batch", "variant", "ms", "vs_original", "sparse_flops"])
    path = write_json("onnx_runtime" + ("_quick" if quick else ""), rows, end_to_end=e2e, threads=args.threads,
                      onnxruntime=ort.__version__, command=" ".join(["python bench/onnx_runtime.py", *(argv or sys.argv[1:])]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
