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

import torch

from ..dims import DimGroups, analyze_dims, new_unit
from ..flops import op_flops
from ..graph import Layer, ModelGraph, SparsegraphError
from ..layers import find_layers, param_roles
from ..masks import density_steps, erk_densities, parse_mask, planned_density
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
    include_router: bool = False  # sparsify MoE routers too (by default they stay dense, as the experts' choice)

    def public(self) -> dict:
        return {"include_stem": self.include_stem, "include_head": self.include_head,
                "filter": getattr(self.filter, "__name__", None) if self.filter else None,
                "budget": self.budget, "budget_ratio": self.budget_ratio, "factorized_bn": self.factorized_bn,
                "width": self.width, "include_router": self.include_router}


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise PlanError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
def _candidates(g: ModelGraph, layers: list[Layer], opts: Options) -> list[Layer]:
    """Layers that become sparse: hidden linear/conv layers (stem/head on request), not tied
    embeddings, and what the user's filter accepts. A weight shared by several ops (ALBERT's one
    layer applied at every depth) is chosen once, at its first use; its plan covers every use."""
    roles = param_roles(g, layers)
    chosen, seen = [], set()
    for l in layers:
        if l.kind not in ("linear", "conv") or roles.get(l.weight) == "embedding" or l.weight in seen:
            continue
        seen.add(l.weight)
        if l.role == "stem" and not opts.include_stem or l.role == "head" and not opts.include_head \
                or l.role == "router" and not opts.include_router:
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


def part_name(weight: str, part: str) -> str:
    """The name of a new parameter replacing `weight`: `branch<i>`, `u` or `v` (and `uv_bn`, a module).

    `<module>.<part>.weight` for a parameter named `weight` (nn.Linear, nn.Conv*: `fc.u.weight`);
    `<module>.<name>_<part>` beside any other parameter, so two weights of one module (an MoE's
    `experts.gate_up_proj` and `experts.down_proj`) never share a name (`experts.gate_up_proj_u`)."""
    module, _, leaf = weight.rpartition(".")
    if leaf == "weight" and module:
        return f"{module}.{part}" if part == "uv_bn" else f"{module}.{part}.weight"
    return f"{weight}_{part}"


def _fan(shape, axes) -> int:
    return math.prod(shape[a] for a in axes) if axes else 1


def _weight(name, source, layer: Layer | None, family, part, role, kind, shape, orig_shape, density,
            mask, seed, dense_flops, out_axis=None, in_axes=()) -> WeightPlan:
    if layer is not None and out_axis is None:
        out_axis, in_axes = layer.out_axis, layer.in_axes
    in_axes = list(in_axes)
    batch = list(layer.batch_axes) if layer is not None and out_axis is not None else []
    return WeightPlan(
        name=name, source=source, layer=layer.name if layer else name.rsplit(".", 1)[0],
        op=layer.op if layer else "", family=family, part=part, role=role, kind=kind,
        shape=list(shape), orig_shape=list(orig_shape), out_axis=out_axis, in_axes=in_axes,
        fan_in=_fan(shape, in_axes), orig_fan_in=_fan(orig_shape, in_axes),
        fan_out=shape[out_axis] if out_axis is not None else 1,
        orig_fan_out=orig_shape[out_axis] if out_axis is not None else 1,
        density=density, mask=mask if density < 1 else "none", seed=seed,
        dense_flops=int(dense_flops), sparse_flops=round(dense_flops * density), batch_axes=batch)


