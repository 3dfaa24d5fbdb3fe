"""Per-layer sparse kernels against dense, side by side: dense vs PyTorch CSR vs PyTorch BSR vs sparsegraph.

    python bench/kernels.py                # full grid (about 10 minutes on 2 cores)
    python bench/kernels.py --quick        # s in {0.75, 0.9}, blocks {1, 32}, fewer repeats

Shapes: GPT-2 small projections (n x k = 768x768, 3072x768, 768x3072) as linear layers with
batch M rows, and CIFAR ResNet-18 3x3 convolutions as im2col GEMMs (n = out channels,
k = 9 in channels, M = batch x output positions rows). A second table times the same ResNet
layers as convolutions: oneDNN's dense conv2d against `sparsegraph::sparse_conv2d` (the direct
kernel convolutions lower to). Sparsity 0.5 /
0.75 / 0.9 / 0.95; block 1 is an unstructured (uniform) mask (CSR), blocks 16 / 32 / 64 are
balanced block masks (the same number of blocks in every block-row). For every configuration
all four are timed interleaved in one run (minimum over the repeats, each timed warm) and reported as time and
efficiency per useful FLOP, eta = t_dense * rho / t_sparse (1 is the physical limit; rho the
mask's density). `sg_op_us` is the public op (`sparsegraph::sparse_linear` through the
dispatcher); `sg_kernel_us` the same native kernel called directly (no dispatch), to separate
the two at batch 1. `choice` is what the cost model picks for this layer and `pred_x` its
predicted speedup over dense; `ok` says whether the measured sparse time is below dense where
it picks sparse.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F

from sparsegraph.backends import cost_model as cm
from sparsegraph.backends import cpu
from sparsegraph.backends.sparse_linear import SparseWeight
from sparsegraph.passes.lower import decide

from common import print_table, write_json

GPT2 = [("gpt2.attn", 768, 768), ("gpt2.fc", 3072, 768), ("gpt2.proj", 768, 3072)]
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


def interleaved(fns: dict, repeat: int, budget_s: float) -> dict:
    """Minimum time of each callable over interleaved rounds (three back-to-back calls per callable
    and round, so every one is timed warm); fewer rounds if a round is slow."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    start = time.perf_counter()
    for i in range(repeat):
        for k, f in fns.items():
            for _ in range(3):
                t = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return best


