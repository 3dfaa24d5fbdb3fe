"""sparsegraph analyze [MODEL]: FLOPs, parameters, roles, dimension groups and mask spectra."""
from __future__ import annotations

import argparse

from ..cli import add_model_arguments, capture_spec, console, resolve
from ..graph import SparsegraphError

HELP = "FLOPs, parameters, roles and dimension groups of a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--groups", action="store_true", help="also print the dimension groups")
    p.add_argument("--spectral", action="store_true", help="spectral gaps of every mask")
    p.add_argument("--strict", action="store_true", help="fail on ops without a dimension rule")


def run(args: argparse.Namespace) -> int:
    from ..analysis import analyze

    spec = resolve(args)
    g = capture_spec(spec)
    report = analyze(spec.model if spec.kind == "saved" else g, spec.example_inputs, spectral=args.spectral,
                     graph=g)
    if report.unknown_ops and args.strict:
        raise SparsegraphError(f"{spec.name}: no dimension rule for op(s) {', '.join(report.unknown_ops)} "
                               "(their axes are kept fixed; drop --strict to accept)")
    if args.json:
        print(report.to_json())
        return 0
    out = console()
    out.print(report.table())
    if args.groups:
        from rich.table import Table
        t = Table(title="dimension groups", header_style="bold")
        for col in ("id", "sizes", "widenable", "why fixed", "parameters"):
            t.add_column(col)
        for grp in report.groups:
            params = ", ".join(grp["params"][:4]) + (f" +{len(grp['params']) - 4}" if len(grp["params"]) > 4 else "")
            t.add_row(str(grp["id"]), "/".join(map(str, grp["sizes"])), "no" if grp["fixed"] else "yes",
                      ", ".join(grp["reasons"]), params)
        out.print(t)
    return 0