def _dense_params(g: ModelGraph, layers: list[Layer], skip: set[str], shape_of, family: str,
                  seed: int) -> list[WeightPlan]:
    """Plans for every parameter that stays dense: embeddings, norms, biases, untouched layers."""
    roles = param_roles(g, layers)
    by_weight = {l.weight: l for l in layers}
    by_bias = {l.bias: l for l in layers if l.bias}
    uses: dict[str, list[Layer]] = {}
    for l in layers:
        uses.setdefault(l.weight, []).append(l)
    out = []
    for fqn, v in g.params.items():
        val = g.values[v]
        if val.kind != "param" or fqn in skip:
            continue
        role = roles.get(fqn, "other")
        if fqn in by_weight:  # a layer's weight: keeps its axes and the FLOPs of every op reading it
            l = by_weight[fqn]
            flops = sum(op_flops(g, g.ops[u.op], shape_of) for u in uses[fqn] if u.kind in ("linear", "conv"))
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
# iso-FLOP allocation: densities on the masks' grids whose FLOPs add up to the budget
# ---------------------------------------------------------------------------------------------
ISO_TOLERANCE = 1e-3  # every family lands within 0.1% of its FLOP budget, or the plan says why not


@dataclass
class _Share:
    """One sparse weight's share of the budget: it wants density `want` of its `dense` FLOPs; its mask
    can only realise densities c / steps (None: the kind's own density, N:M)."""
    name: str
    dense: float
    want: float
    steps: int | None
    fixed: float | None = None  # N:M density


def _allocate(shares: list[_Share], carry: float = 0.0) -> tuple[dict[str, float], float]:
    """Densities on each mask's grid whose total FLOPs track sum(want * dense): error diffusion, coarse
    grids first so the finest absorbs what is left (the total is off by at most half its step).
    Returns (density per weight, FLOPs still missing)."""
    out = {}
    for sh in sorted(shares, key=lambda sh: -(sh.dense / sh.steps if sh.steps else math.inf)):
        if sh.steps is None:  # N:M: nothing to choose
            out[sh.name] = sh.fixed
            carry += (sh.want - sh.fixed) * sh.dense
            continue
        goal = sh.want * sh.dense + carry
        c = min(sh.steps, max(1, round(goal / sh.dense * sh.steps))) if sh.dense > 0 else \
            min(sh.steps, max(1, round(sh.want * sh.steps)))
        out[sh.name] = c / sh.steps
        carry = goal - out[sh.name] * sh.dense
    return out, carry


def _share(name: str, mask: str, shape, dense: float, want: float, out_axis, in_axes, batch_axes=()) -> _Share:
    kind = parse_mask(mask)
    steps = density_steps(kind, tuple(shape), out_axis, tuple(in_axes), tuple(batch_axes))
    fixed = None if kind.density_fixed is None else \
        planned_density(kind, tuple(shape), kind.density_fixed, out_axis, tuple(in_axes), tuple(batch_axes))
    return _Share(name, float(dense), want, steps, fixed)


def _iso_note(plan_total: float, target: float, steps: list[tuple[str, float]], what: str) -> str | None:
    """A note when the planned total misses the budget by more than the tolerance. The error diffusion
    leaves at most half of the finest step (FLOPs of one grid step of a weight's density or rank), so
    that step, over the tolerance, is the cause: the note names it."""
    if target <= 0 or abs(plan_total / target - 1) <= ISO_TOLERANCE:
        return None
    finest = min(steps, key=lambda t: t[1], default=None)
    cause = f"; the finest step, {finest[0]}'s, is {finest[1] / target:.2%} of the budget" if finest else ""
    return (f"iso-FLOP: planned sparse FLOPs are {plan_total / target:.4f}x the budget, beyond the "
            f"{ISO_TOLERANCE:.1%} tolerance: {what} too coarse{cause}")


# ---------------------------------------------------------------------------------------------
# Sparse Wide
# ---------------------------------------------------------------------------------------------
class _Widening:
    """New sizes of every (value, axis) for a widening factor k."""

    def __init__(self, g: ModelGraph, dims: DimGroups, k: float, multiples: dict[int, int] | None = None,
                 units: dict[int, int] | None = None):
        self.g, self.dims, self.k = g, dims, k
        self.units = {grp.id: new_unit(grp, k, (multiples or {}).get(grp.id, 1)) for grp in dims.widenable}
        self._agree()
        self.units.update(units or {})

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


