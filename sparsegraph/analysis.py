"""`sg.analyze`: capture + dimension groups + layers/roles + FLOPs in one report."""
from __future__ import annotations

from typing import Any

from .capture import capture
from .dims import analyze_dims
from .flops import LayerRow, Report, layer_density, op_flops
from .graph import ModelGraph
from .plan import plan_of
from .layers import find_layers


def analyze(model_or_path: Any, example_inputs: Any = None, *, spectral: bool = False,
            name: str | None = None, graph: ModelGraph | None = None) -> Report:
    """Analyse a model: per-layer and total dense/sparse FLOPs, parameters, roles, dimension groups.

    >>> import sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("resnet18")
    >>> report = sg.analyze(spec.model, spec.example_inputs)
    >>> report.dense_flops == sum(r.dense_flops for r in report.layers) + report.other_flops
    True
    """
    g = graph or (model_or_path if isinstance(model_or_path, ModelGraph) else capture(
        model_or_path, example_inputs, name=name))
    dims = analyze_dims(g)
    layers = find_layers(g)
    plan = plan_of(model_or_path) or plan_of(g.source)
    plan_layers = {w.name: w for w in plan.weights} if plan is not None else {}
    rows, layer_ops = [], set()
    for l in layers:
        op = g.ops[l.op]
        flops = op_flops(g, op)
        density = layer_density(g, l)
        pl = plan_layers.get(l.weight)
        if pl is not None and pl.sparse:
            density = pl.density
        w = g.values[g.params[l.weight]]
        rows.append(LayerRow(l.name, l.op, l.kind, l.role, l.weight, list(w.shape), _numel(w.shape),
                             density, flops, round(flops * density), pl.family if pl and pl.family != "dense" else ""))
        layer_ops.add(l.op)
    other = sum(op_flops(g, op) for op in g if op.name not in layer_ops)
    counted: set[str] = set()
    params = nonzero = 0
    densities = {r.weight: r.density for r in rows}
    for fqn, v in g.params.items():
        val = g.values[v]
        if val.kind != "param" or fqn in counted:
            continue
        counted.add(fqn)
        n = _numel(val.shape)
        params += n
        nonzero += round(n * densities.get(fqn, 1.0))
    dense = sum(r.dense_flops for r in rows) + other
    sparse = sum(r.sparse_flops for r in rows) + other
    report = Report(g.name, g.frontend, rows, dense, sparse, params, nonzero, other,
                    groups=dims.summary(), unknown_ops=sorted({op.target for op in dims.unknown}),
                    plan=plan.to_dict() if plan is not None else None, graph=g)
    if spectral:
        from .spectral import mask_spectra
        report.spectral = mask_spectra(g, layers)
    return report


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
