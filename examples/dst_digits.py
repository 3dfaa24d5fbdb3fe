"""Dynamic sparse training on hand-written digits: dense vs RigL 90% vs RigL 90% + SparseOpt.

The built-in "resnet-mini" (a BatchNorm ResNet, 16-32-64 channels) on scikit-learn's digits
upsampled to 16x16 (`sparsegraph.data.digits`, nothing downloaded). Every run has the same budget:
the same number of steps, batches, optimizer (SGD, momentum 0.9, cosine learning rate) and seed
set; the sparse runs mask the hidden convolutions to 90% sparsity (stem and head dense), the
same architecture as the dense one (`width=1.0`). A static-mask run at 90% is included as the
baseline RigL should beat.

    python examples/dst_digits.py                     # 3 seeds x 4 configs x 1000 steps (~8 min on 2 cores)
    python examples/dst_digits.py --seeds 1 --steps 300   # a quick look

Writes examples/results/dst_digits.png (loss and accuracy curves, mean over seeds with the
min-max band) and examples/results/dst_digits.json, and prints the results table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time

import torch
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph.data import digits
from sparsegraph.fsutil import atomic_write
from sparsegraph.models import builtin

CONFIGS = {  # name -> (sparsity, dst method, SparseOpt)
    "dense": (0.0, None, False),
    "static 90%": (0.9, "Static", False),
    "RigL 90%": (0.9, "RigL", False),
    "RigL 90% + SparseOpt": (0.9, "RigL", True),
}


def build(name: str, seed: int, args):
    sparsity, method, sparseopt = CONFIGS[name]
    torch.manual_seed(seed)
    spec = builtin("resnet-mini")
    if sparsity:
        model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", sparsity, width=1.0, seed=seed)
    else:  # the dense original, captured the same way so every run trains the same kind of module
        model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.0, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    if sparseopt:
        opt = sg.SparseOpt(opt, model)
    dst = None
    if method:
        dst = getattr(sg.dst, method)(model, opt, total_steps=args.steps, update_interval=args.update_interval)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    return model, opt, dst, sched


@torch.no_grad()
def evaluate(model, data) -> tuple[float, float]:
    model.eval()
    logits = model(data.images)  # (N, 10)
    model.train()
    return F.cross_entropy(logits, data.labels).item(), (logits.argmax(1) == data.labels).float().mean().item()


def run(name: str, seed: int, args, train, val) -> dict:
    model, opt, dst, sched = build(name, seed, args)
    gen = torch.Generator().manual_seed(seed)  # the same batches for every config of a seed
    curve, window, t0 = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train.labels), (args.batch,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(train.images[idx]), train.labels[idx])
        loss.backward()
        opt.step()
        if dst is not None:
            dst.step()
        sched.step()
        window.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            val_loss, val_acc = evaluate(model, val)
            curve.append({"step": step, "train_loss": sum(window) / len(window), "val_loss": val_loss,
                          "val_acc": val_acc})
            window = []
    seconds = time.perf_counter() - t0
    plan = sg.plan_of(model)
    history = plan.history if plan is not None else []
    changed = sum(l.get("changed", 0) for h in history for l in h["layers"].values())
    nonzero = sum(round(w.density * torch.Size(w.shape).numel()) for w in plan.sparse_weights) if plan else 0
    return {"config": name, "seed": seed, "seconds": seconds, "curve": curve, "final": curve[-1],
            "mask_updates": len(history), "regrown_fraction": changed / nonzero if nonzero else 0.0}


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for name in CONFIGS:
        rs = [r for r in results if r["config"] == name]
        if not rs:
            continue

        def stat(key, rs=rs):
            vals = [r["final"][key] for r in rs]
            return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), vals

        quarter = min(rs[0]["curve"], key=lambda c: abs(c["step"] - rs[0]["curve"][-1]["step"] / 4))["step"]
        early = [next(c for c in r["curve"] if c["step"] == quarter) for r in rs]
        acc, acc_sd, accs = stat("val_acc")
        vloss, vloss_sd, _ = stat("val_loss")
        tloss, tloss_sd, _ = stat("train_loss")
        rows.append({"config": name, "seeds": len(rs), "val_acc": acc, "val_acc_std": acc_sd,
                     "val_acc_min": min(accs), "val_acc_max": max(accs), "val_loss": vloss,
                     "val_loss_std": vloss_sd, "train_loss": tloss, "train_loss_std": tloss_sd,
                     "early_step": quarter, "early_val_acc": statistics.mean(c["val_acc"] for c in early),
                     "early_val_loss": statistics.mean(c["val_loss"] for c in early),
                     "mask_updates": rs[0]["mask_updates"],
                     "regrown_fraction": statistics.mean(r["regrown_fraction"] for r in rs),
                     "seconds_per_run": statistics.mean(r["seconds"] for r in rs)})
    return rows


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("train_loss", "train loss (mean over the eval interval)", True),
              ("val_loss", "validation loss", True), ("val_acc", "validation accuracy", False))
    for ax, (key, title, log) in zip(axes, panels):
        for name in CONFIGS:
            rs = [r for r in results if r["config"] == name]
            if not rs:
                continue
            steps = [p["step"] for p in rs[0]["curve"]]
            vals = [[r["curve"][i][key] for r in rs] for i in range(len(steps))]
            mean = [statistics.mean(v) for v in vals]
            line, = ax.plot(steps, mean, label=name)
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[2].set_ylim(0.8, 1.0)
    axes[2].legend(loc="lower right")
    seeds = len({r["seed"] for r in results})
    fig.suptitle(f"resnet-mini on digits 16x16: same steps and batches, {seeds} seed(s), band = min-max")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)  # small convolutions: one thread per run, runs in parallel


def _task(task) -> dict:
    name, seed, args = task
    return run(name, seed, args, digits("train"), digits("val"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--update-interval", type=int, default=100, help="RigL ΔT (steps between mask updates)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    tasks = [(name, seed, args) for seed in range(args.seeds) for name in configs]
    results, t0 = [], time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.jobs, initializer=_init_worker, initargs=(args.threads,)) as pool:
        for r in pool.imap_unordered(_task, tasks):
            results.append(r)
            f = r["final"]
            print(f"[{len(results)}/{len(tasks)}] seed {r['seed']} {r['config']:<22} val acc {f['val_acc']:.4f}  "
                  f"val loss {f['val_loss']:.4f}  train loss {f['train_loss']:.4f}  ({r['seconds']:.0f} s; "
                  f"{time.perf_counter() - t0:.0f} s total)", flush=True)
    results.sort(key=lambda r: (r["seed"], list(CONFIGS).index(r["config"])))
    rows = summarize(results)
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "dst_digits.png")
    plot(results, png)
    text = json.dumps({"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "summary": rows, "runs": results}, indent=1)
    atomic_write(os.path.join(args.out, "dst_digits.json"), lambda tmp: _write_text(tmp, text))

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"resnet-mini / digits, {args.steps} steps x batch {args.batch}, {args.seeds} seed(s)",
              header_style="bold")
    early = rows[0]["early_step"] if rows else 0
    for col in ("config", "val acc (mean ± sd)", "min-max", "val loss", "train loss", f"val acc @ {early}",
                f"val loss @ {early}", "mask updates", "regrown / nonzeros", "s / run"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        t.add_row(r["config"], f"{r['val_acc']:.4f} ± {r['val_acc_std']:.4f}",
                  f"{r['val_acc_min']:.4f}-{r['val_acc_max']:.4f}",
                  f"{r['val_loss']:.4f} ± {r['val_loss_std']:.4f}", f"{r['train_loss']:.4f}",
                  f"{r['early_val_acc']:.4f}", f"{r['early_val_loss']:.4f}", str(r["mask_updates"]),
                  f"{r['regrown_fraction']:.2f}", f"{r['seconds_per_run']:.0f}")
    Console(width=160).print(t)
    print(f"wrote {png} and dst_digits.json ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