def _block_multiples(g: ModelGraph, dims: DimGroups, chosen: list[Layer], mask: str) -> dict[int, int]:
    """Per widenable group, the step its unit needs so that the rows and fan-in of every sparse weight
    are whole blocks (block:B, balanced_block:B): no ragged edge blocks in the lowered products."""
    kind = parse_mask(mask)
    if kind.block is None:
        return {}
    out: dict[int, int] = {}
    for l in chosen:
        v = g.params[l.weight]
        for axis in (l.out_axis, *l.in_axes):
            grp = dims.group(v, axis)
            if grp.widenable:
                scale = grp.scale((v, axis))
                out[grp.id] = math.lcm(out.get(grp.id, 1), kind.block // math.gcd(kind.block, scale))
    return out


def plan_sparse_wide(g, dims, layers, sparsity, mask, seed, opts) -> SparsityPlan:
    if not dims.widenable:
        raise PlanError(f"{g.name}: no widenable dimension group (every axis touches an input, output, "
                        "dynamic or spatial size); Sparse Wide needs one")
    chosen = _candidates(g, layers, opts)
    kind = parse_mask(mask)
    original = _original_flops(g)
    target = opts.budget if opts.budget is not None else original * (opts.budget_ratio or 1.0)
    rho = 1 - sparsity
    multiples = _block_multiples(g, dims, chosen, mask)

    sparse_names = {l.weight for l in chosen}
    matmuls = [l for l in layers if l.kind in ("linear", "conv")]
    notes: list[str] = []

    def widen(k: float, units: dict[int, int] | None = None):
        """New sizes for widening k: the widening, fixed FLOPs, and FLOPs per sparse layer."""
        wid = _Widening(g, dims, k, multiples, units)
        fixed = _other_flops(g, layers, wid.shape)
        sparse_flops = {}
        for l in matmuls:
            f = op_flops(g, g.ops[l.op], wid.shape)
            if l.weight in sparse_names:
                sparse_flops[l.weight] = sparse_flops.get(l.weight, 0) + f
            else:
                fixed += f
        return wid, fixed, sparse_flops

    def evaluate(widened, density: float):
        wid, fixed, sparse_flops = widened
        densities = _layer_densities(g, chosen, wid, mask, density)
        return densities, fixed + sum(f * densities[w] for w, f in sparse_flops.items())

    def continuous(widened, density: float) -> dict[str, float]:
        """Per-layer densities before the masks' grids: uniform, or ERK's distribution."""
        wid = widened[0]
        if kind.name == "erk":
            return erk_densities({l.weight: wid.shape(g.params[l.weight]) for l in chosen}, density)
        return {l.weight: density for l in chosen}

    if opts.width is not None:  # width and sparsity chosen independently (sweeps, SμPar experiments)
        if opts.width < 1 or opts.budget is not None or opts.budget_ratio is not None:
            raise PlanError(f"width must be >= 1 and excludes a FLOP budget, got width={opts.width}")
        k, density = float(opts.width), rho
        widened = widen(k)
        densities = evaluate(widened, density)[0]
    elif sparsity == 0:
        k, density = 1.0, 1.0
        widened = widen(k)
        densities = evaluate(widened, density)[0]
    elif kind.density_fixed is not None:  # N:M: the density is the mask's; search the widening
        density = kind.density_fixed
        if not math.isclose(density, rho, rel_tol=1e-9):
            raise PlanError(f"mask {mask} has density {density:g}, but sparsity {sparsity:g} asks for {rho:g}")
        total_at = lambda kk: evaluate(widen(kk), density)[1]  # noqa: E731
        k = _bisect(total_at, 1.0, 1 / math.sqrt(rho), target, iters=30)
        if total_at(k) > target:  # the largest common widening under the budget ...
            k = _bisect(lambda kk: total_at(kk) if total_at(kk) <= target else math.inf, 1.0, k, target, iters=30)
        widened = _fill_widths(widen, k, evaluate, density, target, dims, multiples)  # ... then group by group
        densities = evaluate(widened, density)[0]
    else:  # widen by 1/sqrt(rho), then search the hidden density (reference Sparse-IFT recipe)
        k = 1 / math.sqrt(rho)
        widened = widen(k)
        wid, fixed, sparse_flops = widened
        if fixed + sum(sparse_flops.values()) * 1e-9 > target:
            raise PlanError(f"{g.name}: the dense layers alone cost {fixed:,.0f} FLOPs after widening, over the "
                            f"budget of {target:,.0f}; sparsify the stem/head too (include_stem/include_head) "
                            "or lower the sparsity")

        def total(d: float) -> float:  # FLOPs with continuous (not yet gridded) densities
            dens = continuous(widened, d)
            return fixed + sum(f * dens[w] for w, f in sparse_flops.items())

        density = min(1.0, _bisect(total, 1e-9, 1.0, target))
        want = continuous(widened, density)
        shares = [_share(l.weight, mask, wid.shape(g.params[l.weight]), sparse_flops[l.weight], want[l.weight],
                         l.out_axis, l.in_axes, l.batch_axes) for l in chosen]
        densities, _ = _allocate(shares, target - total(density))
    wid, fixed, sparse_flops = widened
    shape_of = wid.shape
    weights = []
    for l in chosen:
        v = g.params[l.weight]
        f = sparse_flops[l.weight]
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
    totals = _totals(g, weights, _other_flops(g, layers, shape_of), original)
    plan = SparsityPlan(g.name, "sparse_wide", sparsity, used, mask, seed, opts.public(), groups, weights, patches,
                        totals, tables=_tables(g, dims, wid))
    plan.notes.append(f"widening k={k:.4f}; hidden density {density:.6f} " + (
        "as given (no iso-FLOP search)" if opts.width is not None else f"searched for a budget of {target:,.0f} FLOPs"))
    if opts.width is None and sparsity > 0:
        coarse = [(w.name, w.dense_flops / density_steps(mask, tuple(w.shape), w.out_axis, tuple(w.in_axes),
                                                         tuple(w.batch_axes))) for w in hidden] \
            if kind.density_fixed is None else []
        note = _iso_note(totals["sparse_flops"], target, coarse,
                         "the widths' rounding" if kind.density_fixed is not None else "the masks' density grids")
        if note:
            plan.notes.append(note)
    plan.notes += notes
    return plan


def _fill_widths(widen, k: float, evaluate, density: float, target: float, dims: DimGroups,
                 multiples: dict[int, int], rounds: int = 24):
    """N:M fixes the density, so the widths carry the budget: from the common widening k (under the
    budget), grow single groups by one step at a time, the largest step that still fits first; then
    take one more step if that lands closer to the budget. Returns widen(...) of the result."""
    widened = widen(k)
    units = dict(widened[0].units)
    steps = {grp.id: math.lcm(grp.step, multiples.get(grp.id, 1)) for grp in dims.widenable}
    total = evaluate(widened, density)[1]
    for _ in range(rounds):
        best = None
        over = None
        for gid, step in steps.items():
            trial = {**units, gid: units[gid] + step}
            t = evaluate(widen(k, trial), density)[1]
            if t <= target and (best is None or t > best[1]):
                best = (trial, t)
            elif t > target and (over is None or t < over[1]):
                over = (trial, t)
        if best is None:
            if over is not None and over[1] - target < target - total:
                units, total = over
            break
        units, total = best
    return widen(k, units)


def _layer_densities(g, chosen, wid, mask, density) -> dict[str, float]:
    kind = parse_mask(mask)
    if kind.name == "erk":
        shapes = {l.weight: wid.shape(g.params[l.weight]) for l in chosen}
        return erk_densities(shapes, density)
    return {l.weight: planned_density(mask, wid.shape(g.params[l.weight]), density, l.out_axis, l.in_axes,
                                      l.batch_axes) for l in chosen}


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


def _tables(g: ModelGraph, dims: DimGroups, wid: _Widening) -> list[dict]:
    """Size-derived buffers whose axes were widened: recomputed by their rule (`sparsegraph.tables`)."""
    out = []
    for fqn, (rule, params) in dims.tables.items():
        v = g.params.get(fqn) or next((n for n, val in g.values.items() if val.param == fqn), None)
        if v is None:
            continue
        old, new = list(g.values[v].shape), list(wid.shape(v))
        if old != new:
            out.append({"name": fqn, "rule": rule, "params": params, "orig_shape": old, "shape": new})
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
    u[l.out_axis], v[l.in_axes[0]] = d, d  # linear: (out, in); Conv1D/addmm: (in, out); experts: (E, out, in)
    return tuple(u), tuple(v), tuple(l.in_axes), tuple(l.in_axes)


def plan_local(g, dims, layers, sparsity, mask, seed, opts, family: str) -> SparsityPlan:
    """Sparse Parallel, Factorized and Doped: each layer replaced on its own, at its own FLOPs.

    The branch count and the ranks are whole numbers, so the densities are searched after rounding
    them (DESIGN.md section 2 gives the nominal ones): Parallel's n branches get density 1/n each,
    Factorized's U and V the density that makes their FLOPs the layer's, Doped's S whatever the dense
    U V leaves. Masks realise densities on a grid (elements, blocks, block-rows), so the densities are
    then put on it with error diffusion across layers (`_allocate`): the total is within 0.1% of the
    original's FLOPs, or a note names the layers whose grid is too coarse. N:M fixes the density, so
    there the ranks are rounded with the same diffusion instead.
    """
    if opts.budget is not None or opts.budget_ratio is not None:
        raise PlanError(f"{family} keeps each layer's FLOPs; a FLOP budget applies to sparse_wide only")
    chosen = _candidates(g, layers, opts)
    rho = 1 - sparsity
    kind = parse_mask(mask)
    if kind.density_fixed is not None and not math.isclose(kind.density_fixed, rho) and sparsity > 0:
        raise PlanError(f"mask {mask} has density {kind.density_fixed:g}, but sparsity {sparsity:g} asks for {rho:g}")
    if kind.name == "erk":
        raise PlanError(f"{family} replaces each layer locally at density rho; ERK applies to sparse_wide only")
    nm = kind.density_fixed is not None
    weights: list[WeightPlan] = []
    notes = []
    shares: list[_Share] = []
    coarse: list[tuple[str, float]] = []  # (layer, FLOPs of one step of its rank or density grid)
    branch_norms: dict[str, int] = {}  # BatchNorm parameter -> branches (each branch gets its own copy)
    original = _original_flops(g)
    rank_carry = 0.0  # N:M: FLOPs the rounded ranks so far are short of
    uses: dict[str, list[Layer]] = {}
    for l in layers:
        uses.setdefault(l.weight, []).append(l)
    for l in chosen:
        v = g.params[l.weight]
        shape = g.values[v].shape
        op = g.ops[l.op]
        F = sum(op_flops(g, g.ops[u.op]) for u in uses[l.weight])  # every op the weight takes part in
        per_numel = F / math.prod(shape)  # FLOPs per weight element (every product shares the layer's output positions)
        groups = int(op.args.get("groups") or 1)
        if family == "sparse_parallel":
            n = math.ceil(1 / rho - 1e-9)
            if sparsity > 0 and _too_coarse(mask, shape, 1.0 / n, l):
                notes.append(_coarse_note(l, mask, 1.0 / n))
                continue
            for i in range(n):
                name = l.weight if i == 0 else part_name(l.weight, f"branch{i}")
                weights.append(_weight(name, l.weight, l, family, f"branch{i}", l.role, l.kind, shape, shape,
                                       1.0 / n, mask, seed, F))
                shares.append(_share(name, mask, shape, F, 1.0 / n, l.out_axis, l.in_axes, l.batch_axes))
            if nm and not math.isclose(n * rho, 1.0):
                coarse.append((l.name, F * rho))
            if _has_branch_norm(g, op):
                bn = g.consumers(op.outputs[0])[0]
                branch_norms.update({fqn: n for fqn, value in g.params.items() if value in bn.inputs})
            elif n > 1:
                notes.append(f"{l.name}: no per-branch normalisation after it, so its {n} branches sum to one "
                             "sparse matrix of the same shape")
            continue
        if groups != 1 or op.args.get("transposed"):
            notes.append(f"{l.name}: grouped or transposed convolution kept dense ({family} needs a plain one)")
            continue
        f_out, fan_in = shape[l.out_axis], _fan(shape, l.in_axes)
        step = per_numel * (fan_in + f_out)  # dense FLOPs of one unit of rank (a row of U and a column of V)
        if family == "sparse_factorized":
            if nm and sparsity > 0:  # density fixed: the rank carries the budget, rounded with diffusion
                exact = (F + rank_carry) / (rho * step)
                d = max(1, round(exact))
                u_shape, v_shape, u_in, v_in = _uv_shapes(l, shape, d)
                rank_carry += F - per_numel * sum(
                    math.prod(shp) * planned_density(kind, shp, rho, l.out_axis, ins, l.batch_axes)
                    for shp, ins in ((u_shape, u_in), (v_shape, v_in)))
                coarse.append((l.name, rho * step))
            else:
                d = _rank(l, shape, sparsity, family)
                if kind.block and sparsity > 0:  # U's rows and V's columns in whole blocks: no ragged edge
                    d = -(-d // kind.block) * kind.block
            u_shape, v_shape, u_in, v_in = _uv_shapes(l, shape, d)
            uv_flops = per_numel * (math.prod(u_shape) + math.prod(v_shape))
            want = 1.0 if sparsity == 0 else min(1.0, F / uv_flops)  # the density after rounding d
            if sparsity > 0 and any(_too_coarse(mask, shp, want, l, ins) for shp, ins in ((u_shape, u_in),
                                                                                           (v_shape, v_in))):
                notes.append(_coarse_note(l, mask, want))
                continue
            parts = [("u", u_shape, u_in, want), ("v", v_shape, v_in, want)]
        else:
            if nm and sparsity > 0:  # S has the kind's density; the dense rank makes up the rest
                s_density = planned_density(kind, shape, rho, l.out_axis, l.in_axes, l.batch_axes)
                exact = ((1 - s_density) * F + rank_carry) / step
                d = max(0, round(exact))
                rank_carry += (1 - s_density) * F - d * step
                coarse.append((l.name, step))
            else:
                d = _rank(l, shape, sparsity, family)
            u_shape, v_shape, u_in, v_in = _uv_shapes(l, shape, d)
            uv_flops = per_numel * (math.prod(u_shape) + math.prod(v_shape)) if d > 0 else 0.0
            s_want = 1.0 if sparsity == 0 else max(0.0, min(1.0, (F - uv_flops) / F))  # S fills the budget
            if sparsity > 0 and _too_coarse(mask, shape, s_want, l):
                notes.append(_coarse_note(l, mask, s_want))
                continue
            weights.append(_weight(l.weight, l.weight, l, family, "s", l.role, l.kind, shape, shape,
                                   s_want, mask, seed, F))
            shares.append(_share(l.weight, mask, shape, F, s_want, l.out_axis, l.in_axes, l.batch_axes))
            parts = [("u", u_shape, u_in, 1.0), ("v", v_shape, v_in, 1.0)] if d > 0 else []
        for part, shp, in_axes, density in parts:
            name = part_name(l.weight, part)
            weights.append(_weight(name, l.weight, l, family, part, l.role, l.kind, shp, shape, density, mask, seed,
                                   per_numel * math.prod(shp), out_axis=l.out_axis, in_axes=in_axes))
            if density < 1:
                shares.append(_share(name, mask, shp, per_numel * math.prod(shp), density, l.out_axis, in_axes,
                                     l.batch_axes))
        if family == "sparse_factorized" and opts.factorized_bn and l.kind == "conv":
            for leaf in ("weight", "bias"):  # the BatchNorm between U and V (emitted as `<layer>.uv_bn`)
                weights.append(_weight(f"{part_name(l.weight, 'uv_bn')}.{leaf}", l.weight, None, family, "norm", "norm", "norm",
                                       [d], [d], 1.0, "none", seed, 0, out_axis=0))
    if sparsity > 0:
        densities, _ = _allocate(shares)
        for w in weights:
            if w.name in densities and w.family != "dense":
                _set_density(w, densities[w.name], mask)
    replaced = {w.source for w in weights}
    weights += _dense_params(g, layers, replaced, g.shape, family, seed)
    for w in [w for w in weights if w.name in branch_norms]:  # the branches' own BatchNorm parameters
        path, leaf = w.name.rsplit(".", 1)
        weights += [replace(w, name=f"{branch_norm_path(path, i)}.{leaf}") for i in range(1, branch_norms[w.name])]
    shape_of = g.shape
    totals = _totals(g, weights, _other_flops(g, layers, shape_of), original)
    sparse_w = [w for w in weights if w.sparse]
    used = 1 - (sum(w.density * math.prod(w.shape) for w in sparse_w) / sum(math.prod(w.shape) for w in sparse_w)
                if sparse_w else 1.0)
    plan = SparsityPlan(g.name, family, sparsity, used, mask, seed, opts.public(), [], weights, [], totals)
    if sparsity > 0:
        coarse += [(w.name, w.dense_flops / (density_steps(mask, tuple(w.shape), w.out_axis, tuple(w.in_axes),
                                                           tuple(w.batch_axes)) or 1)) for w in sparse_w
                   if not nm]
        note = _iso_note(totals["sparse_flops"], original, coarse,
                         "the ranks' rounding (N:M fixes the density)" if nm else "the masks' density grids")
        if note:
            notes.append(note)
    plan.notes += notes
    return plan


def _too_coarse(mask: str, shape, want: float, l: Layer, in_axes=None) -> bool:
    """The mask's finest density step on this weight is over twice the density it needs (a 16-block
    row of a depthwise 3x3 kernel is the whole row): sparse, it would cost twice its share or more."""
    steps = density_steps(mask, tuple(shape), l.out_axis, tuple(l.in_axes if in_axes is None else in_axes),
                          tuple(l.batch_axes))
    return steps is not None and steps * want < 0.5


def _coarse_note(l: Layer, mask: str, want: float) -> str:
    return (f"{l.name}: kept dense, its {mask} grid cannot reach density {want:.3f} (its smallest step is over "
            "twice that)")


def _set_density(w: WeightPlan, density: float, mask: str) -> None:
    w.density = density
    w.mask = mask if density < 1 else "none"
    w.sparse_flops = round(w.dense_flops * density)


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
    plan = PLANNERS[transform](g, dims, layers, sparsity, mask, seed, opts or Options())
    _record_base_init(g, plan)
    return plan


def measure_init(t) -> dict:
    """A tensor's initialisation as its values show it: {"dist", "std"} with dist normal | uniform
    (|w| stays within ~√3 std) | zeros | ones | constant; {} when there are no values (meta device)."""
    if t is None or not isinstance(t, torch.Tensor) or t.is_meta or t.numel() == 0 or not t.is_floating_point():
        return {}
    v = t.detach().double()
    std = float(v.std()) if v.numel() > 1 else 0.0
    mean = float(v.mean())
    if std == 0.0:
        return {"dist": {0.0: "zeros", 1.0: "ones"}.get(mean, "constant"), "std": 0.0}
    spread = float((v - mean).abs().max()) / std  # uniform: at most √3 ≈ 1.73; normal: ≈ 2.3 and more (n ≥ 50)
    return {"dist": "uniform" if spread < 1.9 else "normal", "std": std}


def _record_base_init(g: ModelGraph, plan: SparsityPlan) -> None:
    """Every planned weight's base initialisation, read from the dense original's tensor it replaces or
    widens (SμPar's σ_base per weight: GPT-2's c_proj carries σ/√(2·n_layer), not the model's σ)."""
    cache: dict[str, dict] = {}
    for w in plan.weights:
        if w.kind == "norm" and w.family != "dense":
            continue  # a BatchNorm the rewrite adds (factorized_bn): nothing in the original to read
        if w.source not in cache:
            cache[w.source] = measure_init(g.tensor(w.source))
        w.base_init = dict(cache[w.source])
