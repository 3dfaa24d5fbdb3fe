"""SμPar's forward part on the module form, decided on the graph and verified against it.

The graph pass (`passes/supar.py`) decides where the forward multipliers go (input layers × α_in,
the readout's input × α_out/m_d) and which attention logits are rescaled (to α_attn/d_head). Here
the module form is captured, that pass runs on the capture, and each decision is carried over to
the module that made the node:
- a multiplier becomes a forward hook (a pre-hook on a readout layer's input, or a hook on the
  output of an input layer, or of the module whose output only the readout reads);
- an attention scale becomes the attention module's own attribute (`scaling`, `scale`: Hugging
  Face attention modules), or, where the module calls `scaled_dot_product_attention` with its
  default scale, a scale passed to that call while the module runs.
The annotated module is then checked against the annotated graph on the same weights.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..capture import _module_of, trace
from ..nn import layer_kind
from ..plan import SparsityPlan
from .supar import SuparError, _weight_op, apply_supar, attention_sites, propagate_shapes, site_of

STATE = "_sparsegraph_supar"  # model attribute: the hooks and attributes this module applied
SCALE_ATTRIBUTES = ("scaling", "scale", "softmax_scale")  # attention modules' own scale, one per convention


class _SDPAScale(TorchFunctionMode):
    """Pass `scale` to every `scaled_dot_product_attention` call made while active."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            kwargs["scale"] = self.scale
        return func(*args, **kwargs)


class ScaledAttention:
    """Mixin of an attention module whose SDPA calls take `sdpa_scale` (SμPar's α_attn/d_head)."""

    sdpa_scale: float | None = None

    def forward(self, *args, **kwargs):
        with _SDPAScale(self.sdpa_scale):
            return super().forward(*args, **kwargs)


def _scaled_class(cls: type) -> type:
    if issubclass(cls, ScaledAttention):
        return cls
    name = f"Scaled{cls.__name__}"
    return type(name, (ScaledAttention, cls), {"__module__": __name__, "__qualname__": name})


# ---------------------------------------------------------------------------------------------
# undo: hooks removed, attributes and classes restored
# ---------------------------------------------------------------------------------------------
def strip(model: nn.Module) -> None:
    state = model.__dict__.pop(STATE, None)
    if not state:
        return
    for handle in state["hooks"]:
        handle.remove()
    for path, attr, old in state["attributes"]:
        mod = model.get_submodule(path)
        if attr == "class":
            mod.__class__ = type(mod).__mro__[2]
        else:
            setattr(mod, attr, old)


def forward_sites(model: nn.Module) -> list[dict]:
    """The forward multipliers the module form carries now (empty if none)."""
    return list(model.__dict__.get(STATE, {}).get("forward", []))


# ---------------------------------------------------------------------------------------------
# carrying the graph's decisions over
# ---------------------------------------------------------------------------------------------
def _module_path(node: fx.Node) -> str:
    return _module_of(node)[0]


def _returns(node: fx.Node, model: nn.Module) -> str | None:
    """The module whose forward returns `node` (its innermost module, if no later op of it uses the node)."""
    path = _module_path(node)
    if not path:
        return None
    if any(_module_path(u) == path or _module_path(u).startswith(path + ".") for u in node.users):
        return None
    return path


def _hook_multiplier(model: nn.Module, path: str, value: float, pre: bool) -> Any:
    mod = model.get_submodule(path)
    if pre:
        return mod.register_forward_pre_hook(lambda m, args: (args[0] * value, *args[1:]))
    return mod.register_forward_hook(lambda m, args, out: out * value)


def _weight_ops(gm: fx.GraphModule, plan: SparsityPlan) -> dict[tuple[str, str | None], Any]:
    """(weight, "input" | "output" | None) -> the op reading it, in the graph before annotation."""
    by_name = {w.name: w for w in plan.weights}
    shapes = {w.name: w.shape for w in plan.weights}
    return {(op.weight, site_of(op, by_name[op.weight])): op
            for op in (_weight_op(n, shapes) for n in gm.graph.nodes) if op is not None}


