"""sparsegraph coord-check [MODEL]: activation and update sizes across width and sparsity under SP, μP, SμPar."""
from __future__ import annotations

import argparse
import json

from ..cli import add_model_arguments, console, resolve
from ..fsutil import check_writable
from ..graph import SparsegraphError

HELP = "coordinate check: per-layer activation RMS over a few steps across widths and sparsities (SP, μP, SμPar)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--widths", type=float, nargs="+", default=[1, 2, 4], help="Sparse Wide width factors")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.875])
    p.add_argument("--parameterizations", nargs="+", default=["sp", "mup", "supar"],
                   choices=["sp", "mup", "supar"])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    p.add_argument("--lr", type=float, default=1e-2, help="base learning rate (default 1e-2)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    p.add_argument("--sigma-base", type=float, default=None,
                   help="base init std (default: PyTorch's default init of the base model)")
    p.add_argument("--alpha-in", type=float, default=1.0)
    p.add_argument("--alpha-out", type=float, default=1.0)
    p.add_argument("--grid", action="store_true", help="every (width, sparsity) pair, not just the two sweeps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="coord_check.png", help="PNG to write (default coord_check.png)")
    p.add_argument("--json", action="store_true", help="print every row as JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    from ..supar import coord_check

    spec = resolve(args)
    if spec.kind != "torch":
        raise SparsegraphError(f"{spec.name}: coord-check needs a PyTorch model (built-in, torchvision:, hf: or "
                               f"module:callable), not a {spec.kind} model")
    if not args.output.lower().endswith(".png"):
        raise SparsegraphError(f"--output must be a .png file, got {args.output!r}")
    check_writable(args.output)
    for name in ("widths", "sparsities"):
        if not getattr(args, name):
            raise SparsegraphError(f"--{name} needs at least one value")
    if any(w < 1 for w in args.widths):
        raise SparsegraphError(f"--widths must be >= 1, got {args.widths}")
    if any(not 0 <= s < 1 for s in args.sparsities):
        raise SparsegraphError(f"--sparsities must be in [0, 1), got {args.sparsities}")
    cc = coord_check(spec.model, spec.example_inputs, widths=tuple(args.widths), sparsities=tuple(args.sparsities),
                     parameterizations=tuple(args.parameterizations), steps=args.steps, lr=args.lr,
                     optimizer=args.optimizer, grid=args.grid, seed=args.seed, png=args.output,
                     progress=not args.json, sigma_base=args.sigma_base, alpha_in=args.alpha_in,
                     alpha_out=args.alpha_out)
    if args.json:
        print(json.dumps(cc.rows))
        return 0
    out = console()
    out.print(cc.table())
    out.print(f"wrote {cc.png}")
    return 0
