"""SμPar annotation: per-weight multipliers written into the plan, forward multipliers and the
attention-logit scale rewritten in the graph.

Sources: Dey, Bergsma, Hestness, "Sparse maximal update parameterization: A holistic approach to
sparse training dynamics", NeurIPS 2024 (arXiv:2405.15743), Table 1; μP: Yang et al., "Tensor
Programs V" (arXiv:2203.03466), Table 3, and its reference code (microsoft `mup`).

With m_in, m_out = fan-in / fan-out relative to the dense base model, m_d the width multiplier of
the parameter's one widened side, and m_ρ = density / base density (base = the dense original, so
m_ρ = density), the SμPar table (DESIGN.md section 4) reads:

    class    what                                   init std        Adam LR      SGD LR
    hidden   both sides are width (fan-in and out)  σ/√(m_in·m_ρ)   η/(m_in·m_ρ) η/((m_in/m_out)·m_ρ)
    input    embedding, stem: fan-out is width      σ               η            η·m_d
    output   readout: fan-in is width               σ               η            η·m_d
    vector   biases, norm weights (width m_d)       as base         η            η·m_d
    fixed    no width axis                          as base         η            η
    forward: input ops × α_in; readout input × α_out/m_d; attention logits q·k·α_attn/d_head

m_ρ = 1 is μP (exactly microsoft `mup`: MuAdam/MuAdamW divide the LR of matrix-like parameters by
their fan-in multiplier, MuSGD scales vector-like LRs by m_d and matrix-like ones by m_out/m_in, and
both multiply weight decay by the factor that divides the LR). "sp" sets every multiplier to 1.
A stem or head made sparse (include_stem/include_head) divides init variance and LR by m_ρ as well:
sparsity shrinks its effective fan-in exactly as it does a hidden layer's.

Learning-rate factors are stored as [num, den] (lr = η·num/den, weight decay = wd·den/num), so the
arithmetic is the same as mup's and matches it bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture import _get_attr, _has_attr, _pop_attr, _set_attr
from ..graph import SparsegraphError
from ..plan import SparsityPlan, WeightPlan
from .manager import PassResult, graph_pass

aten = torch.ops.aten

PARAMETERIZATIONS = ("supar", "mup", "sp")
HOLDER = "sparsegraph_supar"  # submodule holding the forward-multiplier buffers

# Tuned μP base hyperparameters published for GPT-style models (base width d_base = 256), as
# documented starting points: pass them as `sg.supar.annotate(model, **PRESETS[name])` and use
# `eta_base` as the learning rate. Cerebras-GPT: Dey et al. 2023 (arXiv:2304.03208), App. G;
# BTLM-3B-8K: Dey et al. 2023 (arXiv:2309.11568), μP hyperparameters. The SμPar paper tunes the same
# four base hyperparameters on a small dense μP proxy and transfers them to sparse models.
PRESETS: dict[str, dict[str, float]] = {
    "cerebras-gpt": {"sigma_base": 0.08, "eta_base": 6e-3, "alpha_in": 10.0, "alpha_out": 1.0},
    "btlm": {"sigma_base": 0.073, "eta_base": 1.2e-2, "alpha_in": 14.6, "alpha_out": 2.22},
}


class SuparError(SparsegraphError, ValueError):
    """A bad parameterisation, hyperparameter or model; one line naming what is wrong."""


# ---------------------------------------------------------------------------------------------
# planning: multipliers per weight
# ---------------------------------------------------------------------------------------------
def width_axes(plan: SparsityPlan) -> set[tuple[str, int]]:
    """(parameter, axis) pairs that are width dimensions: members of a widenable dimension group
    (even at widening 1) or axes whose size differs from the base model (mup's rule)."""
    out: set[tuple[str, int]] = set()
    for grp in plan.groups:
        for p in grp.params:
            fqn, axis = p[:-1].rsplit("[", 1)
            out.add((fqn, int(axis)))
    for w in plan.weights:
        for a, (n, o) in enumerate(zip(w.shape, w.orig_shape)):
            if n != o:
                out.add((w.name, a))
    return out


def _ratio(w: WeightPlan, axis: int) -> float:
    return w.shape[axis] / w.orig_shape[axis]


def classify(w: WeightPlan, widths: set[tuple[str, int]], local: bool = False) -> tuple[str, float, float, float]:
    """(class, m_in, m_out, m_d) of a planned parameter (class: hidden|input|output|vector|fixed).

    `local`: the plan widens no dimension group (Sparse Parallel / Factorized / Doped), so a hidden
    layer's factors (U: D_in -> d, V: d -> D_out) are hidden weights, each with its own m_in, m_out."""
    m_in = w.fan_in / w.orig_fan_in if w.orig_fan_in else 1.0
    m_out = w.fan_out / w.orig_fan_out if w.orig_fan_out else 1.0
    if len(w.shape) <= 1:  # biases, norm weights, scalars: vector-like (m_d = 1 if not widened)
        return "vector", m_in, m_out, (_ratio(w, 0) if w.shape else 1.0)
    if w.kind in ("linear", "conv", "embedding") and w.out_axis is not None:
        in_w = any((w.name, a) in widths for a in w.in_axes)
        out_w = (w.name, w.out_axis) in widths
        if not (in_w or out_w) or (local and w.role == "hidden"):  # no width groups (a local rewrite): the role
            cls = {"hidden": "hidden", "stem": "input", "embedding": "input", "head": "output"}.get(w.role, "fixed")
        else:
            cls = "hidden" if in_w and out_w else "input" if out_w else "output"
        m_d = {"hidden": m_in, "input": m_out, "output": m_in}.get(cls, 1.0)
        if cls == "output" and w.role == "embedding":  # a tied embedding, planned from its readout use
            cls = "input"
        return cls, m_in, m_out, m_d
    # any other parameter: mup's shape rule (count the width axes; the last one is the "main" one)
    inf = [a for a in range(len(w.shape)) if (w.name, a) in widths]
    if not inf:
        return "fixed", 1.0, 1.0, 1.0
    if len(inf) == 1:
        return "vector", 1.0, 1.0, _ratio(w, inf[0])
    if len(inf) > 2:
        raise SuparError(f"parameter {w.name} has {len(inf)} width axes; SμPar handles at most 2")
    return "hidden", _ratio(w, 1), _ratio(w, 0), _ratio(w, inf[-1])


def _base_init(w: WeightPlan, plan: SparsityPlan, sigma_base: float | None, sp: bool) -> dict:
    """The base model's initialisation of this parameter: {"dist", "std"} (uniform: bound = √3·std).

    sigma_base=None: each weight's own initialisation in the dense original, as the plan read it from
    its values (`WeightPlan.base_init`: GPT-2's output projections keep their σ/√(2·n_layer)); where
    the plan has none (a model planned on the meta device), PyTorch's defaults at the base shape, the
    convention mup assumes: U(±1/√fan_in) for weights and biases (fan-in of their layer), N(0, 1) for
    embeddings. "sp" re-initialises at the actual shape: a fan-in-scaled base (PyTorch's default
    U(±1/√fan_in)) follows the new fan-in, a fixed σ (GPT-style N(0, σ²)) stays. Norms: ones/zeros.
    sigma_base=σ: N(0, σ²) for every weight, zero biases (GPT-style), as the user asks.
    """
    if w.kind == "norm" or w.role == "norm":
        return {"dist": "zeros" if w.part == "bias" or w.name.endswith(".bias") else "ones", "std": 0.0}
    measured = w.base_init if w.base_init.get("dist") in ("normal", "uniform", "zeros") else None
    if w.kind == "bias" or w.role == "bias":
        if sigma_base is not None:
            return {"dist": "zeros", "std": 0.0}
        layer = _layer_weight(plan, w)
        if measured is not None:
            return _sp_scaled(measured, layer, sp)
        if layer is None:
            return {"dist": "keep", "std": 0.0}
        fan = layer.fan_in if sp else layer.orig_fan_in
        return {"dist": "uniform", "std": 1 / math.sqrt(3 * fan)}
    if w.kind in ("linear", "conv", "embedding"):
        if sigma_base is not None:
            return {"dist": "normal", "std": float(sigma_base)}
        if measured is not None:
            return _sp_scaled(measured, w, sp)
        if w.kind == "embedding" or w.role == "embedding":
            return {"dist": "normal", "std": 1.0}
        fan = w.fan_in if sp else w.orig_fan_in
        return {"dist": "uniform", "std": 1 / math.sqrt(3 * fan)}
    return {"dist": "keep", "std": 0.0}  # a parameter of unknown role keeps its values


def _sp_scaled(measured: dict, layer: WeightPlan | None, sp: bool) -> dict:
    """The measured base init; under "sp" a PyTorch-default (fan-in scaled) one moves to the new fan-in."""
    init = {"dist": measured["dist"], "std": float(measured["std"])}
    if sp and layer is not None and init["dist"] == "uniform" and layer.orig_fan_in and \
            math.isclose(init["std"], 1 / math.sqrt(3 * layer.orig_fan_in), rel_tol=0.15):
        init["std"] *= math.sqrt(layer.orig_fan_in / layer.fan_in)
    return init


def _layer_weight(plan: SparsityPlan, bias: WeightPlan) -> WeightPlan | None:
    """The weight whose op adds this bias (for factorized layers: V, the last product)."""
    cands = [w for w in plan.weights if w.layer == bias.layer and w.kind in ("linear", "conv")]
    for part in ("v", "weight", "s", "branch0"):
        for w in cands:
            if w.part == part:
                return w
    return cands[0] if cands else None


def weight_multipliers(w: WeightPlan, plan: SparsityPlan, widths: set[tuple[str, int]], parameterization: str,
                       sigma_base: float | None) -> dict:
    """The `WeightPlan.supar` entry of one parameter (see the module docstring for the table)."""
    cls, m_in, m_out, m_d = classify(w, widths, local=not plan.groups)
    m_rho = w.density if parameterization == "supar" else 1.0  # m_ρ = density / base density (1)
    sp = parameterization == "sp"
    init = _base_init(w, plan, sigma_base, sp)
    base_std = init["std"]
    if sp:
        mult, adam, sgd = 1.0, [1.0, 1.0], [1.0, 1.0]
    elif cls == "hidden":  # σ²/(m_d·m_ρ); η/(m_d·m_ρ); η·(m_out/m_in)/m_ρ
        mult, adam, sgd = 1 / math.sqrt(m_in * m_rho), [1.0, m_in * m_rho], [1.0, (m_in / m_out) * m_rho]
    elif cls in ("input", "output"):  # σ²; η; η·m_d (and 1/m_ρ if the layer itself is sparse)
        mult, adam, sgd = 1 / math.sqrt(m_rho), [1.0, m_rho], [m_d, m_rho]
    elif cls == "vector":  # as base; η; η·m_d
        mult, adam, sgd = 1.0, [1.0, 1.0], [m_d, 1.0]
    else:
        mult, adam, sgd = 1 / math.sqrt(m_rho), [1.0, m_rho], [1.0, m_rho]
    init["std"] *= mult if init["dist"] in ("uniform", "normal") else 1.0
    return {"class": cls, "m_in": m_in, "m_out": m_out, "m_d": m_d, "m_rho": m_rho, "init_std_mult": mult,
            "sigma_base": base_std, "init": init, "lr": {"adam": adam, "adamw": adam, "sgd": sgd}}


def check_options(parameterization: str, sigma_base, alpha_in, alpha_out, alpha_attn, eta_base) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise SuparError(f"unknown parameterization {parameterization!r}; choose from {', '.join(PARAMETERIZATIONS)}")
    for name, v in (("alpha_in", alpha_in), ("alpha_out", alpha_out), ("alpha_attn", alpha_attn)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SuparError(f"{name} must be a positive number, got {v!r}")
    for name, v in (("sigma_base", sigma_base), ("eta_base", eta_base)):
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise SuparError(f"{name} must be a positive number or None, got {v!r}")


def annotate_plan(plan: SparsityPlan, parameterization: str = "supar", sigma_base: float | None = None,
                  alpha_in: float = 1.0, alpha_out: float = 1.0, alpha_attn: float = 1.0,
                  eta_base: float | None = None) -> SparsityPlan:
    """Write every weight's multipliers into `plan` (in place) and the base hyperparameters into
    `plan.supar`; the graph rewrite (`supar_pass`) then applies the forward part."""
    check_options(parameterization, sigma_base, alpha_in, alpha_out, alpha_attn, eta_base)
    widths = width_axes(plan)
    for w in plan.weights:
        w.supar = weight_multipliers(w, plan, widths, parameterization, sigma_base)
    previous = plan.supar or {}
    plan.supar = {"parameterization": parameterization, "sigma_base": sigma_base, "eta_base": eta_base,
                  "alpha_in": float(alpha_in), "alpha_out": float(alpha_out), "alpha_attn": float(alpha_attn),
                  "forward": [], "attention": previous.get("attention", [])}
    return plan


# ---------------------------------------------------------------------------------------------
# graph: where weights are read, input and readout ops
# ---------------------------------------------------------------------------------------------
_TRANSPARENT = {aten._to_copy.default, aten.detach.default, aten.alias.default, aten.clone.default,
                aten.contiguous.default, aten.to.dtype, aten.lift_fresh_copy.default}


def _trace_weight(node, shapes: dict) -> tuple[str, list[int]] | None:
    """If `node` is a planned parameter seen through masks, transposes and casts: (name, axes) where
    axes[i] is the parameter axis at position i of `node`; else None."""
    chain = []
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            if node.target not in shapes:
                return None
            axes = list(range(len(shapes[node.target])))
            for kind, arg in reversed(chain):  # from the parameter towards the op
                if kind == "t":
                    axes = axes[::-1]
                elif kind == "transpose":
                    d0, d1 = (d % len(axes) for d in arg)
                    axes[d0], axes[d1] = axes[d1], axes[d0]
                else:
                    axes = [axes[d % len(axes)] for d in arg]
            return node.target, axes
        if node.op != "call_function":
            return None
        t = node.target
        if t is aten.t.default:
            chain.append(("t", None))
        elif t is aten.transpose.int:
            chain.append(("transpose", tuple(node.args[1:3])))
        elif t is aten.permute.default:
            chain.append(("permute", tuple(node.args[1])))
        elif t is aten.mul.Tensor and any(_is_mask(a) for a in node.args):  # weight * mask
            node = next(a for a in node.args if not _is_mask(a))
            continue
        elif t not in _TRANSPARENT:
            return None
        node = node.args[0]
    return None


def _is_mask(a) -> bool:
    return isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target).endswith("_mask")


@dataclass
class WeightOp:
    node: fx.Node
    weight: str
    x: fx.Node | None  # the activation input (None for embeddings)
    in_axis: int  # parameter axis contracted with x (embedding: the vocabulary axis)
    out_axis: int  # parameter axis that becomes the output's features
    embedding: bool = False


def _weight_op(node: fx.Node, shapes: dict) -> WeightOp | None:
    """The op reading a planned parameter as its weight, with the parameter axes it contracts and produces."""
    if node.op != "call_function":
        return None
    t, a = node.target, node.args

    def w(i):
        return _trace_weight(a[i], shapes) if len(a) > i else None

    if t is aten.embedding.default:
        f = w(0)
        return WeightOp(node, f[0], None, f[1][0], f[1][1], True) if f else None
    if t is aten.linear.default or t in (aten.convolution.default, aten.conv1d.default, aten.conv2d.default,
                                         aten.conv3d.default):
        f = w(1)
        transposed = t is aten.convolution.default and len(a) > 6 and a[6]
        if f is None:
            return None
        o, i = (1, 0) if transposed else (0, 1)
        return WeightOp(node, f[0], a[0], f[1][i], f[1][o])
    if t is aten.addmm.default:  # bias + x @ W, W (in, out)
        f = w(2)
        return WeightOp(node, f[0], a[1], f[1][0], f[1][1]) if f else None
    if t in (aten.mm.default, aten.matmul.default):
        f = w(1)
        if f is not None and len(f[1]) == 2:  # x @ W
            return WeightOp(node, f[0], a[0], f[1][0], f[1][1])
        f = w(0)
        if f is not None and len(f[1]) == 2:  # W @ x
            return WeightOp(node, f[0], a[1], f[1][1], f[1][0])
    return None


def site_of(op: WeightOp, w: WeightPlan) -> str | None:
    """"input" (× α_in after the op), "output" (readout: × α_out/m_d on its input) or None, from the
    plan's roles: embeddings and stem layers are inputs; head layers and the matmul of a tied
    embedding are readouts."""
    if op.embedding or w.role == "stem":
        return "input"
    if w.role in ("head", "embedding"):
        return "output"
    return None


# ---------------------------------------------------------------------------------------------
# graph: attention logit scale, one declarative rule per pattern
# ---------------------------------------------------------------------------------------------
def _is_last_two_transpose(node, ndim: int) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.t.default:
        return True
    if node.target is aten.transpose.int:
        return {d % ndim for d in node.args[1:3]} == {ndim - 1, ndim - 2}
    if node.target is aten.permute.default:
        dims = [d % ndim for d in node.args[1]]
        return dims == list(range(ndim - 2)) + [ndim - 1, ndim - 2]
    return False


def _sdpa_query(node: fx.Node, shapes: dict) -> fx.Node | None:
    return node.args[0]


def _qk_query(node: fx.Node, shapes: dict) -> fx.Node | None:
    """`(q @ k^T) * c` or `(q @ k^T) / c` with a Python number c: the q node, else None."""
    if len(node.args) != 2 or not isinstance(node.args[1], (int, float)) or isinstance(node.args[1], bool):
        return None
    mm = node.args[0]
    if not isinstance(mm, fx.Node) or mm.op != "call_function" or mm.target not in (
            aten.matmul.default, aten.bmm.default):
        return None
    k_t = mm.args[1]
    shape = shapes.get(k_t)
    if shape is None or not _is_last_two_transpose(k_t, len(shape)):
        return None
    return mm.args[0]


@dataclass(frozen=True)
class AttentionRule:
    """One attention pattern: the node holding the scale, how to find q, and how the scale enters
    the logits ("sdpa": the `scale` argument, None meaning 1/√d; "mul": logits·c; "div": logits/c)."""
    name: str
    targets: tuple
    form: str
    query: Callable[[fx.Node, dict], fx.Node | None]


ATTENTION_RULES: tuple[AttentionRule, ...] = (
    AttentionRule("sdpa", (aten.scaled_dot_product_attention.default,), "sdpa", _sdpa_query),
    AttentionRule("qk_mul", (aten.mul.Tensor,), "mul", _qk_query),
    AttentionRule("qk_div", (aten.div.Tensor,), "div", _qk_query),
)


def _scale_of(node: fx.Node, rule: AttentionRule, d: int):
    """(raw argument, the factor multiplying q·k) of a matched site."""
    if rule.form == "sdpa":  # `scale` is keyword-only in aten's schema
        raw = node.kwargs.get("scale")
        return raw, (1 / math.sqrt(d) if raw is None else raw)
    raw = node.args[1]
    return raw, (raw if rule.form == "mul" else 1 / raw)


def _set_scale(node: fx.Node, rule: AttentionRule, raw) -> None:
    if rule.form == "sdpa":
        if raw is None:  # the default (1/sqrt(d)): leave the argument out, as the captured graph had it
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "scale"}
        else:
            node.update_kwarg("scale", raw)
    else:
        node.update_arg(1, raw)


