"""The `sparsegraph` command line.

    sparsegraph analyze  [MODEL] [--input-shape 1,3,224,224] [--json] [--groups] [--strict]

MODEL forms: see `sparsegraph.models` (built-ins, torchvision:NAME, hf:ARCH, pkg.module:callable,
.onnx files, saved models). Errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable

from .graph import SparsegraphError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def _console():
    from rich.console import Console
    return Console(width=160)


def resolve(args: argparse.Namespace):
    """MODEL + --input-shape -> ModelSpec with example inputs."""
    from .models import load_model, parse_shape

    spec = load_model(args.model)
    shapes = [parse_shape(s) for s in (args.input_shape or [])]
    if shapes:
        if spec.kind == "onnx":
            spec.example_inputs = tuple(shapes)
        elif spec.make_input is None:
            raise SparsegraphError(f"{spec.name}: --input-shape is not supported for this model form")
        else:
            spec.example_inputs = tuple(x for s in shapes for x in spec.make_input(s))
    return spec


def _capture(spec):
    from .capture import capture

    if spec.kind == "onnx":
        from .capture_onnx import capture_onnx
        names = None
        if spec.example_inputs:
            names = list(spec.example_inputs)
        return capture_onnx(spec.model, name=spec.name, input_shapes=names)
    return capture(spec.model, spec.example_inputs, name=spec.name)


@command("analyze")
def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze

    spec = resolve(args)
    report = analyze(_capture(spec), spectral=args.spectral)
    if report.unknown_ops and args.strict:
        raise SparsegraphError(f"{spec.name}: no dimension rule for op(s) {', '.join(report.unknown_ops)} "
                               "(their axes are kept fixed; drop --strict to accept)")
    if args.json:
        print(report.to_json())
        return 0
    console = _console()
    console.print(report.table())
    if args.groups:
        from rich.table import Table
        t = Table(title="dimension groups", header_style="bold")
        for col in ("id", "sizes", "widenable", "why fixed", "parameters"):
            t.add_column(col)
        for grp in report.groups:
            params = ", ".join(grp["params"][:4]) + (f" +{len(grp['params']) - 4}" if len(grp["params"]) > 4 else "")
            t.add_row(str(grp["id"]), "/".join(map(str, grp["sizes"])), "no" if grp["fixed"] else "yes",
                      ", ".join(grp["reasons"]), params)
        console.print(t)
    return 0


@command("rewrite")
def cmd_rewrite(args: argparse.Namespace) -> int:
    from .graph import SparsegraphError as Err
    from .io import save
    from .passes.emit_torch import emit
    from .passes.sparse_ift import Options, make_plan

    spec = resolve(args)
    if spec.kind == "onnx":
        raise Err(f"{spec.name}: rewriting .onnx files is not supported; rewrite the PyTorch model instead")
    g = _capture(spec)
    opts = Options(args.include_stem, args.include_head, budget_ratio=args.budget_ratio,
                   factorized_bn=args.factorized_bn)
    plan = make_plan(g, args.transform, args.sparsity, args.mask, args.seed, opts)
    meta = any(getattr(x, "is_meta", False) for x in spec.example_inputs)
    if not args.plan_only:
        if meta:
            raise Err(f"{spec.name} is too large to allocate here (built on the meta device); use --plan-only")
        model = emit(g.source, plan)
        model.example_inputs = spec.example_inputs
        from .sparsify import _check
        _check(model, plan)
        if args.output:
            save(model, args.output)
    if args.json:
        print(plan.to_json())
    else:
        console = _console()
        console.print(plan.table())
        if args.output and not args.plan_only:
            console.print(f"saved to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsegraph", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("model", nargs="?", default=None,
                        help="built-in (gpt-mini, resnet18, resnet-mini), torchvision:NAME, hf:ARCH, "
                             "pkg.module:callable, a .onnx file or a saved model (default: gpt-mini)")
        sp.add_argument("--input-shape", action="append", metavar="D0,D1,...",
                        help="shape of the example input (repeat for several inputs)")

    a = sub.add_parser("analyze", help="FLOPs, parameters, roles and dimension groups of a model")
    model_args(a)
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    a.add_argument("--groups", action="store_true", help="also print the dimension groups")
    a.add_argument("--spectral", action="store_true", help="spectral gaps of every mask")
    a.add_argument("--strict", action="store_true", help="fail on ops without a dimension rule")

    r = sub.add_parser("rewrite", help="rewrite a dense model into a Sparse Iso-FLOP Transformation")
    model_args(r)
    r.add_argument("--transform", default="sparse_wide",
                   choices=["sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped"])
    r.add_argument("--sparsity", type=float, default=0.75, help="in [0, 1) (default 0.75)")
    r.add_argument("--mask", default="uniform", help="uniform, erk, nm:2:4, block:32, balanced_block:32")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--include-stem", action="store_true", help="sparsify the first layer too")
    r.add_argument("--include-head", action="store_true", help="sparsify the last layer too")
    r.add_argument("--budget-ratio", type=float, default=None,
                   help="Sparse Wide: target sparse FLOPs as a fraction of the original dense FLOPs")
    r.add_argument("--factorized-bn", action="store_true", help="Sparse Factorized: BN+ReLU between U and V")
    r.add_argument("--plan-only", action="store_true", help="print the plan without building the model")
    r.add_argument("--json", action="store_true", help="print the plan as JSON")
    r.add_argument("-o", "--output", help="write the rewritten model here (load with sg.load)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"sparsegraph: warning: {msg}\n"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="torch|transformers|onnxscript|onnx_ir")
            return COMMANDS[args.command](args)
    except SparsegraphError as e:
        print(f"sparsegraph {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsegraph {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
