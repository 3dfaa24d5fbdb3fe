"""sparsegraph train [MODEL] ...: rewrite, SμPar, dynamic sparsity, SparseOpt and checkpoints in one run."""
from __future__ import annotations

import argparse
import os

from ..plan import FAMILIES

HELP = "train a Sparse-IFT model end to end (rewrite, SμPar, DST, SparseOpt, checkpoints)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="gpt-mini", help="a built-in or MODEL form (default gpt-mini)")
    p.add_argument("--transform", default="sparse_wide", choices=[*FAMILIES, "dense"])
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--mask", default="uniform")
    p.add_argument("--storage", default="masked", choices=["masked", "compact"],
                   help="compact: sparse weights stored as their blocks (sg.lower), optimizer state per stored "
                        "value; RigL/SET update them in place (block masks)")
    p.add_argument("--dst", default="static", choices=["static", "rigl", "set", "gmp"])
    p.add_argument("--parameterization", default="sp", choices=["sp", "mup", "supar"])
    p.add_argument("--sparseopt", action="store_true", help="SparseOpt gradient correction (BatchNorm nets)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                   help="cosine: linear warm-up, then cosine decay to lr/10")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: a tenth of --steps, at most 100")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"])
    p.add_argument("--data", default=None, help="chars, digits, digits-hard or package.module:callable (default: by model)")
    p.add_argument("--block-size", type=int, default=64, help="context length for the character corpus")
    p.add_argument("--update-interval", type=int, default=50, help="DST mask update interval")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--checkpoint-interval", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="built-in model option, e.g. n_layer=2 (repeatable)")
    p.add_argument("-o", "--out", default="runs/train", help="run directory (checkpoint, metrics, curves)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the run directory (default: refuse to start over it)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard with FSDP2 (per block, then the root) instead of DDP")
    p.add_argument("--recompute", action="store_true",
                   help="activation checkpointing per block: each block keeps only its input for backward and runs "
                        "its forward again there (less memory, one more forward of the blocks, the same numbers)")
    p.add_argument("--no-progress", action="store_true")


def _options(items: list[str]) -> dict:
    from ..graph import SparsegraphError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SparsegraphError(f"bad --model-option {item!r}: expected KEY=VALUE")
        out[key] = _value(value)
    return out


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run(args: argparse.Namespace) -> int:
    from ..cli import console
    from ..train.trainer import TrainConfig, train

    cfg = TrainConfig(model=args.model, transform=None if args.transform == "dense" else args.transform,
                      sparsity=args.sparsity, mask=args.mask, storage=args.storage, dst=args.dst, parameterization=args.parameterization,
                      sparseopt=args.sparseopt, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, optimizer=args.optimizer, data=args.data,
                      block_size=args.block_size, update_interval=args.update_interval,
                      eval_interval=args.eval_interval, checkpoint_interval=args.checkpoint_interval,
                      seed=args.seed, model_options=_options(args.model_option), fsdp=args.fsdp,
                      recompute=args.recompute)
    metrics = train(cfg, args.out, resume=args.resume, progress=not args.no_progress,
                    overwrite=args.overwrite)
    last = [m for m in metrics if "val_loss" in m]
    summary = f"{len(metrics)} steps logged to {args.out}/metrics.jsonl, curves in {args.out}/curves.png"
    if last:
        summary += f"; final val loss {last[-1]['val_loss']:.4f}" + (
            f", val accuracy {last[-1]['val_acc']:.3f}" if "val_acc" in last[-1] else "")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the run
        console().print(summary)
    return 0
