"""PyTorch emitter: apply a SparsityPlan to a captured fx.GraphModule.

Mechanical by design: every decision is in the plan. Weights stay dense `nn.Parameter`s with a
`<name>_mask` buffer beside them, and the graph reads `weight * mask`. Widened weights get new
shapes (BatchNorm modules are rebuilt at the new width), constants that spell a widened size are
patched, and local replacements (parallel branches, U/V factors, doped low-rank paths) become
new nodes around the original op. Fresh weights follow PyTorch's default initialisation.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.operator_schemas import normalize_function

from ..capture import BatchNorm, _get_attr, _has_attr, _pop_attr, _set_attr, aten_name
from .. import tables
from ..masks import layer_seed, make_mask, parse_mask
from ..plan import SparsityPlan, WeightPlan, attach_plan, branch_norm_path
from .manager import PassResult, graph_pass
from .sparse_ift import part_name

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# initialisation (PyTorch defaults: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)) for weights
# and biases, N(0, 1) for embeddings, ones/zeros for norms)
# ---------------------------------------------------------------------------------------------
def _generator(plan: SparsityPlan, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(layer_seed(plan.seed, name + ":init"))


def init_tensor(w: WeightPlan, plan: SparsityPlan, fan_in: int | None = None, dtype=torch.float32,
                device="cpu") -> torch.Tensor:
    shape = tuple(w.shape)
    if device == "meta" or str(device) == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    gen = _generator(plan, w.name)
    if w.kind == "norm":
        return (torch.zeros if w.part == "bias" or w.name.endswith(".bias") else torch.ones)(shape, dtype=dtype)
    if w.kind == "embedding":
        return torch.randn(shape, generator=gen, dtype=dtype)
    fan = fan_in or w.fan_in or 1
    bound = 1 / math.sqrt(fan)
    return (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1).mul_(bound).to(device)


# ---------------------------------------------------------------------------------------------
# graph helpers
# ---------------------------------------------------------------------------------------------
def _schema_names(target) -> list[str]:
    return [a.name for a in target._schema.arguments]


def _set_arg(node: fx.Node, key: str, index: int | None, value) -> None:
    names = _schema_names(node.target)
    if key not in names:
        key = {"size": "shape", "input": "self"}.get(key, key)
    pos = names.index(key)
    if key in node.kwargs:
        cur = node.kwargs[key]
    elif pos < len(node.args):
        cur = node.args[pos]
    else:
        cur = node.target._schema.arguments[pos].default_value
    if index is not None:
        cur = list(cur)
        cur[index] = value
        value = cur
    if key in node.kwargs or pos >= len(node.args):
        node.update_kwarg(key, value)
    else:
        node.update_arg(pos, value)


def _call_kwargs(node: fx.Node) -> dict:
    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return dict(norm.kwargs)


GROUPED_MM = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback")  # MoE experts: (x, W (E, K, N), offs)
_VIEWS = ("t", "numpy_T", "mT", "transpose", "permute")  # how an op may read its weight: a view of the parameter


def _weight_arg(node: fx.Node) -> fx.Node | None:
    """The weight operand of a product node (linear/conv: 1, addmm: 2, mm/matmul: 1, grouped mm: 1)."""
    pos = 2 if aten_name(node.target) == "addmm" else 1
    return node.args[pos] if len(node.args) > pos else _call_kwargs(node).get("weight")


def _view_chain(node: fx.Node) -> list[fx.Node]:
    """The view nodes (transposes) between the weight parameter (or its `* mask`) and the op reading
    it, from the parameter towards the op (empty when the op reads the parameter itself)."""
    w, chain = _weight_arg(node), []
    while isinstance(w, fx.Node) and w.op == "call_function" and aten_name(w.target) in _VIEWS:
        chain.append(w)
        w = w.args[0]
    return chain[::-1]


def _apply_views(graph: fx.Graph, w: fx.Node, chain: list[fx.Node]) -> fx.Node:
    for view in chain:
        w = graph.call_function(view.target, (w, *view.args[1:]), dict(view.kwargs))
    return w


def _product(graph: fx.Graph, like: fx.Node, x, w, bias, pointwise: bool = False) -> fx.Node:
    """The original op `like`, re-applied to (x, w, bias); `pointwise` makes a conv 1x1/stride 1."""
    name = aten_name(like.target)
    if name in GROUPED_MM:  # the same grouping of rows (offsets) for every part of the layer
        kw = _call_kwargs(like)
        keys = list(kw)
        kw[keys[0]], kw[keys[1]] = x, w
        if "bias" in kw:
            kw["bias"] = bias
        return graph.call_function(like.target, (), kw)
    if name == "linear":
        return graph.call_function(aten.linear.default, (x, w, bias))
    if name == "addmm":  # HF Conv1D: bias + x @ W with W (in, out)
        return graph.call_function(aten.addmm.default, (bias, x, w)) if bias is not None else \
            graph.call_function(aten.mm.default, (x, w))
    if name in ("matmul", "mm"):
        return graph.call_function(like.target, (x, w))
    kw = _call_kwargs(like)
    kw.update(input=x, weight=w, bias=bias)
    if pointwise:
        nd = len(kw["stride"]) if isinstance(kw.get("stride"), (list, tuple)) else 2
        kw.update(stride=[1] * nd, padding=[0] * nd, dilation=[1] * nd)
    return graph.call_function(like.target, (), kw)


def _weight_node(graph: fx.Graph, name: str, sparse: bool, chain: list[fx.Node] = ()) -> fx.Node:
    w = graph.get_attr(name)
    if sparse:
        w = graph.call_function(aten.mul.Tensor, (w, graph.get_attr(name + "_mask")))
    return _apply_views(graph, w, list(chain))


def _sum(graph: fx.Graph, parts: list[fx.Node]) -> fx.Node:
    out = parts[0]
    for p in parts[1:]:
        out = graph.call_function(aten.add.Tensor, (out, p))
    return out


# ---------------------------------------------------------------------------------------------
# the emitter
# ---------------------------------------------------------------------------------------------
class _Emitter:
    def __init__(self, gm: fx.GraphModule, plan: SparsityPlan, init: str):
        self.gm, self.plan, self.init = gm, plan, init
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.by_source: dict[str, list[WeightPlan]] = {}
        for w in plan.weights:
            self.by_source.setdefault(w.source, []).append(w)
        # a bias is initialised from its layer's fan-in (PyTorch: U(+-1/sqrt(fan_in)))
        self.fan_in_of_op = {w.op: w.fan_in for w in plan.weights
                             if w.part in ("weight", "s", "branch0") and w.kind in ("linear", "conv")}

    def device_dtype(self, fqn: str):
        t = _get_attr(self.gm, fqn)
        return t.device, t.dtype

    # -- tensors ------------------------------------------------------------------------------
    def new_param(self, w: WeightPlan) -> None:
        """A freshly initialised parameter of w's shape, on the device/dtype of what it replaces."""
        device, dtype = self.device_dtype(w.name if _has_attr(self.gm, w.name) else w.source)
        fan = self.fan_in_of_op.get(w.op) if w.kind == "bias" else None
        t = init_tensor(w, self.plan, fan, dtype, device)
        if _has_attr(self.gm, w.name):
            _pop_attr(self.gm, w.name)
        _set_attr(self.gm, w.name, nn.Parameter(t), is_param=True)

    def add_mask(self, w: WeightPlan) -> None:
        device, _ = self.device_dtype(w.name)
        if device.type == "meta":
            mask = torch.empty(w.shape, device="meta")
        else:
            density = parse_mask(w.mask).density_fixed or w.density  # N:M: the nominal N/M
            mask = make_mask(w.mask, tuple(w.shape), density, seed=self.plan.seed, name=w.name,
                             out_axis=w.out_axis, in_axes=tuple(w.in_axes),
                             batch_axes=tuple(w.batch_axes)).to(device)
        _set_attr(self.gm, w.name + "_mask", mask)

    # -- Sparse Wide --------------------------------------------------------------------------
    def widen(self) -> None:
        bn_modules = {}
        for name, mod in self.gm.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                bn_modules[name] = mod
        rebuilt = set()
        for w in self.plan.weights:
            owner = w.name.rsplit(".", 1)[0]
            if owner in bn_modules:
                if owner not in rebuilt:
                    self.rebuild_bn(owner, bn_modules[owner], w.shape[0])
                    rebuilt.add(owner)
                continue
            fresh = self.init == "default" and w.kind in ("linear", "conv", "embedding", "norm", "bias")
            if tuple(w.shape) != tuple(w.orig_shape) or fresh:
                self.new_param(w) if fresh else self.embed_other(w)
        for p in self.plan.patches:
            _set_arg(self.nodes[p["op"]], p["key"], p["index"], p["new"])
        for t in self.plan.tables:  # size-derived buffers (rotary frequencies): recomputed, same parameters
            old = _get_attr(self.gm, t["name"])
            _pop_attr(self.gm, t["name"])
            _set_attr(self.gm, t["name"], tables.make(t["rule"], t["params"], t["shape"], old.dtype, old.device))

    def embed_other(self, w: WeightPlan) -> None:
        """A parameter of unknown role whose shape grows: original values in front, zeros after."""
        old = _get_attr(self.gm, w.name).detach()
        new = torch.zeros(w.shape, dtype=old.dtype, device=old.device)
        new[tuple(slice(0, s) for s in old.shape)] = old
        _pop_attr(self.gm, w.name)
        _set_attr(self.gm, w.name, nn.Parameter(new), is_param=True)

    def rebuild_bn(self, path: str, old: nn.modules.batchnorm._BatchNorm, channels: int) -> None:
        if old.num_features == channels and self.init != "default":
            return
        bn = BatchNorm(channels, eps=old.eps, momentum=old.momentum, affine=old.affine,
                       track_running_stats=old.track_running_stats,
                       device=old.running_mean.device if old.running_mean is not None else None,
                       dtype=old.running_mean.dtype if old.running_mean is not None else None)
        _pop_attr(self.gm, path)
        _set_attr(self.gm, path, bn)

    def mask_in_place(self, w: WeightPlan) -> None:
        """weight -> weight * mask for every reader of an existing parameter."""
        self.add_mask(w)
        graph = self.gm.graph
        for node in [n for n in graph.nodes if n.op == "get_attr" and n.target == w.name]:
            users = list(node.users)
            with graph.inserting_after(node):
                mask = graph.get_attr(w.name + "_mask")
            with graph.inserting_after(mask):
                mul = graph.call_function(aten.mul.Tensor, (node, mask))
            for u in users:
                u.replace_input_with(node, mul)

    # -- local replacements -------------------------------------------------------------------
    def replace(self, source: str, parts: list[WeightPlan]) -> None:
        """Replace every product reading `source` (one op, or each use of a shared weight) by the
        parts' products; the new parameters are created once and shared by every use."""
        graph = self.gm.graph
        first = parts[0]
        for w in parts:
            if w.name != source or self.init == "default":
                self.new_param(w)
            if w.sparse:
                self.add_mask(w)
        nodes = [self.nodes[first.op]] + [n for n in _readers(graph, source) if n is not self.nodes[first.op]]
        for node in nodes:
            self.replace_at(node, source, parts)
        if source not in {w.name for w in parts}:
            for old in [n for n in graph.nodes if n.op == "get_attr" and n.target == source and not n.users]:
                graph.erase_node(old)
            _pop_attr(self.gm, source)

    def replace_at(self, node: fx.Node, source: str, parts: list[WeightPlan]) -> None:
        graph = self.gm.graph
        first = parts[0]
        x = node.args[1] if aten_name(node.target) == "addmm" else node.args[0]
        bias = _bias_of(node)
        chain = _view_chain(node)
        device, dtype = self.device_dtype(parts[-1].name)
        family = first.family
        by_part = {w.part: w for w in parts}
        consumer = _single_bn_user(self.gm, node)
        with graph.inserting_before(node):
            if family == "sparse_parallel":
                outs = []
                for i, w in enumerate(parts):
                    y = _product(graph, node, x, _weight_node(graph, w.name, w.sparse, chain), bias if i == 0 else None)
                    if consumer is not None:
                        y = graph.call_module(self.branch_bn(consumer.target, i), (y,))
                    outs.append(y)
                result = _sum(graph, outs)
            elif family == "sparse_factorized":
                u, v = by_part["u"], by_part["v"]
                h = _product(graph, node, x, _weight_node(graph, u.name, u.sparse, chain), None)
                if self.plan.options.get("factorized_bn") and first.kind == "conv":
                    bn_path = part_name(source, "uv_bn")
                    if not _has_attr(self.gm, bn_path):  # a shared conv shares its BatchNorm too
                        _set_attr(self.gm, bn_path, BatchNorm(u.shape[0], device=device, dtype=dtype))
                    h = graph.call_function(aten.relu.default, (graph.call_module(bn_path, (h,)),))
                result = _product(graph, node, h, _weight_node(graph, v.name, v.sparse, chain), bias, pointwise=True)
            else:  # sparse_doped
                s = by_part["s"]
                result = _product(graph, node, x, _weight_node(graph, s.name, s.sparse, chain), bias)
                if "u" in by_part:
                    u, v = by_part["u"], by_part["v"]
                    h = _product(graph, node, x, _weight_node(graph, u.name, False, chain), None)
                    low = _product(graph, node, h, _weight_node(graph, v.name, False, chain), None, pointwise=True)
                    result = graph.call_function(aten.add.Tensor, (result, low))
        if family == "sparse_parallel" and consumer is not None:
            consumer.replace_all_uses_with(result)
            graph.erase_node(consumer)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        for view in reversed(chain):  # the original weight's own view nodes, now unread
            if not view.users:
                graph.erase_node(view)
    def branch_bn(self, path: str, i: int) -> str:
        if i == 0:
            return path
        old = _get_attr(self.gm, path)
        new_path = branch_norm_path(path, i)
        _set_attr(self.gm, new_path, BatchNorm(old.num_features, eps=old.eps, momentum=old.momentum,
                                               affine=old.affine, device=old.running_mean.device,
                                               dtype=old.running_mean.dtype))
        return new_path

    def run(self) -> fx.GraphModule:
        if self.plan.transform == "sparse_wide":
            self.widen()
            for w in self.plan.sparse_weights:
                self.mask_in_place(w)
        else:
            products = [w for w in self.plan.weights if w.family != "dense" and w.part != "norm"]  # not uv_bn's:
            for source in dict.fromkeys(w.source for w in products):  # the BatchNorm module is built with its node
                self.replace(source, [w for w in products if w.source == source])
            if self.init == "default":
                for w in self.plan.weights:
                    if w.family == "dense" and w.kind in ("linear", "conv", "embedding", "norm", "bias"):
                        owner = w.name.rsplit(".", 1)[0]
                        if isinstance(_maybe(self.gm, owner), nn.modules.batchnorm._BatchNorm):
                            continue
                        self.new_param(w)
        self.gm.graph.eliminate_dead_code()
        for node in list(self.gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                self.gm.graph.erase_node(node)
        self.gm.recompile()
        return self.gm


_PRODUCTS = ("linear", "addmm", "mm", "matmul", "convolution", "conv1d", "conv2d", "conv3d", *GROUPED_MM)


def _readers(graph: fx.Graph, param: str) -> list[fx.Node]:
    """The product nodes whose weight operand is `param` (through view nodes), in graph order."""
    out = []
    for ga in [n for n in graph.nodes if n.op == "get_attr" and n.target == param]:
        frontier = [ga]
        while frontier:
            n = frontier.pop()
            for u in n.users:
                if u.op == "call_function" and aten_name(u.target) in _VIEWS and u.args[0] is n:
                    frontier.append(u)
                elif u.op == "call_function" and aten_name(u.target) in _PRODUCTS and _weight_arg(u) is n:
                    out.append(u)
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(set(out), key=order.__getitem__)


def _maybe(gm, path):
    try:
        return _get_attr(gm, path)
    except AttributeError:
        return None


def _bias_of(node: fx.Node):
    name = aten_name(node.target)
    if name == "addmm":
        return node.args[0]
    if name in ("matmul", "mm"):
        return None
    return _call_kwargs(node).get("bias")  # linear, convolution, grouped mm


def _single_bn_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(
            _get_attr(gm, users[0].target), nn.modules.batchnorm._BatchNorm):
        return users[0]
    return None


def emit(gm: fx.GraphModule, plan: SparsityPlan, init: str = "default") -> fx.GraphModule:
    """Apply `plan` to a copy of the captured module `gm`; returns the trainable rewritten module."""
    if init not in ("default", "keep"):
        raise ValueError(f"init must be 'default' or 'keep', got {init!r}")
    out = _Emitter(copy.deepcopy(gm), plan, init).run()
    attach_plan(out, plan)
    measure(out, plan)
    _note_ragged_blocks(plan)
    return out


def _note_ragged_blocks(plan: SparsityPlan) -> None:
    """Block masks on sizes that are not a multiple of the block have ragged edge blocks whose true
    density the plan could only estimate: say so when the masks move the total off the budget."""
    opts = plan.options or {}
    if opts.get("width") is not None or plan.sparsity == 0 or any(n.startswith("iso-FLOP") for n in plan.notes):
        return
    t = plan.totals
    target = opts.get("budget") or t["original_dense_flops"] * (opts.get("budget_ratio") or 1.0)
    ratio = t["sparse_flops"] / target if target else 1.0
    if abs(ratio - 1) > 1e-3:
        ragged = [w.name for w in plan.sparse_weights if "block" in w.mask and any(
            w.shape[a] % int(w.mask.rsplit(":", 1)[1]) for a in (w.out_axis, *w.in_axes))]
        plan.notes.append(f"iso-FLOP: the masks put the sparse FLOPs at {ratio:.4f}x the budget, beyond the 0.1% "
                          "tolerance" + (f": ragged edge blocks (sizes not a multiple of the block) in {len(ragged)} "
                                         f"weights, e.g. {', '.join(ragged[:3])}" if ragged else ""))


def emit_pass(plan: SparsityPlan, init: str = "default"):
    """The emitter as a pass for the PassManager (functional: works on a copy)."""
    @graph_pass(f"emit_{plan.transform}", in_place=False)
    def run(gm: fx.GraphModule) -> PassResult:
        return PassResult(emit(gm, plan, init), True)
    return run


def measure(gm: nn.Module, plan: SparsityPlan) -> None:
    """Record the densities the masks really have (block masks with ragged edges, N:M tails)."""
    for w in plan.sparse_weights:
        mask = _maybe(gm, w.name + "_mask")
        if mask is None or mask.is_meta:
            continue
        w.density = float(mask.count_nonzero()) / mask.numel()
        w.sparse_flops = round(w.dense_flops * w.density)
    t = plan.totals
    t["sparse_flops"] = sum(w.sparse_flops for w in plan.weights) + t["other_flops"]
    t["nonzero_params"] = sum(round(math.prod(w.shape) * w.density) for w in plan.weights)


# ---------------------------------------------------------------------------------------------
# embedding a dense model into its Sparse Wide version (exactness checks, warm starts)
# ---------------------------------------------------------------------------------------------
def embed_dense(wide: fx.GraphModule, dense_state: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Copy a dense model's weights into its Sparse Wide rewrite so both compute the same function.

    Every widened axis is viewed as (scale, unit) chunks (heads x head_dim, say); original values
    fill the first `unit_old` entries of each chunk, the rest are zero; BatchNorm gamma = beta = 0
    and running statistics (0, 1) on new channels; masks are one on the embedded entries.
    """
    plan: SparsityPlan = wide.plan
    units: dict[tuple[str, int], tuple[int, int]] = {}
    for grp in plan.groups:
        for p in grp.params:
            fqn, axis = p[:-1].rsplit("[", 1)
            units[(fqn, int(axis))] = tuple(grp.unit)
    state = dict(wide.state_dict())
    with torch.no_grad():
        for name, new in state.items():
            base = name[:-len("_mask")] if name.endswith("_mask") else name
            if base not in dense_state or not new.is_floating_point():
                continue
            old = dense_state[base]
            index = _embedding_index(base, old.shape, new.shape, units)
            if name.endswith("_mask"):
                new[index] = 1.0
            else:
                fill = 1.0 if name.endswith("running_var") else 0.0
                new.fill_(fill)
                new[index] = old.to(new.dtype)
    wide.load_state_dict(state)
    return wide


def _embedding_index(fqn: str, old_shape, new_shape, units) -> tuple:
    """Advanced index of the embedded block (per axis: chunk c, offset j -> c * unit_new + j)."""
    idx = []
    for axis, (o, n) in enumerate(zip(old_shape, new_shape)):
        u_old, u_new = units.get((fqn, axis), (o, n))
        if o == n:
            pos = torch.arange(o)
        else:
            chunks = o // u_old
            pos = (torch.arange(chunks)[:, None] * u_new + torch.arange(u_old)[None, :]).reshape(-1)
        shape = [1] * len(old_shape)
        shape[axis] = -1
        idx.append(pos.reshape(shape))
    return tuple(idx)


__all__ = ["emit", "emit_pass", "embed_dense", "init_tensor", "measure"]
