"""sparsegraph export MODEL -o OUT.onnx [--lower dense|ort-block|ort-sparse|ort-native]: a model to ONNX.

MODEL is any model the CLI knows (built-in, torchvision:NAME, hf:ARCH, pkg.module:callable, a saved
sparsegraph model with its plan); `--transform`/`--sparsity` rewrite it first (as `sparsegraph rewrite`).
The masks are multiplied into the weights, the plan goes into the file's metadata, and the file is
written only once the export, the passes and the ONNX checker all succeeded.
"""
from __future__ import annotations

import argparse
import os

from ..cli import add_model_arguments, console, resolve
from ..fsutil import check_writable
from ..graph import SparsegraphError
from ..plan import FAMILIES

HELP = "export a model (optionally rewritten first) to ONNX, lowered for ONNX Runtime"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--lower", default="dense", choices=("dense", "ort-block", "ort-sparse", "ort-native"))
    p.add_argument("--fold", action=argparse.BooleanOptionalAction, default=None,
                   help="fold BN, parallel branches and U.V products (default: when lowering)")
    p.add_argument("--block", type=int, default=None, help="ort-block, ort-native: block size")
    p.add_argument("--layout", default="auto", choices=("auto", "rows", "blocks", "column"),
                   help="ort-block: the formulation (default: chosen per layer)")
    p.add_argument("--max-density", type=float, default=None, help="lower only layers at most this dense")
    p.add_argument("--no-optimize", action="store_true", help="skip the ONNX optimizer after export")
    p.add_argument("--dense-initializers", action="store_true",
                   help="every weight a dense initializer, for runtimes without sparse tensors "
                        "(default: sparse weights as sparse constants where that is smaller)")
    p.add_argument("--transform", choices=FAMILIES, default=None, help="rewrite the model first")
    p.add_argument("--sparsity", type=float, default=0.75, help="with --transform (default 0.75)")
    p.add_argument("--mask", default="uniform", help="with --transform: uniform, erk, nm:2:4, block:32, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=float, default=None, help="with --transform sparse_wide: exact widening")


def run(args: argparse.Namespace) -> int:
    from ..onnx.export import export_onnx
    from ..onnx.api import read_lowering

    if not os.fspath(args.output).endswith(".onnx"):
        raise SparsegraphError(f"-o {args.output}: the output must be a path ending in .onnx")
    check_writable(args.output)
    spec = resolve(args)
    if spec.kind == "onnx":
        raise SparsegraphError(f"{spec.name} is already ONNX; use `sparsegraph lower {spec.name} --target "
                               f"{args.lower if args.lower != 'dense' else 'fold'} -o OUT.onnx`")
    if any(getattr(x, "is_meta", False) for x in spec.example_inputs):
        raise SparsegraphError(f"{spec.name} is too large to allocate here (built on the meta device)")
    model = spec.model
    if args.transform:
        from ..sparsify import sparsify
        model = sparsify(model, spec.example_inputs, args.transform, args.sparsity, args.mask, args.seed,
                         width=args.width)
    path = export_onnx(model, spec.example_inputs, args.output, args.lower, fold=args.fold, block=args.block,
                       max_density=args.max_density, layout=args.layout, optimize=not args.no_optimize,
                       sparse_initializers=not args.dense_initializers)
    choices = read_lowering(path)
    con = console()
    if choices:
        from .lower import print_choices
        print_choices(choices, f"{spec.name}: {args.lower}")
    con.print(f"saved to {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    return 0
