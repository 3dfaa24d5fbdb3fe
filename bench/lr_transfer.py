"""Learning-rate transfer across sparsity and width: SP vs μP vs SμPar on the built-in GPT.

    python bench/lr_transfer.py                  # the full experiment (~15-25 min on 2 cores)
    python bench/lr_transfer.py --quick          # a smoke run (2 LRs, 20 steps)

Base model: gpt-mini with 2 layers, d_model 32, 2 heads, context 64, trained on the offline
character corpus (Python standard-library sources, byte level) with AdamW for a few hundred steps.
Two sweeps, each over a grid of base learning rates, for each parameterisation:
  * sparsity 0 / 0.5 / 0.75 / 0.875 at width 1 (`sparse_wide`, width=1: same shapes, masked);
  * width 1 / 2 / 4 (d_model 32 / 64 / 128) at sparsity 0.75 (`sparse_wide`, width=k).
All three parameterisations share the base hyperparameters (σ_base 0.02, α_in = α_out = 1,
α_attn = √(base d_head) so that α/d_head is SP's 1/√d_head at the base): at width 1 and density 1 they
are the same network. Each run reports the validation loss; per setting the optimum learning rate
(grid argmin, refined by a parabola through its neighbours in log2 space) and per sweep the spread of
the optima in octaves.
Writes bench/results/lr_transfer.json and bench/results/lr_transfer.png.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, write_json  # noqa: E402

from sparsegraph.fsutil import atomic_write  # noqa: E402

PARAMS = ("sp", "mup", "supar")
LABEL = {"sp": "SP", "mup": "μP", "supar": "SμPar"}

_CACHE: dict = {}


def _setup(cfg: dict):
    """Per worker: one thread, the data, and the captured base model."""
    import torch

    import sparsegraph as sg
    from sparsegraph.data import char_corpus
    from sparsegraph.models import builtin

    if "graph" not in _CACHE:
        torch.set_num_threads(1)
        spec = builtin("gpt-mini", n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                       block_size=cfg["block"])
        x = torch.randint(0, 256, (2, cfg["block"]), generator=torch.Generator().manual_seed(0))
        _CACHE.update(model=spec.model, x=(x,), graph=sg.capture(spec.model, (x,)),
                      train=char_corpus("train", cfg["block"], max_bytes=2_000_000),
                      val=char_corpus("val", cfg["block"], max_bytes=2_000_000))
    return _CACHE


def run_one(job: dict, cfg: dict) -> dict:
    """Train one (parameterisation, width, sparsity, lr) and return its validation loss."""
    import copy

    import torch

    import sparsegraph as sg
    from sparsegraph.models.gpt import loss_fn

    c = _setup(cfg)
    key = (job["width"], job["sparsity"])
    if key not in _CACHE:
        _CACHE[key] = sg.sparsify(c["model"], c["x"], "sparse_wide", job["sparsity"], width=float(job["width"]),
                                  seed=cfg["seed"], graph=c["graph"])
    t0 = time.perf_counter()
    m = sg.supar.annotate(copy.deepcopy(_CACHE[key]), job["param"], sigma_base=cfg["sigma_base"],
                          alpha_attn=cfg["alpha_attn"], example_inputs=c["x"])
    sg.supar.init_(m, seed=cfg["seed"])
    opt = torch.optim.AdamW(sg.supar.param_groups(m, job["lr"], cfg["weight_decay"], "adamw"), betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(cfg["seed"])
    steps, warm = cfg["steps"], max(1, cfg["steps"] // 10)
    diverged = False
    m.train()
    for step in range(steps):
        # linear warm-up, then cosine decay to 10% (every group scaled alike, so the ratios stay)
        f = (step + 1) / warm if step < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        xb, yb = c["train"].batch(cfg["batch"], gen)
        loss = loss_fn(m(xb), yb)
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    val = float("nan")
    if not diverged:
        m.eval()
        vgen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            val = sum(float(loss_fn(m(xb), yb)) for xb, yb in (c["val"].batch(32, vgen) for _ in range(8))) / 8
    return {**job, "val_loss": val, "train_loss": float(loss.detach()), "diverged": diverged,
            "density": (m.plan.sparse_weights[0].density if m.plan.sparse_weights else 1.0),
            "d_model": m.plan.weight("wpe.weight").shape[1], "seconds": time.perf_counter() - t0}


def optimum(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(log2 of the grid argmin, log2 refined by a parabola through the argmin and its neighbours)."""
    pts = sorted((math.log2(lr), loss) for lr, loss in points if math.isfinite(loss))
    if not pts:
        return float("nan"), float("nan")
    i = min(range(len(pts)), key=lambda k: pts[k][1])
    best = pts[i][0]
    if 0 < i < len(pts) - 1:
        (x0, y0), (x1, y1), (x2, y2) = pts[i - 1], pts[i], pts[i + 1]
        den = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
        b = (x2 ** 2 * (y0 - y1) + x1 ** 2 * (y2 - y0) + x0 ** 2 * (y1 - y2)) / den
        if a > 0:
            return best, min(max(-b / (2 * a), x0), x2)
    return best, best