def torch_sparse(w: torch.Tensor, block: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = w.to_sparse_csr()
        bsr = w.to_sparse_bsr((block, block)) if block > 1 and w.shape[0] % block == 0 and \
            w.shape[1] % block == 0 else None
    return csr, bsr


def run_config(name, n, k, L, batch, s, block, repeat, gen, model):
    w, mask = make_weight(n, k, block, s, gen)
    rho = float(mask.float().mean())
    sw = SparseWeight.from_dense(w, block, mask=mask)
    csr, bsr = torch_sparse(w, block)
    M = batch * L
    x = torch.randn(M, k, generator=gen)  # rows layout: the GEMM every baseline runs
    xt = x.t().contiguous()
    fns = {"dense": lambda: F.linear(x, w), "torch_csr": lambda: torch.sparse.mm(csr, xt)}
    if bsr is not None:
        fns["torch_bsr"] = lambda: torch.sparse.mm(bsr, xt)
    fns["sg_op"] = lambda: sw.apply(x)
    if cpu.library() is not None:
        fns["sg_kernel"] = lambda: cpu.linear(x, sw.values, sw.crow, sw.col, None, n, k, block)
    with torch.inference_mode():
        t = interleaved(fns, repeat, budget_s=3.0)
    choice = decide(name, "", "linear", mask, (M, 1), "cpu", torch.device("cpu"), model)
    row = {"layer": name, "n": n, "k": k, "batch": batch, "rows": M, "sparsity": s, "block": block,
           "density": round(rho, 4), "dense_us": round(t["dense"] * 1e6, 1)}
    for key in ("torch_csr", "torch_bsr", "sg_op", "sg_kernel"):
        if key in t:
            row[f"{key}_us"] = round(t[key] * 1e6, 1)
            row[f"eta_{key}"] = round(t["dense"] * rho / t[key], 3)
        else:
            row[f"{key}_us"], row[f"eta_{key}"] = None, None
    row["sg_speedup"] = round(t["dense"] / t["sg_op"], 3)
    row["choice"] = choice.format + (f"{choice.block}" if choice.format == "bsr" else "")
    row["pred_x"] = choice.predicted_speedup
    row["ok"] = "-" if choice.format == "dense" else ("yes" if t["sg_op"] < t["dense"] else "NO")
    return row


def run_conv(name, n, k, L, batch, s, block, repeat, gen, model):
    """A ResNet-18 3x3 convolution (stride 1, padding 1): dense conv2d vs sparsegraph::sparse_conv2d."""
    c_in, side = k // 9, int(round(L ** 0.5))
    w, mask = make_weight(n, k, block, s, gen)
    rho = float(mask.float().mean())
    sw = SparseWeight.from_dense(w, block, mask=mask)
    x = torch.randn(batch, c_in, side, side, generator=gen)
    w4 = w.view(n, c_in, 3, 3)
    with torch.inference_mode():
        t = interleaved({"dense": lambda: F.conv2d(x, w4, padding=1), "sg": lambda: sw.conv2d(x, None, 3, 1, 1)},
                        repeat, budget_s=3.0)
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
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = [0.75, 0.9] if args.quick else [0.5, 0.75, 0.9, 0.95]
    blocks = [1, 32] if args.quick else [1, 16, 32, 64]
    repeat = args.repeat or (5 if args.quick else 15)
    gen = torch.Generator().manual_seed(0)
    model = cm.load()
    configs = [(nm, n, k, 1, batch) for nm, n, k in GPT2 for batch in (1, 64)]
    configs += [(nm, n, k, L, batch) for nm, n, k, L in RESNET for batch in (1, 64)]
    total = len(configs) * len(sparsities) * len(blocks)
    print(f"{total} configurations; native kernels: {cpu.available()}; cost model: {model.source}", flush=True)
    rows, t0, load0 = [], time.perf_counter(), os.getloadavg()
    for name, n, k, L, batch in configs:
        for s in sparsities:
            for b in blocks:
                rows.append(run_config(name, n, k, L, batch, s, b, repeat, gen, model))
                r = rows[-1]
                print(f"[{len(rows)}/{total} {time.perf_counter() - t0:.0f}s] {name} batch={batch} s={s} b={b}: "
                      f"eta sg {r['eta_sg_op']} csr {r['eta_torch_csr']} bsr {r['eta_torch_bsr']}", flush=True)
    cols = ["layer", "batch", "sparsity", "block", "density", "dense_us", "eta_torch_csr", "eta_torch_bsr",
            "eta_sg_op", "eta_sg_kernel", "sg_speedup", "choice", "pred_x", "ok"]
    print_table("sparse kernels vs dense (eta = t_dense * rho / t_sparse)", rows, cols)
    conv_rows = []
    for name, n, k, L in RESNET:
        for batch in (1, 64):
            for s in sparsities:
                for b in blocks:
                    conv_rows.append(run_conv(name, n, k, L, batch, s, b, repeat, gen, model))
                    r = conv_rows[-1]
                    print(f"[conv {len(conv_rows)} {time.perf_counter() - t0:.0f}s] {name} batch={batch} s={s} "
                          f"b={b}: eta {r['eta_sg']} speedup {r['sg_speedup']}", flush=True)
    print_table("ResNet-18 convolutions: dense conv2d (oneDNN) vs sparsegraph::sparse_conv2d", conv_rows,
                ["layer", "batch", "sparsity", "block", "density", "dense_conv_us", "sg_conv_us", "eta_sg",
                 "sg_speedup", "choice", "pred_x", "ok"])
    for label, rs in (("GEMM", rows), ("conv", conv_rows)):
        picked = [r for r in rs if r["choice"] != "dense"]
        slower = [r for r in picked if r["ok"] == "NO"]
        print(f"{label}: the cost model picked sparse in {len(picked)} of {len(rs)} configurations; measured slower "
              f"than dense in {len(slower)}")
    name = "kernels" + ("_quick" if args.quick else "") + (f"_t{args.threads}" if args.threads else "")
    print("wrote", write_json(name, rows, conv=conv_rows, repeat=repeat, timing="min over interleaved repeats",
                              native=cpu.available(), cost_model=model.source, load_before=load0,
                              load_after=os.getloadavg(), seconds=round(time.perf_counter() - t0)))


if __name__ == "__main__":
    main()