def _new_raw(rule: AttentionRule, factor: float):
    return factor if rule.form in ("sdpa", "mul") else 1 / factor


def attention_sites(gm: fx.GraphModule, shapes: dict, recorded: list[dict]) -> list[tuple[fx.Node, AttentionRule, int]]:
    """Matched attention sites in graph order: (node, rule, d_head). An explicit q·k^T pattern counts
    only if it feeds a softmax and its constant is a softmax scale 1/√d0 (d0 a whole number up to
    d_head: a Sparse Wide rewrite may leave the base d_head's constant) or what a previous
    annotation wrote."""
    sites = []
    for node in gm.graph.nodes:
        for rule in ATTENTION_RULES:
            if node.op != "call_function" or node.target not in rule.targets:
                continue
            q = rule.query(node, shapes)
            if q is None or shapes.get(q) is None:
                continue
            d = int(shapes[q][-1])
            if rule.form != "sdpa":
                _, factor = _scale_of(node, rule, d)
                prev = recorded[len(sites)] if len(sites) < len(recorded) else None
                d0 = 1 / factor ** 2 if factor > 0 else 0.0  # a softmax scale 1/sqrt(d0), d0 a whole number <= d
                ok = (1 <= round(d0) <= d and math.isclose(d0, round(d0), rel_tol=1e-6)) or (
                    prev is not None and prev["rule"] == rule.name and math.isclose(
                        node.args[1], prev["new"], rel_tol=1e-12))
                if not ok or not _feeds_softmax(node):
                    continue
            sites.append((node, rule, d))
            break
    return sites