def jobs_for(cfg: dict) -> list[dict]:
    out = []
    for lr in cfg["lrs"]:
        for s in cfg["sparsities"]:  # sparsity sweep at width 1 (dense width 1: the three coincide)
            for p in (PARAMS if s > 0 else ("sp",)):
                out.append({"sweep": "sparsity", "param": p, "width": 1, "sparsity": s, "lr": lr})
        for w in cfg["widths"]:
            if w == 1 and cfg["width_sparsity"] in cfg["sparsities"]:
                continue  # the same runs as in the sparsity sweep
            for p in PARAMS:
                out.append({"sweep": "width", "param": p, "width": w, "sparsity": cfg["width_sparsity"], "lr": lr})
    return sorted(out, key=lambda j: -j["width"])  # the widest first, for load balance


def expand(results: list[dict], cfg: dict) -> list[dict]:
    """Every (sweep, parameterisation, setting, lr) row, sharing the runs that coincide."""
    rows = []
    for r in results:
        if r["sweep"] == "sparsity" and r["sparsity"] == 0:
            rows += [{**r, "param": p} for p in PARAMS]
        else:
            rows.append(r)
    for r in list(rows):
        if r["sweep"] == "sparsity" and r["width"] == 1 and r["sparsity"] == cfg["width_sparsity"]:
            rows.append({**r, "sweep": "width"})
    return rows


