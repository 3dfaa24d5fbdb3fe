"""Per-layer sparse kernels against dense, side by side: dense (MKL and pre-packed oneDNN) vs
PyTorch CSR / BSR vs sparsegraph.

    python bench/layer_kernels.py --quick --threads 1 2   # s in {0.75, 0.9}, blocks {1, 32}, batch 1/8/64/1024
    python bench/layer_kernels.py                         # blocks 1/16/32/64, batch 1/8/64/256/1024 (long)
    python bench/layer_kernels.py --quick --conv-only     # only the convolution table (a minute per thread count)

Shapes: GPT-2 small projections (n x k = 768x768, 3072x768, 768x3072) and Llama-style ones
(2048x2048, 5632x2048, 2048x5632) as linear layers with `batch` rows, and CIFAR ResNet-18 3x3
convolutions as im2col GEMMs (n = out channels, k = 9 in channels, rows = batch x positions).
A second table times the ResNet layers as convolutions: oneDNN's dense conv2d against
`sparsegraph::sparse_conv2d`. Block 1 is an unstructured (uniform) mask (CSR); blocks 16 / 32 / 64
are balanced block masks (the same number of blocks in every block-row).

Every candidate of a configuration is timed in interleaved rounds and reported as the median
(`common.medians`). `dense` is the faster of MKL (`F.linear`, what PyTorch runs) and oneDNN with
the weight pre-packed for the batch; both are printed as GFLOP/s and as a fraction of this CPU's
measured fp32 FMA peak (`cpu.fma_peak`). Efficiency per useful FLOP is eta = t_dense * rho / t_sparse
(1 is the physical limit; rho the mask's density). `eta_sg_op` is the public op
(`sparsegraph::sparse_linear` through the dispatcher, what autograd and tracing run); `eta_sg_frozen`
the op a frozen compiled graph runs instead (`sparsegraph::sparse_linear_packed`, W's blocks transposed
at compile time); `eta_sg_eager` is a lowered layer's eager inference call (`cpu.Prepared`, one native
call). `choice` is what the cost model picks and `pred_x` its predicted speedup over MKL dense; `ok`
says whether the measured sparse time is below MKL dense where it picks sparse.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from sparsegraph.backends import cost_model as cm
from sparsegraph.backends import cpu
from sparsegraph.backends.sparse_linear import SparseWeight, sparse_linear_packed
from sparsegraph.passes.lower import decide

from common import dense_linear, describe, gflops, machine, medians, print_table, write_json

GPT2 = [("gpt2.attn", 768, 768), ("gpt2.fc", 3072, 768), ("gpt2.proj", 768, 3072)]
LLAMA = [("llama.qo", 2048, 2048), ("llama.up", 5632, 2048), ("llama.down", 2048, 5632)]
# CIFAR ResNet-18 stages: (name, out channels n, fan-in k = 9 * in channels, output positions L)
RESNET = [("r18.l1", 64, 576, 1024), ("r18.l2", 128, 1152, 256), ("r18.l3", 256, 2304, 64),
          ("r18.l4", 512, 4608, 16)]


def make_weight(n: int, k: int, block: int, sparsity: float, gen: torch.Generator):
    """(dense masked weight, mask): uniform for block 1, balanced blocks otherwise."""
    if block == 1:
        mask = torch.zeros(n * k, dtype=torch.bool)
        mask[torch.randperm(n * k, generator=gen)[:max(1, round((1 - sparsity) * n * k))]] = True
        mask = mask.view(n, k)
    else:
        R, C = -(-n // block), -(-k // block)
        per = max(1, round((1 - sparsity) * C))
        bm = torch.zeros(R, C, dtype=torch.bool)
        for r in range(R):
            bm[r, torch.randperm(C, generator=gen)[:per]] = True
        mask = bm.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return torch.randn(n, k, generator=gen) * mask, mask


def torch_sparse(w: torch.Tensor, block: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = w.to_sparse_csr()
        bsr = w.to_sparse_bsr((block, block)) if block > 1 and w.shape[0] % block == 0 and \
            w.shape[1] % block == 0 else None
    return csr, bsr


def run_config(name, n, k, L, batch, s, block, rounds, gen, model, peers):
    w, mask = make_weight(n, k, block, s, gen)
    rho = float(mask.float().mean())
    sw = SparseWeight.from_dense(w, block, mask=mask)
    M = batch * L
    x = torch.randn(M, k, generator=gen)  # rows layout: the GEMM every baseline runs
    fns = dense_linear(x, w)
    if peers:
        csr, bsr = torch_sparse(w, block)
        xt = x.t().contiguous()
        fns["torch_csr"] = lambda: torch.sparse.mm(csr, xt)
        if bsr is not None:
            fns["torch_bsr"] = lambda: torch.sparse.mm(bsr, xt)
    fns["sg_op"] = lambda: sw.apply(x)
    values_t = sw.values.transpose(1, 2).contiguous()
    fns["sg_frozen"] = lambda: sparse_linear_packed(x, values_t, sw.crow, sw.col, None, n, k, block)
    prep = cpu.Prepared.make(sw.values, sw.crow, sw.col, None, n, k, block)
    fns["sg_eager"] = (lambda: prep(x)) if prep is not None else fns["sg_op"]
    with torch.inference_mode():
        t = medians(fns, rounds, budget_s=4.0)
    dense = min(t["mkl"], t.get("onednn", float("inf")))
    peak = cpu.fma_peak() or float("nan")
    choice = decide(name, "", "linear", mask, (M, 1), "cpu", torch.device("cpu"), model)
    flop = 2.0 * M * n * k
    row = {"layer": name, "n": n, "k": k, "rows": M, "threads": torch.get_num_threads(), "sparsity": s,
           "block": block, "density": round(rho, 4), "dense_us": round(dense * 1e6, 1),
           "mkl_gflops": round(gflops(flop, t["mkl"]), 1),
           "onednn_gflops": round(gflops(flop, t["onednn"]), 1) if "onednn" in t else None,
           "dense_peak_frac": round(flop / dense / peak, 3)}
    for key in ("torch_csr", "torch_bsr", "sg_op", "sg_frozen", "sg_eager"):
        row[f"{key}_us"] = round(t[key] * 1e6, 1) if key in t else None
        row[f"eta_{key}"] = round(dense * rho / t[key], 3) if key in t else None
    row["sg_gflops"] = round(gflops(flop * rho, t["sg_eager"]), 1)
    row["sg_speedup_vs_mkl"] = round(t["mkl"] / t["sg_eager"], 3)
    row["choice"] = choice.format + (f"{choice.block}" if choice.format == "bsr" else "")
    row["pred_x"] = choice.predicted_speedup
    row["ok"] = "-" if choice.format == "dense" else ("yes" if t["sg_op"] < t["mkl"] else "NO")
    return row


def run_conv(name, n, k, L, batch, s, block, rounds, gen, model):
    """A ResNet-18 3x3 convolution (stride 1, padding 1): dense conv2d vs sparsegraph::sparse_conv2d."""
    c_in, side = k // 9, int(round(L ** 0.5))
    w, mask = make_weight(n, k, block, s, gen)
    rho = float(mask.float().mean())
    sw = SparseWeight.from_dense(w, block, mask=mask)
    x = torch.randn(batch, c_in, side, side, generator=gen)
    w4 = w.view(n, c_in, 3, 3)
    with torch.inference_mode():
        t = medians({"dense": lambda: F.conv2d(x, w4, padding=1), "sg": lambda: sw.conv2d(x, None, 3, 1, 1)},
                    rounds, budget_s=3.0)
    choice = decide(name, "", "conv", mask, (batch, L), "cpu", torch.device("cpu"), model)
    return {"layer": name, "batch": batch, "sparsity": s, "block": block, "density": round(rho, 4),
            "dense_conv_us": round(t["dense"] * 1e6, 1), "sg_conv_us": round(t["sg"] * 1e6, 1),
            "eta_sg": round(t["dense"] * rho / t["sg"], 3), "sg_speedup": round(t["dense"] / t["sg"], 3),
            "choice": choice.format + (f"{choice.block}" if choice.format == "bsr" else ""),
            "pred_x": choice.predicted_speedup,
            "ok": "-" if choice.format == "dense" else ("yes" if t["sg"] < t["dense"] else "NO")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per configuration")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts to run (default: PyTorch's)")
    p.add_argument("--no-conv", action="store_true", help="skip the convolution table")
    p.add_argument("--conv-only", action="store_true", help="only the convolution table (kernels_conv*.json)")
    p.add_argument("--no-peers", action="store_true", help="skip PyTorch's CSR/BSR (slow on large shapes)")
    args = p.parse_args()
    sparsities = [0.75, 0.9] if args.quick else [0.5, 0.75, 0.9, 0.95]
    blocks = [1, 32] if args.quick else [1, 16, 32, 64]
    batches = (1, 8, 64, 1024) if args.quick else (1, 8, 64, 256, 1024)
    rounds = args.rounds or (7 if args.quick else 11)
    gen = torch.Generator().manual_seed(0)
    rows, conv_rows, machines, sources, t0 = [], [], [], [], time.perf_counter()
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        model = cm.load()  # the cost model of this thread count
        sources.append(model.source)
        machines.append(machine())
        print(describe(machines[-1]), flush=True)
        print(f"native kernels: {cpu.available()}; cost model: {model.source}", flush=True)
        configs = [(nm, n, k, 1, batch) for nm, n, k in GPT2 + LLAMA for batch in batches]
        configs += [(nm, n, k, L, batch) for nm, n, k, L in RESNET for batch in (1, 64)]
        configs = [] if args.conv_only else configs
        total = len(configs) * len(sparsities) * len(blocks)
        first = len(rows)
        for name, n, k, L, batch in configs:
            for s in sparsities:
                for b in blocks:
                    peers = not args.no_peers and n * k * batch * L <= 768 * 3072 * 1024
                    rows.append(run_config(name, n, k, L, batch, s, b, rounds, gen, model, peers))
                    r = rows[-1]
                    print(f"[{len(rows) - first}/{total} {time.perf_counter() - t0:.0f}s] {threads}t {name} "
                          f"rows={r['rows']} s={s} b={b}: dense {r['dense_peak_frac']:.0%} of peak, eta eager "
                          f"{r['eta_sg_eager']} op {r['eta_sg_op']} frozen {r['eta_sg_frozen']} "
                          f"csr {r['eta_torch_csr']} bsr {r['eta_torch_bsr']}",
                          flush=True)
        if not args.no_conv:
            for name, n, k, L in RESNET:
                for batch in (1, 64):
                    for s in sparsities:
                        for b in blocks:
                            conv_rows.append({"threads": threads,
                                              **run_conv(name, n, k, L, batch, s, b, rounds, gen, model)})
    cols = ["layer", "rows", "threads", "sparsity", "block", "density", "dense_us", "mkl_gflops", "onednn_gflops",
            "dense_peak_frac", "eta_torch_csr", "eta_torch_bsr", "eta_sg_op", "eta_sg_frozen", "eta_sg_eager",
            "sg_speedup_vs_mkl", "choice", "pred_x", "ok"]
    if rows:
        print_table(f"sparse kernels vs dense (eta = t_dense * rho / t_sparse; dense = faster of MKL and oneDNN) "
                    f"on {machines[0]['cpu']}", rows, cols)
    if conv_rows:
        print_table("ResNet-18 convolutions: dense conv2d (oneDNN) vs sparsegraph::sparse_conv2d", conv_rows,
                    ["layer", "threads", "batch", "sparsity", "block", "density", "dense_conv_us", "sg_conv_us",
                     "eta_sg", "sg_speedup", "choice", "pred_x", "ok"])
    for label, rs in (("GEMM", rows), ("conv", conv_rows)):
        if not rs:
            continue
        picked = [r for r in rs if r["choice"] != "dense"]
        slower = [r for r in picked if r["ok"] == "NO"]
        print(f"{label}: the cost model picked sparse in {len(picked)} of {len(rs)} configurations; measured slower "
              f"than dense in {len(slower)}")
    name = ("kernels" + ("_conv" if args.conv_only else "") + ("_quick" if args.quick else "")
            + "".join(f"_t{t}" for t in args.threads or []))
    print("wrote", write_json(name, rows, conv=conv_rows, machines=machines, rounds=rounds,
                              timing="median of interleaved rounds", native=cpu.available(),
                              cost_model=sources, seconds=round(time.perf_counter() - t0)))


if __name__ == "__main__":
    main()
