"""sparsegraph rewrite [MODEL] --transform T --sparsity S [-o OUT]: a Sparse-IFT rewrite."""
from __future__ import annotations

import argparse

from ..cli import add_model_arguments, capture_spec, console, resolve
from ..fsutil import check_writable
from ..graph import SparsegraphError
from ..plan import FAMILIES

HELP = "rewrite a dense model into a Sparse Iso-FLOP Transformation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--transform", default="sparse_wide", choices=FAMILIES)
    p.add_argument("--sparsity", type=float, default=0.75, help="in [0, 1) (default 0.75)")
    p.add_argument("--mask", default="uniform", help="uniform, erk, nm:2:4, block:32, balanced_block:32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include-stem", action="store_true", help="sparsify the first layer too")
    p.add_argument("--include-head", action="store_true", help="sparsify the last layer too")
    p.add_argument("--budget-ratio", type=float, default=None,
                   help="Sparse Wide: target sparse FLOPs as a fraction of the original dense FLOPs")
    p.add_argument("--width", type=float, default=None,
                   help="Sparse Wide: widen by exactly this factor at density 1 - sparsity (no iso-FLOP search)")
    p.add_argument("--factorized-bn", action="store_true", help="Sparse Factorized: BN+ReLU between U and V")
    p.add_argument("--plan-only", action="store_true", help="print the plan without building the model")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("-o", "--output", help="write the rewritten model here (load with sg.load)")
    p.add_argument("--dense-initializers", action="store_true",
                   help="ONNX output: every weight a dense initializer, for runtimes without sparse tensors "
                        "(default: sparse weights as sparse constants where that is smaller)")


def run(args: argparse.Namespace) -> int:
    from ..io import save
    from ..passes.sparse_ift import Options, make_plan
    from ..sparsify import sparsify

    if args.output and not args.plan_only:
        check_writable(args.output)
    spec = resolve(args)
    opts = Options(args.include_stem, args.include_head, budget_ratio=args.budget_ratio,
                   factorized_bn=args.factorized_bn, width=args.width)
    plan_for = lambda g: make_plan(g, args.transform, args.sparsity, args.mask, args.seed, opts)  # noqa: E731
    if spec.kind == "onnx":
        from ..onnx.api import rewrite_file
        plan = rewrite_file(spec, plan_for, None if args.plan_only else args.output,
                            sparse_initializers=not args.dense_initializers)
        return _report(plan, args)
    g = capture_spec(spec)
    plan = plan_for(g)
    if not args.plan_only:
        if any(getattr(x, "is_meta", False) for x in spec.example_inputs):
            raise SparsegraphError(f"{spec.name} is too large to allocate here (built on the meta device); "
                                   "use --plan-only")
        model = sparsify(spec.model, spec.example_inputs, plan=plan, graph=g)  # the model itself, verified
        if args.output:
            save(model, args.output)
    return _report(plan, args)


def _report(plan, args: argparse.Namespace) -> int:
    if args.json:
        print(plan.to_json())
        return 0
    out = console()
    out.print(plan.table())
    if args.output and not args.plan_only:
        out.print(f"saved to {args.output}")
    return 0