_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_ON_THE_WAY = {aten.add.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
               aten._to_copy.default, aten.to.dtype, aten.sub.Tensor}


def _feeds_softmax(node: fx.Node, depth: int = 4) -> bool:
    """The scaled logits reach a softmax, through at most `depth` mask additions / casts."""
    for u in node.users:
        if u.op != "call_function":
            continue
        if u.target in _SOFTMAX or (depth > 0 and u.target in _ON_THE_WAY and _feeds_softmax(u, depth - 1)):
            return True
    return False


def propagate_shapes(gm: fx.GraphModule, example_inputs) -> dict:
    """Output shapes of every node, from a run on fake tensors (nothing is computed or changed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes: dict = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = tuple(out.shape)
            return out

    training = gm.training
    gm.eval()
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
            Recorder(gm).run(*fake)
    finally:
        gm.train(training)
    return shapes


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------
def strip_forward_multipliers(gm: fx.GraphModule) -> bool:
    """Remove the multiplier nodes (and buffers) a previous annotation inserted."""
    graph = gm.graph
    changed = False
    for node in [n for n in graph.nodes if n.op == "get_attr" and str(n.target).startswith(HOLDER + ".")]:
        for mul in list(node.users):
            other = mul.args[0] if mul.args[1] is node else mul.args[1]
            mul.replace_all_uses_with(other)
            graph.erase_node(mul)
        graph.erase_node(node)
        changed = True
    if _has_attr(gm, HOLDER):
        _pop_attr(gm, HOLDER)
        changed = True
    return changed


def _add_multiplier(gm: fx.GraphModule, name: str, value: float, like: torch.Tensor) -> str:
    if not _has_attr(gm, HOLDER):
        _set_attr(gm, HOLDER, nn.Module())
    target = f"{HOLDER}.{name}"
    _set_attr(gm, target, torch.tensor(value, dtype=like.dtype if like.is_floating_point() else torch.float32,
                                       device=like.device))
    return target


def apply_supar(gm: fx.GraphModule, plan: SparsityPlan, example_inputs=None) -> bool:
    """Rewrite `gm` for `plan.supar`: forward multipliers as `x * buffer` nodes, attention scales.

    Idempotent: earlier multipliers are removed and the attention scales restored from the plan's
    record before the new ones are written, so annotating again (say "sp" after "supar") is exact.
    """
    hp = plan.supar
    if not hp or "parameterization" not in hp:
        raise SuparError(f"{plan.model}: the plan has no SμPar annotation; call sg.supar.annotate(model) first")
    changed = strip_forward_multipliers(gm)
    sp = hp["parameterization"] == "sp"
    graph = gm.graph
    by_name = {w.name: w for w in plan.weights}
    plan_shapes = {w.name: w.shape for w in plan.weights}
    ops = [op for op in (_weight_op(n, plan_shapes) for n in list(graph.nodes)) if op is not None]
    forward: list[dict] = []
    if not sp:
        counter = {"in": 0, "out": 0}
        for op in ops:
            w = by_name[op.weight]
            like = _get_attr(gm, op.weight)
            site = site_of(op, w)
            if site == "input":  # × α_in on the input layer's output
                target = _add_multiplier(gm, f"in_{counter['in']}", hp["alpha_in"], like)
                counter["in"] += 1
                with graph.inserting_after(op.node):
                    buf = graph.get_attr(target)
                with graph.inserting_after(buf):
                    mul = graph.call_function(aten.mul.Tensor, (op.node, buf))
                op.node.replace_all_uses_with(mul, delete_user_cb=lambda u, m=mul: u is not m)
                forward.append({"site": "input", "weight": op.weight, "value": hp["alpha_in"], "buffer": target})
            if site == "output":  # readout: its input × α_out/m_d (as mup's MuReadout)
                m_d = _ratio(w, op.in_axis)
                value = hp["alpha_out"] / m_d
                target = _add_multiplier(gm, f"out_{counter['out']}", value, like)
                counter["out"] += 1
                with graph.inserting_before(op.node):
                    buf = graph.get_attr(target)
                    mul = graph.call_function(aten.mul.Tensor, (op.x, buf))
                op.node.replace_input_with(op.x, mul)
                forward.append({"site": "output", "weight": op.weight, "value": value, "m_d": m_d, "buffer": target})
        changed |= bool(forward)
    hp["forward"] = forward
    changed |= _rewrite_attention(gm, plan, sp, example_inputs)
    return changed


def _maybe_attention(n: fx.Node) -> bool:
    """Cheap structural pre-check (no shapes): an SDPA, or a matmul/bmm result times/over a number."""
    if n.op != "call_function":
        return False
    if n.target is aten.scaled_dot_product_attention.default:
        return True
    return (n.target in (aten.mul.Tensor, aten.div.Tensor) and len(n.args) == 2
            and isinstance(n.args[1], (int, float)) and isinstance(n.args[0], fx.Node)
            and n.args[0].target in (aten.matmul.default, aten.bmm.default))


def _rewrite_attention(gm: fx.GraphModule, plan: SparsityPlan, sp: bool, example_inputs=None) -> bool:
    hp = plan.supar
    recorded: list[dict] = hp.get("attention") or []
    candidates = [n for n in gm.graph.nodes if _maybe_attention(n)]
    if not candidates or (sp and not recorded):
        hp["attention"] = recorded if sp else []
        return False
    inputs = example_inputs or getattr(gm, "example_inputs", None)
    if not inputs:
        raise SuparError(f"{plan.model}: the attention scale needs d_head, read from a run on the model's "
                         "example inputs, but the model has none (pass example_inputs=... to annotate)")
    shapes = propagate_shapes(gm, inputs)
    sites = attention_sites(gm, shapes, recorded)
    out, changed = [], False
    for i, (node, rule, d) in enumerate(sites):
        raw, _ = _scale_of(node, rule, d)
        prev = recorded[i] if i < len(recorded) and recorded[i]["rule"] == rule.name else None
        old = prev["old"] if prev is not None else raw
        new = old if sp else _new_raw(rule, hp["alpha_attn"] / d)  # q·k·α_attn/d_head
        if new != raw:
            _set_scale(node, rule, new)
            changed = True
        if not sp:
            out.append({"rule": rule.name, "d_head": d, "old": old, "new": new})
    hp["attention"] = out
    return changed


def supar_pass(plan: SparsityPlan, example_inputs=None):
    """`apply_supar` as a Pass for the PassManager (in place)."""
    @graph_pass(f"supar_{(plan.supar or {}).get('parameterization', 'none')}", in_place=True)
    def run(gm: fx.GraphModule) -> PassResult:
        return PassResult(gm, apply_supar(gm, plan, example_inputs))
    return run


__all__ = ["PARAMETERIZATIONS", "PRESETS", "ATTENTION_RULES", "AttentionRule", "SuparError", "annotate_plan",
           "apply_supar", "classify", "supar_pass", "weight_multipliers", "width_axes", "propagate_shapes"]
