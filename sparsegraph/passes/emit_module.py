"""Module emitter: apply a SparsityPlan to the user's own model, then verify it against the graph.

The graph stays the source of truth (the plan was made from it); this emitter gives the user back
their own model, same class, with the plan applied:
- Sparse Wide: parameters and buffers take the plan's shapes and the Python-level sizes behind the
  graph's constants follow (standard layers' attributes from their tensors, other modules' and
  configs' integer sizes by value, attention scales by the graph's patch). A Hugging Face model is
  rebuilt from its widened config, so every size-derived buffer (rotary tables, say) is recomputed
  by its own code; where no config states the plan (BART widens attention past d_model), it is
  resized in place like any other model and its config keeps the dense sizes.
- Parallel / Factorized / Doped: the layer is swapped for the small modules of `sparsegraph.nn`.
- Every sparse weight keeps its name, with a `<name>_mask` buffer beside it (`sparsegraph.nn.mask_`).
New values come from the same seeded initialisation as the graph form (`emit_torch.init_tensor`),
so both forms of one plan hold the same weights.

`verify` then re-captures the emitted module and checks, against the plan and the graph form on
the same weights: every weight's shape, the FLOPs, and the outputs (1e-5). A failure names the
layer and points to `output="graph"`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from .. import tables
from ..graph import ModelGraph, SparsegraphError
from ..masks import make_mask, parse_mask
from ..nn import doped_, layer_kind, mask_, parallel_, plain_like
from ..nn.factorized import SparseFactorized
from ..plan import SparsityPlan, WeightPlan, attach_plan
from .emit_torch import init_tensor, measure

STANDARD_KINDS = ("linear", "conv", "embedding", "norm", "bias")


class EmitError(SparsegraphError):
    """The module form could not be built or does not match the graph form."""


def _hint(plan: SparsityPlan) -> str:
    return f"; sg.sparsify(..., output=\"graph\") gives the graph form of {plan.model}"


# ---------------------------------------------------------------------------------------------
# values: the same seeded initialisation as the graph form
# ---------------------------------------------------------------------------------------------
class _Values:
    def __init__(self, plan: SparsityPlan, init: str, old_state: dict[str, torch.Tensor],
                 batch_norm: frozenset[str] = frozenset()):
        self.plan, self.init, self.old = plan, init, old_state
        self.batch_norm = batch_norm  # BatchNorm parameters: a resized BatchNorm starts fresh, as in the graph form
        # a bias is initialised from its layer's fan-in (PyTorch: U(±1/√fan_in))
        self.fan_in_of_op = {w.op: w.fan_in for w in plan.weights
                             if w.part in ("weight", "s", "branch0") and w.kind in ("linear", "conv")}

    def fresh(self, w: WeightPlan, like: torch.Tensor) -> torch.Tensor:
        fan = self.fan_in_of_op.get(w.op) if w.kind == "bias" else None
        return init_tensor(w, self.plan, fan, like.dtype, like.device)

    def of(self, w: WeightPlan) -> torch.Tensor:
        """Sparse Wide: fresh (init="default"), the old values zero-padded (shape changed), or kept."""
        old = self.old[w.source]
        if (self.init == "default" and w.kind in STANDARD_KINDS) or (w.name in self.batch_norm and w.shape != w.orig_shape):
            return self.fresh(w, old)
        if tuple(w.shape) == tuple(old.shape):
            return old.detach().clone()
        new = torch.zeros(w.shape, dtype=old.dtype, device=old.device)
        new[tuple(slice(0, s) for s in old.shape)] = old
        return new

    def mask(self, w: WeightPlan, like: torch.Tensor) -> torch.Tensor:
        if like.is_meta:
            return torch.empty(w.shape, device="meta", dtype=like.dtype)
        density = parse_mask(w.mask).density_fixed or w.density  # N:M: the nominal N/M
        return make_mask(w.mask, tuple(w.shape), density, seed=self.plan.seed, name=w.name,
                         out_axis=w.out_axis, in_axes=tuple(w.in_axes)).to(like.device, like.dtype)


def _split(path: str) -> tuple[str, str]:
    owner, _, leaf = path.rpartition(".")
    return owner, leaf


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, leaf = _split(path)
    setattr(root.get_submodule(owner) if owner else root, leaf, module)


def _is_norm_param(root: nn.Module, fqn: str) -> bool:
    return isinstance(root.get_submodule(_split(fqn)[0]), nn.modules.batchnorm._BatchNorm)


# ---------------------------------------------------------------------------------------------
# Sparse Wide: sizes
# ---------------------------------------------------------------------------------------------
def new_sizes(plan: SparsityPlan) -> dict[int, int]:
    """Old size -> new size over every widened group; a size two groups widen differently is dropped."""
    out: dict[int, int] = {}
    clash = set()
    for grp in plan.groups:
        for old, new in grp.sizes:
            if old != new:
                if out.get(old, new) != new:
                    clash.add(old)
                out[old] = new
    return {o: n for o, n in out.items() if o not in clash}


def tensor_shapes(plan: SparsityPlan, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """New shape of every parameter (the plan) and buffer (its axes' dimension groups)."""
    shapes = {w.name: tuple(w.shape) for w in plan.weights if w.name == w.source}
    for grp in plan.groups:
        sizes = dict(map(tuple, grp.sizes))
        for p in grp.params:
            fqn, axis = p[:-1].rsplit("[", 1)
            if fqn in state and fqn not in shapes:
                shape = list(shapes.get(fqn, state[fqn].shape))
                shape[int(axis)] = sizes.get(shape[int(axis)], shape[int(axis)])
                shapes[fqn] = tuple(shape)
    return shapes


# Sizes of standard modules, read back from their (resized) tensors; one line each.
SIZE_RULES: list[tuple[type, str, Any]] = [
    (nn.Linear, "in_features", lambda m: m.weight.shape[1]),
    (nn.Linear, "out_features", lambda m: m.weight.shape[0]),
    (nn.modules.conv._ConvNd, "out_channels", lambda m: m.weight.shape[1] * m.groups if m.transposed else m.weight.shape[0]),
    (nn.modules.conv._ConvNd, "in_channels", lambda m: m.weight.shape[0] if m.transposed else m.weight.shape[1] * m.groups),
    (nn.modules.batchnorm._NormBase, "num_features", lambda m: (m.running_mean if m.running_mean is not None else m.weight).shape[0]),
    (nn.LayerNorm, "normalized_shape", lambda m: tuple(m.weight.shape) if m.weight is not None else m.normalized_shape),
    (nn.GroupNorm, "num_channels", lambda m: m.weight.shape[0] if m.weight is not None else m.num_channels),
    (nn.Embedding, "embedding_dim", lambda m: m.weight.shape[1]),
    (nn.MultiheadAttention, "embed_dim", lambda m: m.out_proj.weight.shape[0]),
    (nn.MultiheadAttention, "head_dim", lambda m: m.out_proj.weight.shape[0] // m.num_heads),
    (nn.MultiheadAttention, "kdim", lambda m: m.k_proj_weight.shape[1] if m.k_proj_weight is not None else m.out_proj.weight.shape[0]),
    (nn.MultiheadAttention, "vdim", lambda m: m.v_proj_weight.shape[1] if m.v_proj_weight is not None else m.out_proj.weight.shape[0]),
]
# Integer attributes that count things (never a width), whatever their value.
COUNT_WORDS = ("num_", "n_head", "n_layer", "heads", "layers", "vocab", "position", "n_positions", "n_ctx",
               "block_size", "max_", "seq", "groups", "experts", "_id", "id_", "stride", "padding", "dilation",
               "kernel", "window", "buckets", "classes", "labels", "n_positions", "type_vocab")


SIZE_WORDS = ("size", "dim", "inner", "ff", "hidden", "embd", "embed", "width", "channels", "d_model", "d_kv")


def _is_size_name(name: str) -> bool:
    return not name.startswith("_") and not any(w in name.lower() for w in COUNT_WORDS)


def _sync_standard(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.weight is not None \
            and module.running_mean is not None and module.running_mean.shape != module.weight.shape:
        module.running_mean = torch.zeros_like(module.weight.detach())  # restarted by _reset_norms
        module.running_var = torch.ones_like(module.weight.detach())
    done = False
    for cls, attr, rule in SIZE_RULES:
        if isinstance(module, cls) and hasattr(module, attr):
            setattr(module, attr, rule(module))
            done = True
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.weight.shape[1] == 1 \
            and not module.transposed:  # depthwise: one group per channel, at any width
        module.groups = module.out_channels
        module.in_channels = module.out_channels
    return done


def _config_objects(module: nn.Module) -> list[Any]:
    """Config-like attributes of a module (dataclasses, Hugging Face configs) holding its sizes."""
    return [v for v in vars(module).values() if dataclasses.is_dataclass(v) and not isinstance(v, type)
            or type(v).__name__.endswith("Config")]


def _sync_ints(obj: Any, sizes: dict[int, int], seen: set[int]) -> list[tuple[str, int]]:
    """Integer size attributes of obj set to their widened value; returns (name, old value) of each."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    changed = []
    for name, value in list(vars(obj).items()):
        if type(value) is int and value in sizes and _is_size_name(name):
            setattr(obj, name, sizes[value])
            changed.append((name, value))
    return changed


def _sync_scales(obj: Any, scales: dict[float, float]) -> None:
    """Attention scales computed from a widened head dim (`scaling = head_dim ** -0.5`): the graph's patched value."""
    for name, value in list(vars(obj).items()):
        if type(value) is float and "scal" in name.lower():
            new = next((n for o, n in scales.items() if math.isclose(value, o, rel_tol=1e-9)), None)
            if new is not None:
                setattr(obj, name, new)


def _resize_in_place(model: nn.Module, plan: SparsityPlan, values: _Values, configs: bool = True) -> None:
    state = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    shapes = tensor_shapes(plan, state)
    planned = {w.name: w for w in plan.weights}
    recomputed = {t["name"]: t for t in plan.tables}  # size-derived buffers (rotary frequencies)
    swapped: dict[int, torch.Tensor] = {}  # tied parameters stay tied: every alias takes the new tensor
    for fqn, t in sorted(state.items(), key=lambda kv: kv[0] not in planned):  # planned names first
        new_shape = tuple(recomputed[fqn]["shape"]) if fqn in recomputed else shapes.get(fqn, tuple(t.shape))
        w = planned.get(fqn)
        if w is None and new_shape == tuple(t.shape) and id(t) not in swapped:
            continue
        owner, leaf = _split(fqn)
        mod = model.get_submodule(owner) if owner else model
        if id(t) not in swapped:
            if w is not None:
                new = values.of(w)
            elif fqn in recomputed:
                rule = recomputed[fqn]
                new = tables.make(rule["rule"], rule["params"], new_shape, t.dtype, t.device)
            else:  # a buffer of a widened group: old values in front, zeros after
                new = torch.zeros(new_shape, dtype=t.dtype, device=t.device)
                new[tuple(slice(0, s) for s in t.shape)] = t
            swapped[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        if leaf in mod._parameters:
            mod._parameters[leaf] = swapped[id(t)]
        else:
            mod._buffers[leaf] = swapped[id(t)]
    sizes, seen = new_sizes(plan), set()
    scales = {p["old"]: p["new"] for p in plan.patches if isinstance(p["old"], float)}
    for m in model.modules():
        if not _sync_standard(m):
            _sync_ints(m, sizes, seen)
            _sync_scales(m, scales)
        for cfg in _config_objects(m) if configs else ():
            _sync_ints(cfg, sizes, seen)


def _is_hf(model: nn.Module) -> bool:
    mod = sys.modules.get("transformers")
    return mod is not None and isinstance(model, mod.PreTrainedModel)


def widened_config(cls: type, config: Any, plan: SparsityPlan) -> Any:
    """A copy of a Hugging Face config whose model `cls` has the plan's shapes, found by probing `cls` on
    the meta device: every size field widened by value; then each widened field put back where that
    brings the model closer to the plan (T5's d_model is 64 like its widened attention, but stays);
    then sizes the config leaves to defaults (GPT-2's `n_inner=None`, 4·n_embd) set explicitly.
    None if the class built from it would still differ from the plan."""
    cfg = copy.deepcopy(config)
    subs = {None: cfg, **{k: v for k, v in vars(cfg).items() if type(v).__name__.endswith("Config")}}
    changed = [(key, name, old) for key, sub in subs.items() for name, old in _sync_ints(sub, new_sizes(plan), set())]
    want = {w.name: tuple(w.shape) for w in plan.weights}

    def wrong(c) -> dict[tuple[str, int], int]:  # (param, axis) -> the planned size the model built from c misses
        with torch.device("meta"):
            shapes = {n: tuple(p.shape) for n, p in cls(c).named_parameters(remove_duplicate=False)}
        return {(n, i): b for n, s in want.items() if n in shapes for i, (a, b) in enumerate(zip(shapes[n], s))
                if a != b}

    def better(key: str | None, name: str, value: int) -> bool:  # keep the edit if the model misses fewer sizes
        nonlocal cfg, bad
        trial = copy.deepcopy(cfg)
        try:
            setattr(getattr(trial, key) if key else trial, name, value)
            now = wrong(trial)
        except Exception:  # noqa: BLE001 - a value this config does not take
            return False
        if len(now) >= len(bad):
            return False
        cfg, bad = trial, now
        return True

    bad = wrong(cfg)
    for key, name, old in changed if bad else ():
        better(key, name, old)
    for name in [n for n, v in vars(cfg).items() if v is None and _is_size_name(n)
                 and any(w in n.lower() for w in SIZE_WORDS)]:
        for size in sorted(set(bad.values())):
            if better(None, name, size):
                break
    return None if bad else cfg


def _rebuild_hf(model: nn.Module, plan: SparsityPlan, values: _Values) -> nn.Module | None:
    """The same class built from the widened config; planned values copied in (tied weights stay tied).
    None when no config gives the plan's shapes (BART widens attention, but its config ties it to d_model)."""
    cfg = widened_config(type(model), model.config, plan)
    if cfg is None:
        return None
    p = next(model.parameters())
    with torch.device(p.device):
        new = type(model)(cfg).to(p.dtype)
    new.train(model.training)
    params = dict(new.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for w in plan.weights:
            if w.name not in params:
                raise EmitError(f"{plan.model}: {type(model).__name__} rebuilt from its widened config has no "
                                f"parameter {w.name}" + _hint(plan))
            target = params[w.name]
            if tuple(target.shape) != tuple(w.shape):
                raise EmitError(f"{plan.model}: layer {w.layer}: {w.name} is {tuple(target.shape)} in "
                                f"{type(model).__name__} rebuilt from its widened config, the plan says "
                                f"{tuple(w.shape)}" + _hint(plan))
            target.copy_(values.of(w))
    return new


def _reset_norms(model: nn.Module, plan: SparsityPlan, init: str) -> None:
    """BatchNorm statistics restart where the graph form rebuilds the module (fresh init, new width)."""
    for w in plan.weights:
        owner = _split(w.name)[0]
        mod = model.get_submodule(owner) if owner else model
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats and (
                init == "default" or w.shape != w.orig_shape):
            mod.reset_running_stats()


def _site(g: ModelGraph, w: WeightPlan) -> str:
    return g.ops[w.op].module if w.op in g.ops else _split(w.name)[0]


def _mask_weights(model: nn.Module, g: ModelGraph, plan: SparsityPlan, values: _Values) -> None:
    """A mask beside every sparse weight; the module whose forward reads it computes weight * mask."""
    for w in plan.sparse_weights:
        owner, leaf = _split(w.name)
        site = _site(g, w)
        if site and owner != site and not owner.startswith(site + "."):
            raise EmitError(f"{plan.model}: layer {w.layer}: {w.name} is read by {site or 'the root'}, "
                            "not by a module that holds it" + _hint(plan))
        rel = w.name[len(site) + 1:] if site else w.name
        holder = model.get_submodule(site) if site else model
        mask_(holder, {rel: values.mask(w, holder.get_parameter(rel))}, standard=(rel == leaf == "weight"))


def widen(model: nn.Module, g: ModelGraph, plan: SparsityPlan, init: str) -> nn.Module:
    bn = frozenset(f"{path}.{leaf}" for path, m in model.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) for leaf in ("weight", "bias"))
    values = _Values(plan, init, {**dict(model.named_parameters(remove_duplicate=False)),
                                  **dict(model.named_buffers(remove_duplicate=False))}, bn)
    rebuilt = _rebuild_hf(model, plan, values) if _is_hf(model) else None
    if rebuilt is not None:
        model = rebuilt
    else:  # the config keeps its sizes when it cannot state the plan's
        _resize_in_place(model, plan, values, configs=not _is_hf(model))
    _reset_norms(model, plan, init)
    _mask_weights(model, g, plan, values)
    return model


# ---------------------------------------------------------------------------------------------
# Sparse Parallel / Factorized / Doped: module swaps
# ---------------------------------------------------------------------------------------------
def _layer(model: nn.Module, g: ModelGraph, plan: SparsityPlan, source: str, w: WeightPlan) -> tuple[nn.Module, str]:
    owner = _split(source)[0]
    layer = model.get_submodule(owner)
    kind = layer_kind(layer)
    if kind is None or _split(source)[1] != "weight" or _site(g, w) != owner:
        raise EmitError(f"{plan.model}: layer {w.layer}: {type(layer).__name__} is not a linear, convolution or "
                        f"Conv1D layer that computes its own product, so {plan.transform} cannot swap it as a "
                        "module" + _hint(plan))
    return layer, kind


def _with_mask(module: nn.Module, w: WeightPlan, values: _Values) -> nn.Module:
    if w.sparse:
        module.register_buffer("weight_mask", values.mask(w, module.weight))
    return module


def replace_layers(model: nn.Module, g: ModelGraph, plan: SparsityPlan, init: str) -> nn.Module:
    values = _Values(plan, init, dict(model.named_parameters(remove_duplicate=False)))
    by_source: dict[str, list[WeightPlan]] = {}
    for w in plan.weights:
        if w.family != "dense":
            by_source.setdefault(w.source, []).append(w)
    for source, parts in by_source.items():
        layer, kind = _layer(model, g, plan, source, parts[0])
        old = layer.weight
        part = {w.part: w for w in parts}

        def param(w: WeightPlan) -> nn.Parameter:
            return nn.Parameter(values.fresh(w, old) if w.name != source or init == "default" else old.detach().clone(),
                                requires_grad=old.requires_grad)

        def own(w: WeightPlan) -> None:  # the layer's own weight, re-valued and masked in place
            layer.weight = param(w)
            _with_mask(layer, w, values)

        if plan.transform == "sparse_parallel":
            branches = sorted(parts, key=lambda w: int(w.part.removeprefix("branch")))
            own(branches[0])
            copies = [_with_mask(plain_like(kind, layer, param(w)), w, values) for w in branches[1:]]
            parallel_(layer, copies, _branch_norms(model, g, plan, parts[0], len(branches)))
        elif plan.transform == "sparse_factorized":
            u, v = (_with_mask(plain_like(kind, layer, param(part[p]), pointwise=p == "v"), part[p], values)
                    for p in ("u", "v"))
            bn = None
            if plan.options.get("factorized_bn") and kind == "conv":
                bn_cls = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[old.dim()]
                bn = bn_cls(u.weight.shape[0], device=old.device, dtype=old.dtype)
            _set_module(model, _split(source)[0], SparseFactorized(kind, u, v, layer.bias, bn))
        else:  # sparse_doped
            own(part["s"])
            uv = [plain_like(kind, layer, param(part[p]), pointwise=p == "v") for p in ("u", "v")] if "u" in part \
                else [None, None]
            doped_(layer, *uv)
    if init == "default":  # dense parameters restart too, as in the graph form (BatchNorms keep theirs)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for w in plan.weights:
                if w.family == "dense" and w.kind in STANDARD_KINDS and w.name in params \
                        and not _is_norm_param(model, w.name):
                    params[w.name].copy_(values.fresh(w, params[w.name]))
    return model


def _branch_norms(model: nn.Module, g: ModelGraph, plan: SparsityPlan, w: WeightPlan, n: int) -> list[nn.Module] | None:
    """The BatchNorm after a parallel layer and one fresh copy per further branch, if the plan has them."""
    users = g.consumers(g.ops[w.op].outputs[0])
    if len(users) != 1 or users[0].op != "batch_norm":
        return None
    path = users[0].module
    if not any(p.name.startswith(f"{path}.branch1.") for p in plan.weights):
        return None
    bn = model.get_submodule(path)
    copies = []
    for _ in range(1, n):
        c = copy.deepcopy(bn)
        c.reset_parameters()
        copies.append(c)
    return [bn, *copies]


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def emit_module(model: nn.Module, g: ModelGraph, plan: SparsityPlan, init: str = "default",
                inplace: bool = False) -> nn.Module:
    """Apply `plan` to `model` (a copy unless `inplace`); the graph `g` it was planned from says
    which module reads which weight. Returns the model (a Hugging Face model: rebuilt, same class)."""
    if init not in ("default", "keep"):
        raise ValueError(f"init must be 'default' or 'keep', got {init!r}")
    out = model if inplace else copy.deepcopy(model)
    out = widen(out, g, plan, init) if plan.transform == "sparse_wide" else replace_layers(out, g, plan, init)
    attach_plan(out, plan)
    measure(out, plan)
    return out


def verify(module: nn.Module, graph_form: nn.Module, plan: SparsityPlan, example_inputs: tuple,
           atol: float = 1e-5) -> None:
    """Check the module form against the plan and the graph form on the same weights: every
    weight's shape, the FLOPs of a fresh capture, and the outputs. Raises EmitError naming what differs."""
    from ..capture import capture
    from ..flops import op_flops
    from ..layers import find_layers

    state = {**dict(module.named_parameters(remove_duplicate=False)),  # tied and non-persistent tensors too
             **dict(module.named_buffers(remove_duplicate=False))}
    graph_state = {**dict(graph_form.named_parameters(remove_duplicate=False)),
                   **dict(graph_form.named_buffers(remove_duplicate=False))}
    for key, t in list(graph_state.items()):
        if not isinstance(t, torch.Tensor) or _split(key)[1].startswith("lifted_tensor_"):
            graph_state.pop(key)  # tensor literals of the forward (torch.export lifts them), not module state
            continue
        if key not in state:
            raise EmitError(f"{plan.model}: the module form has no {key}" + _hint(plan))
        if tuple(state[key].shape) != tuple(t.shape):
            raise EmitError(f"{plan.model}: {key} is {tuple(state[key].shape)} in the module form, "
                            f"{tuple(t.shape)} in the plan's graph" + _hint(plan))
    with torch.no_grad():
        for key, t in graph_state.items():
            t.copy_(state[key])
    if any(isinstance(x, torch.Tensor) and x.is_meta for x in example_inputs):
        return
    try:
        g2 = capture(module, example_inputs)
    except SparsegraphError as e:
        raise EmitError(f"{plan.model}: the module form does not run as planned ({e})" + _hint(plan)) from None
    planned = {w.name: w for w in plan.weights}
    for fqn, value in g2.params.items():
        w = planned.get(fqn)
        if w is not None and g2.values[value].kind == "param" and tuple(g2.values[value].shape) != tuple(w.shape):
            raise EmitError(f"{plan.model}: layer {w.layer}: {fqn} is {g2.values[value].shape} when the module "
                            f"form runs, the plan says {tuple(w.shape)}" + _hint(plan))
    flops: dict[str, int] = {}
    for l in find_layers(g2):  # a weight read at several depths (ALBERT) costs every use
        if l.kind in ("linear", "conv"):
            flops[l.weight] = flops.get(l.weight, 0) + op_flops(g2, g2.ops[l.op])
    for w in plan.weights:
        if w.kind in ("linear", "conv") and w.name in flops and flops[w.name] != w.dense_flops:
            raise EmitError(f"{plan.model}: layer {w.layer}: {flops[w.name]:,} FLOPs in the module form, "
                            f"{w.dense_flops:,} in the plan" + _hint(plan))
    total = sum(op_flops(g2, op) for op in g2)
    if total != plan.totals["dense_flops"]:
        raise EmitError(f"{plan.model}: the module form runs {total:,} dense FLOPs, the plan "
                        f"{plan.totals['dense_flops']:,}" + _hint(plan))
    _same_outputs(module, graph_form, plan, example_inputs, atol)


def _same_outputs(module: nn.Module, graph_form: nn.Module, plan: SparsityPlan, inputs: tuple, atol: float) -> None:
    modes = module.training, graph_form.training
    module.eval(), graph_form.eval()
    try:
        with torch.no_grad():
            got = [t for t in tree_leaves(module(*inputs)) if isinstance(t, torch.Tensor)]
            want = [t for t in tree_leaves(graph_form(*inputs)) if isinstance(t, torch.Tensor)]
    finally:
        module.train(modes[0]), graph_form.train(modes[1])
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        raise EmitError(f"{plan.model}: the module form returns {[tuple(t.shape) for t in got]}, the graph form "
                        f"{[tuple(t.shape) for t in want]}" + _hint(plan))
    for a, b in zip(got, want):
        err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        scale = max(1.0, float(b.double().abs().max())) if b.numel() else 1.0
        if not math.isfinite(err) or err > atol * scale:
            raise EmitError(f"{plan.model}: the module form's output differs from the graph form's by {err:.3g} "
                            f"(tolerance {atol * scale:.3g})" + _hint(plan))


__all__ = ["EmitError", "emit_module", "verify", "widened_config", "new_sizes"]
