"""sparsegraph lower MODEL --target T [-o OUT]: fold and lower a model for a runtime.

ONNX models (`model.onnx`): ONNX-to-ONNX passes for ONNX Runtime (`sg.onnx.lower`):
  fold         BatchNorm into Conv, Sparse Parallel branches and U.V products into single layers
  ort-block    fold, then block-sparse MatMul/Gemm weights -> Gather + batched MatMul (standard ops)
  ort-sparse   fold, then com.microsoft SparseToDenseMatMul (run with sg.onnx.Session)
  ort-native   fold, then the custom ops sparsegraph.SparseLinear (MatMul/Gemm) and SparseConv (Conv):
               the native kernels in ONNX Runtime (run with sg.onnx.Session; needs `sparsegraph
               ort-headers` once)
Other models: export them with `sparsegraph export MODEL --lower ...`.
"""
from __future__ import annotations

import argparse
import os

from ..cli import add_model_arguments, console, resolve
from ..fsutil import check_writable
from ..graph import SparsegraphError

HELP = "fold and lower a model's sparse layers for a runtime (ONNX Runtime for .onnx files)"
ONNX_TARGETS = ("fold", "ort-block", "ort-sparse", "ort-native")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--target", default="ort-block", choices=ONNX_TARGETS,
                   help="fold | ort-block (default) | ort-sparse | ort-native")
    p.add_argument("--no-fold", action="store_true", help="lower without folding first")
    p.add_argument("--block", type=int, default=None,
                   help="ort-block, ort-native: block size (default: the plan's block mask, else the best of "
                        "64/32/16/8)")
    p.add_argument("--max-density", type=float, default=None,
                   help="lower only layers whose (padded block) density is at most this (default 0.5)")
    p.add_argument("--layout", default="auto", choices=("auto", "rows", "blocks", "column"),
                   help="ort-block: the formulation (default: chosen per layer)")
    p.add_argument("--json", action="store_true", help="print the lowering choices as JSON")
    p.add_argument("--dense-initializers", action="store_true",
                   help="every weight a dense initializer, for runtimes without sparse tensors "
                        "(default: sparse weights as sparse constants where that is smaller)")
    p.add_argument("-o", "--output", help="write the lowered model here")


def run(args: argparse.Namespace) -> int:
    spec = resolve(args)
    if spec.kind == "onnx":
        return _lower_onnx(spec, args)
    raise SparsegraphError(f"{spec.name}: `sparsegraph lower` works on .onnx files here; export a PyTorch model "
                           f"with `sparsegraph export {spec.name} --lower {args.target} -o OUT.onnx`")


def _lower_onnx(spec, args: argparse.Namespace) -> int:
    from ..onnx.api import lower, read_lowering

    if args.output and not os.fspath(args.output).endswith(".onnx"):
        raise SparsegraphError(f"{spec.name}: give -o a path ending in .onnx")
    if args.output:
        check_writable(args.output)
    from ..onnx.api import check_opset, load

    source = load(spec.model)  # read once: counted here, lowered on a copy
    check_opset(source, spec.name)
    before = _layer_ops(source)
    model = lower(source, args.target, fold=not args.no_fold, block=args.block, max_density=args.max_density,
                  layout=args.layout, output=args.output, sparse_initializers=not args.dense_initializers)
    choices = read_lowering(model)
    if args.json:
        import json
        print(json.dumps(choices, indent=1, sort_keys=True))
        return 0
    con = console()
    after = _layer_ops(model)
    if not args.no_fold:
        con.print("folded: " + ", ".join(f"{op} {before.get(op, 0)} -> {after.get(op, 0)}"
                                         for op in sorted(set(before) | set(after))))
    if args.target != "fold":
        print_choices(choices, f"{spec.name}: {args.target}")
    if args.output:
        con.print(f"saved to {args.output}")
    return 0


def _layer_ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph:
        if n.op_type in ("MatMul", "Gemm", "Conv", "BatchNormalization"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def print_choices(choices: dict, title: str) -> None:
    from rich.table import Table

    t = Table(title=title, header_style="bold")
    for col in ("weight", "target", "layout", "shape (K x N)", "block", "blocks/column", "density run",
                "weight density"):
        t.add_column(col)
    for name, c in sorted(choices.items()):
        t.add_row(name, c["target"], c.get("layout", ""), "x".join(map(str, c["shape"])), str(c.get("block", "")),
                  str(c.get("blocks_per_column", "")), f"{c['density']:.3f}", f"{c.get('weight_density', c['density']):.3f}")
    console().print(t if choices else f"{title}: no MatMul/Gemm weight sparse enough to lower")