def _place_forward(model: nn.Module, ops: dict, plan: SparsityPlan) -> tuple[list, list]:
    """Hooks for the plan's forward multipliers, at the modules that made the graph's nodes."""
    hooks, placed = [], []
    for site in plan.supar["forward"]:
        op = ops[(site["weight"], site["site"])]
        path = _module_path(op.node)
        if site["site"] == "input":  # × α_in on the output of the input layer
            where = _returns(op.node, model)
            if where is None:
                raise SuparError(f"{plan.model}: the input multiplier of {site['weight']} has no module whose "
                                 "output it is" + _HINT)
            hooks.append(_hook_multiplier(model, where, site["value"], pre=False))
        else:  # the readout's input × α_out/m_d: a readout layer's pre-hook, or the output of what feeds it
            layer = model.get_submodule(path) if path else None
            if (layer is not None and layer_kind(layer) is not None  # its own weight, or one tied to it (GPT-2's lm_head)
                    and getattr(layer, "weight", None) is model.get_parameter(site["weight"])):
                where, pre = path, True
            else:
                where, pre = _returns(op.x, model), False
                if where is None or len(op.x.users) != 1:
                    raise SuparError(f"{plan.model}: the readout multiplier of {site['weight']} has no module to "
                                     "sit on (its input is not one module's output, read only by the readout)" + _HINT)
            hooks.append(_hook_multiplier(model, where, site["value"], pre=pre))
        placed.append({**site, "module": where})
    return hooks, placed


def _place_attention(model: nn.Module, sites: list, plan: SparsityPlan) -> list[tuple[str, str, Any]]:
    """Each rescaled attention site: its module's scale attribute, or a scale for its SDPA calls."""
    changed = []
    for (node, rule, _d), rec in zip(sites, plan.supar["attention"]):
        path = _module_path(node)
        mod = model.get_submodule(path) if path else model
        old_factor = (1 / math.sqrt(rec["d_head"]) if rec["old"] is None else
                      rec["old"] if rule.form in ("sdpa", "mul") else 1 / rec["old"])
        new_factor = rec["new"] if rule.form in ("sdpa", "mul") else 1 / rec["new"]
        attr = next((a for a in SCALE_ATTRIBUTES if isinstance(getattr(mod, a, None), float)
                     and math.isclose(getattr(mod, a), old_factor, rel_tol=1e-6)), None)
        if attr is not None:
            changed.append((path, attr, getattr(mod, attr)))
            setattr(mod, attr, new_factor)
        elif rule.form == "sdpa":
            changed.append((path, "class", None))
            mod.__class__ = _scaled_class(type(mod))
            mod.sdpa_scale = new_factor
        else:
            raise SuparError(f"{plan.model}: the attention scale of {path or 'the root module'} is a constant in "
                             "its code (no scale attribute to set)" + _HINT)
        rec["module"] = path
    return changed


_HINT = "; sg.sparsify(..., output=\"graph\") gives the graph form, where SμPar rewrites the graph itself"


def apply_supar_module(model: nn.Module, plan: SparsityPlan, example_inputs: tuple, atol: float = 1e-5) -> None:
    """Apply `plan.supar`'s forward part to the module form (idempotent), verified against the graph."""
    if not example_inputs:
        raise SuparError(f"{plan.model}: SμPar on the module form needs example inputs (pass example_inputs=...)")
    strip(model)
    for rec in plan.supar.get("attention", []):  # the original scales, as recorded by a previous annotation
        rec.pop("module", None)
    training = model.training
    gm = trace(copy.deepcopy(model).eval(), example_inputs)
    shapes = propagate_shapes(gm, example_inputs)
    sites = attention_sites(gm, shapes, plan.supar.get("attention") or [])
    ops = _weight_ops(gm, plan)
    apply_supar(gm, plan, example_inputs)
    gm.recompile()
    if plan.supar["parameterization"] == "sp":
        model.__dict__[STATE] = {"hooks": [], "attributes": [], "forward": []}
        return
    hooks, placed = _place_forward(model, ops, plan)
    changed = _place_attention(model, sites, plan)
    model.__dict__[STATE] = {"hooks": hooks, "attributes": changed, "forward": placed}
    model.eval()
    gm.eval()
    try:
        with torch.no_grad():
            got = [t for t in torch.utils._pytree.tree_leaves(model(*example_inputs)) if isinstance(t, torch.Tensor)]
            want = [t for t in torch.utils._pytree.tree_leaves(gm(*example_inputs)) if isinstance(t, torch.Tensor)]
    finally:
        model.train(training)
    for a, b in zip(got, want):
        err = float((a.double() - b.double()).abs().max())
        if not err <= atol * max(1.0, float(b.double().abs().max())):
            strip(model)
            raise SuparError(f"{plan.model}: the SμPar module form differs from the annotated graph by {err:.3g}"
                             + _HINT)


__all__ = ["apply_supar_module", "strip", "forward_sites", "ScaledAttention", "SCALE_ATTRIBUTES"]
