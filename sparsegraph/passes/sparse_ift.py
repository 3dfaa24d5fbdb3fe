"""Sparse-IFT planning: ModelGraph -> SparsityPlan, one planner per family (DESIGN.md section 2).

  sparse_wide        widen every widenable dimension group by k = 1/sqrt(rho); search the hidden
                     density so total sparse FLOPs equal the original dense FLOPs (or a budget)
  sparse_parallel    ceil(1/rho) parallel copies of density rho, summed (per-branch BN in CNNs)
  sparse_factorized  W -> U (D_in x d) then V (d x D_out), both density rho
  sparse_doped       W x -> S x + V(U x): S sparse (density rho), U V dense of rank d

Planning is pure: it reads the ModelGraph and writes a SparsityPlan; `emit_torch` applies it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..dims import DimGroups, analyze_dims, new_unit
from ..flops import op_flops
from ..graph import Layer, ModelGraph, SparsegraphError
from ..layers import find_layers, param_roles
from ..masks import erk_densities, parse_mask, planned_density
from ..plan import FAMILIES, GroupPlan, SparsityPlan, WeightPlan, branch_norm_path


class PlanError(SparsegraphError):
    pass


@dataclass
class Options:
    include_stem: bool = False  # sparsify (and so count as sparse) the first layer
    include_head: bool = False  # ... and the last
    filter: Callable[[Any, str], bool] | None = None  # (module_or_node, fqn) -> bool
    budget: float | None = None  # Sparse Wide: target sparse FLOPs (absolute) ...
    budget_ratio: float | None = None  # ... or as a fraction of the original dense FLOPs
    factorized_bn: bool = False  # Sparse Factorized: BatchNorm + ReLU between U and V (convs)
    width: float | None = None  # Sparse Wide: widen by this factor at density 1 - s exactly (no iso-FLOP search)
    resolve_module: Callable[[str], Any] | None = field(default=None, repr=False)

    def public(self) -> dict:
        return {"include_stem": self.include_stem, "include_head": self.include_head,
                "filter": getattr(self.filter, "__name__", None) if self.filter else None,
                "budget": self.budget, "budget_ratio": self.budget_ratio, "factorized_bn": self.factorized_bn,
                "width": self.width}


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise PlanError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
def _candidates(g: ModelGraph, layers: list[Layer], opts: Options) -> list[Layer]:
    """Layers that become sparse: hidden linear/conv layers (stem/head on request), not tied
    embeddings or shared weights, and what the user's filter accepts."""
    roles = param_roles(g, layers)
    uses: dict[str, int] = {}
    for l in layers:
        uses[l.weight] = uses.get(l.weight, 0) + 1
    chosen = []
    for l in layers:
        if l.kind not in ("linear", "conv") or roles.get(l.weight) == "embedding" or uses[l.weight] > 1:
            continue
        if l.role == "stem" and not opts.include_stem or l.role == "head" and not opts.include_head:
            continue
        if opts.filter is not None:
            target = opts.resolve_module(l.name) if opts.resolve_module else None
            if not opts.filter(target if target is not None else g.ops[l.op].source, l.name):
                continue
        chosen.append(l)
    if not chosen:
        raise PlanError(f"{g.name}: no layer to sparsify" + (" (the filter selects nothing)" if opts.filter else
                        " (no hidden linear or convolution layers; try include_stem/include_head)"))
    return chosen


def _fan(shape, axes) -> int:
    return math.prod(shape[a] for a in axes) if axes else 1


def _weight(name, source, layer: Layer | None, family, part, role, kind, shape, orig_shape, density,
            mask, seed, dense_flops, out_axis=None, in_axes=()) -> WeightPlan:
    if layer is not None and out_axis is None:
        out_axis, in_axes = layer.out_axis, layer.in_axes
    in_axes = list(in_axes)
    return WeightPlan(
        name=name, source=source, layer=layer.name if layer else name.rsplit(".", 1)[0],
        op=layer.op if layer else "", family=family, part=part, role=role, kind=kind,
        shape=list(shape), orig_shape=list(orig_shape), out_axis=out_axis, in_axes=in_axes,
        fan_in=_fan(shape, in_axes), orig_fan_in=_fan(orig_shape, in_axes),
        fan_out=shape[out_axis] if out_axis is not None else 1,
        orig_fan_out=orig_shape[out_axis] if out_axis is not None else 1,
        density=density, mask=mask if density < 1 else "none", seed=seed,
        dense_flops=int(dense_flops), sparse_flops=round(dense_flops * density))


