"""ONNX Runtime (CPU): dense MatMul against the `ort-block` formulations, `ort-sparse` and `ort-native`.

Single layers: y = x W^T for PyTorch-layout weights W (out, in) with balanced block masks, lowered
by the same passes as `sg.onnx.lower(model, "ort-block", layout=...)` on a one-MatMul model with the
masked weight as an initializer: GPT-2 small's projections and the Sparse Wide gpt-mini's own
layers (d 256 at s = 0.75, 416 at s = 0.9), plus ResNet-18's im2col GEMMs in the full grid.
`ort-native` (the custom op sparsegraph.SparseLinear, the native kernels in ONNX Runtime) is timed
when ONNX Runtime's C API headers are there (`sparsegraph ort-headers`).
End to end: the built-in gpt-mini (balanced_block:32) at 1 x 64 and 16 x 128 tokens, and ResNet-18 (CIFAR,
balanced_block:16) at batch 1 and 32, dense original against Sparse Wide (s = 0.75 and 0.9) exported with
`sg.export_onnx` as a dense file and lowered: gpt-mini with `ort-block` and `ort-native`, ResNet-18 (whose
convolutions only `ort-native` lowers, as sparsegraph.SparseConv) with `ort-native`.

    eta = t_dense(same shape) * rho / t_sparse     (rho = the weight's density; 1 is the physical limit)

Every candidate of one configuration is timed in the same process with `common.medians`
(interleaved rounds, the median of each) on the same inputs, after its output was checked against
the dense session. The dense MatMul's GFLOP/s and its fraction of the CPU's measured fp32 FMA peak
are printed beside it. The sessions' idle threads sleep instead of spinning (`spinning=False`): with
several threads, each session's own pool would otherwise spin between its runs and slow the next
session's on the same cores. Nothing here asserts on time.

    python bench/onnx_runtime.py                # the full grid (about 10 minutes on 2 cores)
    python bench/onnx_runtime.py --quick        # GPT-2 and gpt-mini shapes, end to end (about 4 minutes)
    python bench/onnx_runtime.py --threads 1
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
from common import describe, machine, medians, print_table, write_json  # noqa: E402

import sparsegraph as sg  # noqa: E402
from sparsegraph.masks import make_mask  # noqa: E402
from sparsegraph.models import builtin  # noqa: E402
from sparsegraph.onnx import native  # noqa: E402
from sparsegraph.onnx.lowering import LAYOUTS  # noqa: E402

NATIVE = native.include_dir() is not None  # ort-native needs ONNX Runtime's C API headers

GPT2 = [("gpt2 c_attn", 2304, 768, 1), ("gpt2 c_fc", 3072, 768, 1), ("gpt2 mlp.c_proj", 768, 3072, 1)]
# the Sparse Wide gpt-mini's layers (n_embd 128 widened to 256 / 416): (name, out, in, sparsity)
MINI = {0.75: [("mini75 c_attn", 768, 256), ("mini75 c_fc", 1024, 256), ("mini75 mlp.c_proj", 256, 1024)],
        0.9: [("mini90 c_attn", 1248, 416), ("mini90 c_fc", 1632, 416), ("mini90 mlp.c_proj", 416, 1632)]}
# ResNet-18 (CIFAR, 32x32) 3x3 convolutions as im2col GEMMs: (out channels, in channels * 9, output pixels)
RESNET = [("resnet18 layer2", 128, 1152, 256), ("resnet18 layer4", 512, 4608, 16)]
TOLERANCE = 1e-4  # relative to the largest output, as in the tests


class Mismatch(RuntimeError):
    pass


def _session(model, threads: int) -> sg.onnx.Session:
    """Every session has its own intra-op threads, which spin between runs by default: with several
    sessions taking turns on the same cores they would take them from each other, so they sleep."""
    return sg.onnx.Session(model, threads=threads, spinning=False)


def _timed(calls: dict, budget: float) -> dict[str, float]:
    """Median seconds per call, interleaved; calls of well under a millisecond are repeated per round."""
    once = {}
    for k, f in calls.items():
        f()
        t = time.perf_counter()
        f()
        once[k] = time.perf_counter() - t
    inner = max(1, int(2e-3 / max(min(once.values()), 1e-7)))
    rounds = max(5, min(41, int(budget / max(sum(once.values()) * inner, 1e-7))))
    return medians(calls, rounds=rounds, budget_s=budget, inner=inner)


def _check(name: str, out: np.ndarray, ref: np.ndarray) -> None:
    err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
    if err > TOLERANCE:
        raise Mismatch(f"{name}: relative error {err:.2e} against the dense session (tolerance {TOLERANCE})")


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
                budget: float, sparse_too: bool, peak: float | None) -> dict:
    mask = make_mask(f"balanced_block:{block}", (out_f, in_f), 1 - sparsity, seed=0, name=name).numpy()
    W = (np.random.default_rng(0).standard_normal((out_f, in_f)) * mask).astype(np.float32)
    rho = float(np.count_nonzero(W)) / W.size
    x = np.random.default_rng(1).standard_normal((rows, in_f)).astype(np.float32)
    dense = _layer_model(W, rows)
    models = {"dense": dense}
    for layout in ("auto", *LAYOUTS):
        models[layout] = sg.onnx.lower(dense, "ort-block", fold=False, block=block, max_density=1.0, layout=layout,
                                       check=False)
    if sparse_too:
        models["ort-sparse"] = sg.onnx.lower(dense, "ort-sparse", fold=False, max_density=1.0, check=False)
    if NATIVE:
        models["ort-native"] = sg.onnx.lower(dense, "ort-native", fold=False, block=block, max_density=1.0,
                                             check=False)
    auto = next(iter(sg.onnx.read_lowering(models["auto"]).values()))
    sessions = {k: _session(m, threads) for k, m in models.items()}
    ref = sessions["dense"](x)
    for k, s in sessions.items():
        _check(f"{name} rows={rows} {k}", s(x), ref)
    t = _timed({k: (lambda s=s: s(x)) for k, s in sessions.items()}, budget)
    flop = 2.0 * rows * out_f * in_f
    row = {"layer": name, "shape": f"{out_f}x{in_f}", "rows": rows, "sparsity": sparsity, "block": block,
           "density": round(rho, 4), "r": auto["blocks_per_column"], "auto": auto["layout"],
           "dense_us": t["dense"] * 1e6, "dense_gflops": flop / t["dense"] / 1e9,
           "dense_peak": flop / t["dense"] / peak if peak else float("nan")}
    for k in models:
        if k == "dense":
            continue
        row[f"{k}_us"] = t[k] * 1e6
        row[f"eta_{k}"] = t["dense"] * rho / t[k]
    row["speedup_auto"] = t["dense"] / t["auto"]
    return row


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
# model: (its mask, the inputs of each tag, the lowerings it is exported with): gpt-mini's layers are MatMul
# (ort-block and ort-native), ResNet-18's (CIFAR) are Conv, which only ort-native lowers
END_TO_END = {"gpt-mini": ("balanced_block:32", {"1x64": (1, 64), "16x128": (16, 128)}, ("ort-block", "ort-native")),
              "resnet18": ("balanced_block:16", {"1x3x32x32": (1, 3, 32, 32), "32x3x32x32": (32, 3, 32, 32)},
                           ("ort-native",))}


def bench_model(name: str, tag: str, sparsities: list[float], threads: int, budget: float, folder: str,
                rows_too: bool) -> list[dict]:
    """The dense original against its Sparse Wide forms exported dense and lowered, one input shape."""
    mask, tags, lowerings = END_TO_END[name]
    spec = builtin(name)
    spec.model.eval()
    inputs = spec.make_input(tags[tag])
    feed = [x.numpy() for x in inputs]
    lowerings = [lo for lo in lowerings if NATIVE or lo != "ort-native"]
    paths = {"original dense": sg.export_onnx(spec.model, inputs, os.path.join(folder, f"{name}_{tag}.onnx"))}
    for s in sparsities:
        wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", s, mask=mask).eval()
        stem = os.path.join(folder, f"{name}_{s}_{tag}")
        paths[f"wide s={s} dense"] = sg.export_onnx(wide, inputs, f"{stem}_dense.onnx")
        for lo in lowerings:
            paths[f"wide s={s} {lo}"] = sg.export_onnx(wide, inputs, f"{stem}_{lo}.onnx", lower=lo)
        if rows_too and "ort-block" in lowerings:  # the formulation every layer used before the per-layer choice
            paths[f"wide s={s} ort-block rows"] = sg.export_onnx(wide, inputs, f"{stem}_rows.onnx", lower="ort-block",
                                                                 layout="rows")
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    outs = {k: s(*feed) for k, s in sessions.items()}
    for k in outs:
        if k.startswith("wide") and not k.endswith(" dense"):
            _check(f"{name} {tag} {k}", outs[k], outs[k.split(" ort-")[0] + " dense"])
    t = _timed({k: (lambda s=s: s(*feed)) for k, s in sessions.items()}, budget)
    base = t["original dense"]
    rows = []
    for k, v in t.items():
        lowering = sg.onnx.read_lowering(paths[k]).values()
        layouts = sorted({c.get("layout", c["target"]) for c in lowering})
        rows.append({"model": name, "input": tag, "variant": k, "layouts": ",".join(layouts) or "-",
                     "handed_over": sum("input_from" in c for c in lowering), "ms": v * 1e3, "vs_original": v / base})
    return rows


def _short(row: dict) -> dict:
    """The table's view of a layer row (the JSON keeps every field)."""
    nan = float("nan")
    peak = f" ({row['dense_peak']:.0%})" if row["dense_peak"] == row["dense_peak"] else ""
    return {"layer": row["layer"], "W": row["shape"], "M": row["rows"], "s": row["sparsity"], "r": row["r"],
            "dense us": row["dense_us"], "dense GFLOP/s": f"{row['dense_gflops']:.0f}{peak}", "auto": row["auto"],
            "eta auto": row["eta_auto"], "x dense": row["speedup_auto"], "eta rows": row["eta_rows"],
            "eta blocks": row["eta_blocks"], "eta column": row["eta_column"],
            "eta sparse": row.get("eta_ort-sparse", nan), "eta native": row.get("eta_ort-native", nan)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="GPT-2 and gpt-mini shapes and end to end only")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime intra-op threads")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per configuration")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # machine(): the FMA peak at the thread count ONNX Runtime uses
    info = machine()
    print(describe(info), f"| ONNX Runtime {ort.__version__}, {args.threads} intra-op thread(s)", flush=True)
    if not NATIVE:
        print("ort-native skipped: no ONNX Runtime C API headers (run `sparsegraph ort-headers`)", flush=True)
    peak = info["fp32_peak_gflops"] * 1e9 if info["fp32_peak_gflops"] else None
    quick = args.quick
    budget = args.budget or (1.0 if quick else 2.0)
    configs = [(n, o, i, pix * m, s) for n, o, i, pix in GPT2 for s in (0.75, 0.9) for m in ([64, 2048] if quick else
                                                                                               [1, 64, 2048])]
    configs += [(n, o, i, m, s) for s, layers in MINI.items() for n, o, i in layers for m in (64, 2048)]
    if not quick:
        configs += [(n, o, i, pix * m, s) for n, o, i, pix in RESNET for s in (0.75, 0.9) for m in (1, 64)]
    rows = []
    t0 = time.time()
    for k, (name, out_f, in_f, m, s) in enumerate(configs, 1):
        sparse_too = m * out_f * in_f * (1 - s) <= 3e7  # SparseToDenseMatMul is single-threaded: seconds a call
        row = bench_layer(name, out_f, in_f, m, s, 32, args.threads, budget, sparse_too, peak)
        rows.append(row)
        print(f"[{k}/{len(configs)} {time.time() - t0:4.0f}s] {name} {out_f}x{in_f} rows={m} s={s}: dense "
              f"{row['dense_us']:.0f}us ({row['dense_gflops']:.0f} GFLOP/s), auto={row['auto']} "
              f"{row['auto_us']:.0f}us (eta {row['eta_auto']:.2f}), rows eta {row['eta_rows']:.2f}, blocks eta "
              f"{row['eta_blocks']:.2f}, column eta {row['eta_column']:.2f}"
              + (f", native eta {row['eta_ort-native']:.2f}" if NATIVE else ""), flush=True)
    print_table(f"single layers, balanced_block:32, ONNX Runtime {ort.__version__} CPU, {args.threads} thread(s); "
                f"eta = t_dense * density / t", [_short(r) for r in rows], list(_short(rows[0])))

    e2e = []
    with tempfile.TemporaryDirectory() as folder:
        for name, (_, tags, _) in END_TO_END.items():
            for tag in tags:
                print(f"[{time.time() - t0:4.0f}s] end to end: {name} {tag}", flush=True)
                e2e += bench_model(name, tag, [0.75, 0.9], args.threads, budget * 4, folder, rows_too=not quick)
    print_table("end to end: Sparse Wide gpt-mini (balanced_block:32) and ResNet-18 (balanced_block:16) "
                "(target: within 1.5x the original)",
                e2e, ["model", "input", "variant", "layouts", "handed_over", "ms", "vs_original"])
    path = write_json("onnx_runtime" + ("_quick" if quick else ""), rows, end_to_end=e2e, threads=args.threads,
                      onnxruntime=ort.__version__,
                      command=" ".join(["python bench/onnx_runtime.py", *(argv if argv is not None else sys.argv[1:])]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
