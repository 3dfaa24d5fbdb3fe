"""The `sparsegraph` command line.

Every sub-command is a module in `sparsegraph/commands/` with `HELP`, `add_arguments(parser)` and
`run(args) -> int`; the file name is the command name (underscores become dashes). Errors print one
line, `sparsegraph CMD: error: ...`, and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import warnings

from . import commands
from .graph import SparsegraphError


def console():
    from rich.console import Console
    return Console(width=160)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="built-in (gpt-mini, resnet18, resnet-mini), torchvision:NAME, hf:ARCH, "
                             "pkg.module:callable, a .onnx file or a saved model (default: gpt-mini)")
    parser.add_argument("--input-shape", action="append", metavar="D0,D1,...",
                        help="shape of the example input (repeat for several inputs)")


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


def capture_spec(spec):
    from .capture import capture

    if spec.kind == "onnx":
        from .onnx.capture import capture_onnx
        return capture_onnx(spec.model, name=spec.name, input_shapes=list(spec.example_inputs) or None)
    return capture(spec.model, spec.example_inputs, name=spec.name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsegraph", description="Compiler passes for sparse neural networks.")
    sub = p.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        name = info.name.replace("_", "-")
        sp = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
        sp.set_defaults(run=mod.run)
    return p


@contextlib.contextmanager
def quiet_torch_logs():
    """torch.export logs its internal errors and shape specialisations to stderr (dozens of lines
    before the one-line error the CLI prints); the CLI says what went wrong itself. The torch
    loggers are raised to CRITICAL for the command (restored after); TORCH_LOGS keeps them."""
    import logging

    root = logging.getLogger("torch")
    level = root.level
    if not os.environ.get("TORCH_LOGS"):
        root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:  # MODEL / --data as package.module:callable, like python -m
        sys.path.insert(0, os.getcwd())
    warnings.formatwarning = lambda msg, cat, *a, **k: f"sparsegraph: warning: {msg}\n"
    try:
        with warnings.catch_warnings(), quiet_torch_logs():
            warnings.filterwarnings("ignore", module="torch|transformers|onnxscript|onnx_ir")
            return args.run(args)
    except SparsegraphError as e:
        print(f"sparsegraph {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsegraph {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