def _dense_params(g: ModelGraph, layers: list[Layer], skip: set[str], shape_of, family: str,
                  seed: int) -> list[WeightPlan]:
    """Plans for every parameter that stays dense: embeddings, norms, biases, untouched layers."""
    roles = param_roles(g, layers)
    by_weight = {l.weight: l for l in layers}
    by_bias = {l.bias: l for l in layers if l.bias}
    out = []
    for fqn, v in g.params.items():
        val = g.values[v]
        if val.kind != "param" or fqn in skip:
            continue
        role = roles.get(fqn, "other")
        if fqn in by_weight:  # a layer's weight: keeps its axes and its op's FLOPs
            l = by_weight[fqn]
            flops = op_flops(g, g.ops[l.op], shape_of) if l.kind in ("linear", "conv") else 0
            out.append(_weight(fqn, fqn, l, "dense", "weight", role, l.kind, shape_of(v), val.shape,
                               1.0, "none", seed, flops))
        else:  # biases (of linear/conv: "bias"; of norms: "norm") and anything else
            l = by_bias.get(fqn)
            kind = "bias" if role == "bias" else role
            out.append(_weight(fqn, fqn, l, "dense", "bias" if l is not None else kind, role, kind,
                               shape_of(v), val.shape, 1.0, "none", seed, 0, out_axis=0 if val.shape else None))
    return out


def _totals(g: ModelGraph, weights: list[WeightPlan], other_flops: int, original: int) -> dict:
    counted: set[str] = set()
    layer_dense = layer_sparse = 0
    for w in weights:
        layer_dense += w.dense_flops
        layer_sparse += w.sparse_flops
        counted.add(w.name)
    params = sum(math.prod(w.shape) for w in weights)
    nonzero = sum(round(math.prod(w.shape) * w.density) for w in weights)
    return {"original_dense_flops": original, "dense_flops": layer_dense + other_flops,
            "sparse_flops": layer_sparse + other_flops, "other_flops": other_flops,
            "params": params, "nonzero_params": nonzero,
            "original_params": sum(math.prod(g.values[v].shape) for f, v in g.params.items()
                                   if g.values[v].kind == "param")}


def _other_flops(g: ModelGraph, layers: list[Layer], shape_of) -> int:
    layer_ops = {l.op for l in layers if l.kind in ("linear", "conv")}
    return sum(op_flops(g, op, shape_of) for op in g if op.name not in layer_ops)


def _original_flops(g: ModelGraph) -> int:
    return sum(op_flops(g, op) for op in g)