def summarise(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    optima, spreads = [], []
    for sweep, knob in (("sparsity", "sparsity"), ("width", "width")):
        for p in PARAMS:
            settings = sorted({r[knob] for r in rows if r["sweep"] == sweep and r["param"] == p})
            fitted = []
            for v in settings:
                pts = [(r["lr"], r["val_loss"]) for r in rows
                       if r["sweep"] == sweep and r["param"] == p and r[knob] == v]
                grid, fit = optimum(pts)
                best = min((l for _, l in pts if math.isfinite(l)), default=float("nan"))
                one = next(r for r in rows if r["sweep"] == sweep and r["param"] == p and r[knob] == v)
                optima.append({"sweep": sweep, "parameterization": LABEL[p], "width": one["width"],
                               "sparsity": one["sparsity"], "best_lr": 2 ** grid, "log2_best_lr": grid,
                               "log2_fit": round(fit, 2), "best_val_loss": best})
                fitted.append(fit)
            ok = [f for f in fitted if math.isfinite(f)]
            spreads.append({"sweep": sweep, "parameterization": LABEL[p],
                            "optima_log2": " ".join(f"{f:.2f}" for f in fitted),
                            "spread_octaves": (max(ok) - min(ok)) if ok else float("nan")})
    return optima, spreads


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2), sharey="row")
    for i, (sweep, knob) in enumerate((("sparsity", "sparsity"), ("width", "width"))):
        for j, p in enumerate(PARAMS):
            ax = axes[i][j]
            for v in sorted({r[knob] for r in rows if r["sweep"] == sweep and r["param"] == p}):
                pts = sorted((math.log2(r["lr"]), r["val_loss"]) for r in rows
                             if r["sweep"] == sweep and r["param"] == p and r[knob] == v)
                xs, ys = zip(*pts)
                line, = ax.plot(xs, ys, marker="o", ms=3, label=f"{knob} {v:g}")
                _, fit = optimum([(2 ** x, y) for x, y in pts])
                if math.isfinite(fit):
                    ax.axvline(fit, color=line.get_color(), lw=0.8, ls=":")
            ax.set_title(f"{LABEL[p]}: {knob} sweep", fontsize=10)
            ax.set_xlabel("log2 base learning rate")
            if j == 0:
                ax.set_ylabel("validation loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    finite = [r["val_loss"] for r in rows if math.isfinite(r["val_loss"])]
    if finite:
        lo = min(finite)
        for row in axes:
            row[0].set_ylim(lo - 0.05, min(max(finite), lo + 1.2))
    fig.suptitle("LR transfer, gpt-mini (2 layers, d=32 base) on the character corpus: dotted = fitted optimum")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lrs", type=float, nargs="+", default=[2.0 ** e for e in range(-10, -2)])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.875])
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--width-sparsity", type=float, default=0.75)
    ap.add_argument("--sigma-base", type=float, default=0.02)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 LRs, 20 steps, widths 1 2")
    args = ap.parse_args()
    # alpha_attn = sqrt(d_head of the base) makes μP/SμPar's α/d_head equal SP's 1/sqrt(d_head) at the base,
    # so the three parameterisations are the same network at width 1, density 1
    cfg = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block": 64, "steps": args.steps, "batch": args.batch,
           "alpha_attn": math.sqrt(32 / 2),
           "lrs": args.lrs, "sparsities": args.sparsities, "widths": args.widths,
           "width_sparsity": args.width_sparsity, "sigma_base": args.sigma_base,
           "weight_decay": args.weight_decay, "seed": args.seed}
    if args.quick:
        cfg.update(steps=20, lrs=[2.0 ** -8, 2.0 ** -6], widths=[1, 2])
    jobs = jobs_for(cfg)
    print(f"{len(jobs)} training runs of {cfg['steps']} steps on {args.workers} worker(s)", flush=True)
    t0 = time.perf_counter()
    results = []
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        futures = [pool.submit(run_one, j, cfg) for j in jobs]
        for k, fut in enumerate(cf.as_completed(futures), 1):
            r = fut.result()
            results.append(r)
            print(f"[{k}/{len(jobs)}] {time.perf_counter() - t0:6.0f}s  {r['param']:>5} width {r['width']} "
                  f"sparsity {r['sparsity']:<6g} lr 2^{math.log2(r['lr']):.0f}: val {r['val_loss']:.4f} "
                  f"({r['seconds']:.1f}s)", flush=True)
    wall = time.perf_counter() - t0
    rows = expand(results, cfg)
    optima, spreads = summarise(rows)
    print_table("optimum base learning rate per setting", optima,
                ["sweep", "parameterization", "width", "sparsity", "log2_best_lr", "log2_fit", "best_val_loss"])
    print_table("spread of the optimum (octaves of learning rate, fitted)", spreads,
                ["sweep", "parameterization", "optima_log2", "spread_octaves"])
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(folder, exist_ok=True)
    png = os.path.join(folder, "lr_transfer.png")
    plot(rows, png)
    path = write_json("lr_transfer", rows, config=cfg, optima=optima, spreads=spreads, wall_seconds=wall)
    print(f"wrote {path} and {png} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