def _bisect(f: Callable[[float], float], lo: float, hi: float, target: float, iters: int = 80) -> float:
    """x in [lo, hi] with f(x) closest to target from below, f increasing."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if f(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo if abs(f(lo) - target) <= abs(f(hi) - target) else hi


# ---------------------------------------------------------------------------------------------
# Sparse Wide
# ---------------------------------------------------------------------------------------------
class _Widening:
    """New sizes of every (value, axis) for a widening factor k."""

    def __init__(self, g: ModelGraph, dims: DimGroups, k: float):
        self.g, self.dims, self.k = g, dims, k
        self.units = {grp.id: new_unit(grp, k) for grp in dims.widenable}
        self._agree()

    def _agree(self) -> None:
        """Groups that share an old size get one new size, the one the most constrained of them
        rounds to (the most units in that size: heads x head_dim, say): a model's code usually
        spells both with one number (GPT-2's attention width is its d_model), so the module form
        can only follow sizes that agree."""
        by_size: dict[int, list] = {}
        for grp in self.dims.widenable:
            for size in set(grp.sizes.values()):
                by_size.setdefault(size, []).append(grp)
        for size, grps in by_size.items():
            lead = max(grps, key=lambda grp: (size // grp.unit, -grp.id))
            new = size // lead.unit * self.units[lead.id]
            for grp in grps:
                scale = size // grp.unit
                if grp is not lead and new % scale == 0 and (new // scale) % grp.step == 0:
                    self.units[grp.id] = new // scale

    def size(self, value: str, axis: int) -> int:
        grp = self.dims.groups[self.dims.of[(value, axis)]]
        if grp.id not in self.units:
            return grp.sizes[(value, axis)]
        return grp.scale((value, axis)) * self.units[grp.id]

    def shape(self, value: str) -> tuple[int, ...]:
        return tuple(self.size(value, a) for a in range(len(self.g.values[value].shape)))


def plan_sparse_wide(g, dims, layers, sparsity, mask, seed, opts) -> SparsityPlan:
    if not dims.widenable:
        raise PlanError(f"{g.name}: no widenable dimension group (every axis touches an input, output, "
                        "dynamic or spatial size); Sparse Wide needs one")
    chosen = _candidates(g, layers, opts)
    kind = parse_mask(mask)
    original = _original_flops(g)
    target = opts.budget if opts.budget is not None else original * (opts.budget_ratio or 1.0)
    rho = 1 - sparsity

    sparse_names = {l.weight for l in chosen}
    matmuls = [l for l in layers if l.kind in ("linear", "conv")]

    def widen(k: float):
        """New sizes for widening k: the widening, fixed FLOPs, and FLOPs per sparse layer."""
        wid = _Widening(g, dims, k)
        fixed = _other_flops(g, layers, wid.shape)
        sparse_flops = {}
        for l in matmuls:
            f = op_flops(g, g.ops[l.op], wid.shape)
            if l.weight in sparse_names:
                sparse_flops[l.weight] = f
            else:
                fixed += f
        return wid, fixed, sparse_flops

    def evaluate(widened, density: float):
        wid, fixed, sparse_flops = widened
        densities = _layer_densities(g, chosen, wid, mask, density)
        return densities, fixed + sum(f * densities[w] for w, f in sparse_flops.items())

    if opts.width is not None:  # width and sparsity chosen independently (sweeps, SμPar experiments)
        if opts.width < 1 or opts.budget is not None or opts.budget_ratio is not None:
            raise PlanError(f"width must be >= 1 and excludes a FLOP budget, got width={opts.width}")
        k, density = float(opts.width), rho
    elif sparsity == 0:
        k, density = 1.0, 1.0
    elif kind.density_fixed is not None:  # N:M: the density is the mask's; search the widening
        density = kind.density_fixed
        if not math.isclose(density, rho, rel_tol=1e-9):
            raise PlanError(f"mask {mask} has density {density:g}, but sparsity {sparsity:g} asks for {rho:g}")
        k = _bisect(lambda kk: evaluate(widen(kk), density)[1], 1.0, 1 / math.sqrt(rho), target, iters=30)
    else:  # widen by 1/sqrt(rho), then search the hidden density (reference Sparse-IFT recipe)
        k = 1 / math.sqrt(rho)
        widened = widen(k)
        lo_total = evaluate(widened, 1e-9)[1]
        if lo_total > target:
            raise PlanError(f"{g.name}: the dense layers alone cost {lo_total:,.0f} FLOPs after widening, over the "
                            f"budget of {target:,.0f}; sparsify the stem/head too (include_stem/include_head) "
                            "or lower the sparsity")
        density = min(1.0, _bisect(lambda d: evaluate(widened, d)[1], 1e-9, 1.0, target))
    widened = widen(k)
    wid = widened[0]
    densities = evaluate(widened, density)[0]
    shape_of = wid.shape
    weights = []
    for l in chosen:
        v = g.params[l.weight]
        f = op_flops(g, g.ops[l.op], shape_of)
        weights.append(_weight(l.weight, l.weight, l, "sparse_wide", "weight", l.role, l.kind, shape_of(v),
                               g.values[v].shape, densities[l.weight], mask, seed, f))
    weights += _dense_params(g, layers, {w.name for w in weights}, shape_of, "sparse_wide", seed)
    order = {name: i for i, name in enumerate(g.params)}
    weights.sort(key=lambda w: order[w.name])
    hidden = [w for w in weights if w.sparse]
    used = 1 - (sum(w.density * math.prod(w.shape) for w in hidden) / sum(math.prod(w.shape) for w in hidden)
                if hidden else 1.0)
    groups = [GroupPlan(grp.id, sorted([[s, s // grp.unit * wid.units[grp.id]] for s in set(grp.sizes.values())]),
                        wid.units[grp.id] / grp.unit, [grp.unit, wid.units[grp.id]],
                        [f"{p}[{a}]" for p, a in grp.params])
              for grp in dims.widenable]
    patches = _patches(g, dims, wid)
    plan = SparsityPlan(g.name, "sparse_wide", sparsity, used, mask, seed, opts.public(), groups, weights, patches,
                        _totals(g, weights, _other_flops(g, layers, shape_of), original))
    plan.notes.append(f"widening k={k:.4f}; hidden density {density:.6f} " + (
        "as given (no iso-FLOP search)" if opts.width is not None else f"searched for a budget of {target:,.0f} FLOPs"))
    return plan


def _layer_densities(g, chosen, wid, mask, density) -> dict[str, float]:
    kind = parse_mask(mask)
    if kind.name == "erk":
        shapes = {l.weight: wid.shape(g.params[l.weight]) for l in chosen}
        return erk_densities(shapes, density)
    return {l.weight: planned_density(mask, wid.shape(g.params[l.weight]), density, l.out_axis, l.in_axes)
            for l in chosen}


def _patches(g: ModelGraph, dims: DimGroups, wid: _Widening) -> list[dict]:
    out = []
    for grp in dims.widenable:
        for p in grp.patches:
            old, new = grp.sizes[p.var], wid.size(*p.var)
            if p.fn == "inv_sqrt":
                val_old, val_new = old ** -0.5, new ** -0.5
            elif p.fn == "groups":
                val_old, val_new = old, new
            else:
                val_old, val_new = old * p.num // p.den, new * p.num // p.den
            if val_old != val_new:
                out.append({"op": p.op, "key": p.key, "index": p.index, "old": val_old, "new": val_new})
    return out


# ---------------------------------------------------------------------------------------------
# local replacements: Sparse Parallel, Factorized, Doped
# ---------------------------------------------------------------------------------------------
def _rank(l: Layer, shape, sparsity: float, family: str) -> int:
    """Inner dimension d (DESIGN.md section 2; Sparse-IFT eqs. for factorized and doped).

    linear W (D_out x D_in), conv k x k (f_out x f_in): with K = prod(kernel) (1 for linear),
      factorized: d = ceil(K f_in f_out / ((K f_in + f_out) rho))
      doped:      d = floor(s K f_in f_out / (K f_in + f_out))
    """
    rho = 1 - sparsity
    f_out, fan_in = shape[l.out_axis], _fan(shape, l.in_axes)  # fan_in = K * f_in
    if family == "sparse_factorized":
        return math.ceil(fan_in * f_out / ((fan_in + f_out) * rho))
    return math.floor(sparsity * fan_in * f_out / (fan_in + f_out))


def _uv_shapes(l: Layer, shape, d: int) -> tuple[tuple, tuple, tuple, tuple]:
    """Shapes (and in_axes) of U (fan_in -> d) and V (d -> f_out) in the layer's own layout."""
    if l.kind == "conv":  # U: k x k conv f_in -> d (stride/padding of the original); V: 1x1 conv d -> f_out
        u = (d, *shape[1:])
        v = (shape[0], d, *([1] * (len(shape) - 2)))
        return u, v, tuple(l.in_axes), tuple(range(1, len(shape)))
    u, v = list(shape), list(shape)
    u[l.out_axis], v[l.in_axes[0]] = d, d  # linear: (out, in); Conv1D/addmm: (in, out)
    return tuple(u), tuple(v), tuple(l.in_axes), tuple(l.in_axes)


def plan_local(g, dims, layers, sparsity, mask, seed, opts, family: str) -> SparsityPlan:
    if opts.budget is not None or opts.budget_ratio is not None:
        raise PlanError(f"{family} keeps each layer's FLOPs; a FLOP budget applies to sparse_wide only")
    chosen = _candidates(g, layers, opts)
    rho = 1 - sparsity
    kind = parse_mask(mask)
    if kind.density_fixed is not None and not math.isclose(kind.density_fixed, rho) and sparsity > 0:
        raise PlanError(f"mask {mask} has density {kind.density_fixed:g}, but sparsity {sparsity:g} asks for {rho:g}")
    if kind.name == "erk":
        raise PlanError(f"{family} replaces each layer locally at density rho; ERK applies to sparse_wide only")
    weights: list[WeightPlan] = []
    notes = []
    branch_norms: dict[str, int] = {}  # BatchNorm parameter -> branches (each branch gets its own copy)
    original = _original_flops(g)
    for l in chosen:
        v = g.params[l.weight]
        shape = g.values[v].shape
        op = g.ops[l.op]
        F = op_flops(g, op)
        per_numel = F / math.prod(shape)  # FLOPs per weight element (every product shares the layer's output positions)
        groups = int(op.args.get("groups") or 1)
        dens = lambda shp, oa, ia: planned_density(mask, shp, rho, oa, ia)  # noqa: E731
        if family == "sparse_parallel":
            n = math.ceil(1 / rho - 1e-9)
            for i in range(n):
                name = l.weight if i == 0 else f"{l.weight.rsplit('.', 1)[0]}.branch{i}.weight"
                d = dens(shape, l.out_axis, l.in_axes)
                weights.append(_weight(name, l.weight, l, family, f"branch{i}", l.role, l.kind, shape, shape,
                                       d, mask, seed, F))
            if _has_branch_norm(g, op):
                bn = g.consumers(op.outputs[0])[0]
                branch_norms.update({fqn: n for fqn, value in g.params.items() if value in bn.inputs})
            elif n > 1:
                notes.append(f"{l.name}: no per-branch normalisation after it, so its {n} branches sum to one "
                             "sparse matrix of the same shape")
        else:
            if groups != 1 or op.args.get("transposed"):
                notes.append(f"{l.name}: grouped or transposed convolution kept dense ({family} needs a plain one)")
                continue
            d = _rank(l, shape, sparsity, family)
            u_shape, v_shape, u_in, v_in = _uv_shapes(l, shape, d)
            prefix = l.weight.rsplit(".", 1)[0]
            v_out = l.out_axis
            if family == "sparse_factorized":
                parts = [("u", u_shape, u_in, rho), ("v", v_shape, v_in, rho)]
            else:
                s_density = dens(shape, l.out_axis, l.in_axes)
                weights.append(_weight(l.weight, l.weight, l, family, "s", l.role, l.kind, shape, shape,
                                       s_density, mask, seed, F))
                parts = [("u", u_shape, u_in, 1.0), ("v", v_shape, v_in, 1.0)] if d > 0 else []
            for part, shp, in_axes, density in parts:
                dd = dens(shp, v_out, in_axes) if density < 1 else 1.0
                weights.append(_weight(f"{prefix}.{part}.weight", l.weight, l, family, part, l.role, l.kind, shp,
                                       shape, dd, mask, seed, per_numel * math.prod(shp),
                                       out_axis=v_out, in_axes=in_axes))
    replaced = {w.source for w in weights}
    weights += _dense_params(g, layers, replaced, g.shape, family, seed)
    for w in [w for w in weights if w.name in branch_norms]:  # the branches' own BatchNorm parameters
        path, leaf = w.name.rsplit(".", 1)
        weights += [replace(w, name=f"{branch_norm_path(path, i)}.{leaf}") for i in range(1, branch_norms[w.name])]
    shape_of = g.shape
    plan = SparsityPlan(g.name, family, sparsity, sparsity, mask, seed, opts.public(), [], weights, [],
                        _totals(g, weights, _other_flops(g, layers, shape_of), original))
    plan.notes += notes
    return plan


def _has_branch_norm(g: ModelGraph, op) -> bool:
    users = g.consumers(op.outputs[0])
    return len(users) == 1 and users[0].op == "batch_norm"


PLANNERS: dict[str, Callable[..., SparsityPlan]] = {
    "sparse_wide": plan_sparse_wide,  # widen groups, search hidden density for iso-FLOPs
    "sparse_parallel": lambda *a: plan_local(*a, family="sparse_parallel"),  # ceil(1/rho) sparse branches
    "sparse_factorized": lambda *a: plan_local(*a, family="sparse_factorized"),  # U then V, both sparse
    "sparse_doped": lambda *a: plan_local(*a, family="sparse_doped"),  # sparse S + dense low-rank U V
}


def make_plan(g: ModelGraph, transform: str = "sparse_wide", sparsity: float = 0.75, mask: str = "uniform",
              seed: int = 0, opts: Options | None = None) -> SparsityPlan:
    """Plan a Sparse-IFT rewrite of a captured model.

    >>> import sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini")
    >>> plan = make_plan(sg.capture(spec.model, spec.example_inputs), "sparse_wide", 0.75)
    >>> abs(plan.flops_ratio - 1) < 1e-3
    True
    """
    if transform not in PLANNERS:
        raise PlanError(f"unknown transform {transform!r}; choose from {', '.join(FAMILIES)}")
    sparsity = _check_sparsity(sparsity)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PlanError(f"seed must be an integer, got {seed!r}")
    try:
        parse_mask(mask)
    except ValueError as e:
        raise PlanError(str(e)) from None
    dims = analyze_dims(g)
    layers = find_layers(g)
    return PLANNERS[transform](g, dims, layers, sparsity, mask, seed, opts or Options())
