"""Fold passes: exact algebra back to one dense layer of the original size (DESIGN.md section 6).

Three rules, each a `Pass`, run in turn until none applies (`RULES` is the table):

  batchnorm   P(x, W, b) -> BatchNorm (eval)     =>  P(x, W * s, (b - mu) * s + beta),  s = gamma / sqrt(var + eps)
  compose     P2(P1(x, U, b1), V, b2)            =>  P1(x, V . U, V b1 + b2)       P2 pointwise (1x1 conv / matmul)
  sum         P(x, A, a) + P(x, B, b)            =>  P(x, A + B, a + b)             same op and hyperparameters

(P is a linear/addmm/mm/matmul/convolution product, `products.py`.) What they fold, per family:
Sparse Parallel = batchnorm on every branch, then sum; Sparse Factorized without a nonlinearity =
compose (W = V U); Sparse Doped = compose, then sum (W = S + V U); and BatchNorm into any conv or
linear layer. `compose` and `sum` only join weights that the plan says replace the same original
weight (`WeightPlan.source`), so a model's own layers are never merged; without a plan only
BatchNorm folds. A masked weight keeps its mask through a BatchNorm fold (the scale is per output
row); joined weights are stored dense (the union of ceil(1/rho) masks of density rho is nearly dense).
Folding uses BatchNorm's running statistics: the folded model computes the eval-mode function and
is returned in eval mode. Folded weights take the original weight's name, so the folded model has
the dense original's parameters (with every BatchNorm folded into its conv). The module form (your
own model) folds module by module with the same algebra: `fold_module.py`.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("resnet-mini")
    >>> par = sg.sparsify(spec.model, spec.example_inputs, "sparse_parallel", 0.5, output="graph").eval()
    >>> folded = sg.fold(par)
    >>> x = spec.example_inputs[0]
    >>> torch.allclose(folded(x), par(x), rtol=1e-4, atol=1e-5)
    True
    >>> sorted(folded.plan.lowering["fold"]["rules"])
    ['batchnorm', 'sum']
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture import _get_attr, _has_attr, _pop_attr, _set_attr
from ..graph import SparsegraphError
from ..plan import SparsityPlan, attach_plan, plan_of
from .manager import Pass, PassManager, PassResult
from .products import Product, WeightExpr, as_product, captured_copy, module_form, rebuild, weight_expr

aten = torch.ops.aten


class FoldError(SparsegraphError):
    pass


# ---------------------------------------------------------------------------------------------
# state shared by the rules: tensors, the plan's origins, fresh names
# ---------------------------------------------------------------------------------------------
@dataclass
class FoldState:
    gm: fx.GraphModule
    plan: SparsityPlan | None
    origin: dict[str, str] = field(default_factory=dict)  # parameter -> the original weight it replaces
    preferred: dict[str, str] = field(default_factory=dict)  # temporary name -> final name
    log: list[dict] = field(default_factory=list)
    _counter: int = 0

    def __post_init__(self):
        if self.plan is not None:
            self.origin = {w.name: w.source for w in self.plan.weights
                           if w.family != "dense" and w.part not in ("bias", "norm")}

    # -- tensors ------------------------------------------------------------------------------
    def is_tensor(self, node: fx.Node) -> bool:
        return node.op == "get_attr" and isinstance(_maybe_attr(self.gm, node.target), torch.Tensor)

    def is_param(self, node: fx.Node) -> bool:
        return node.op == "get_attr" and isinstance(_maybe_attr(self.gm, node.target), nn.Parameter)

    def tensor(self, node: fx.Node | None) -> torch.Tensor | None:
        return None if node is None else _get_attr(self.gm, node.target).detach()

    def weight(self, p: Product) -> WeightExpr | None:
        return weight_expr(p.w, self.is_tensor, self.is_param)

    def effective(self, we: WeightExpr) -> torch.Tensor:
        """W (x mask) in float64."""
        w = self.tensor(we.param).double()
        return w * self.tensor(we.mask).double() if we.mask is not None else w

    def source(self, we: WeightExpr) -> str | None:
        return self.origin.get(we.param.target)

    def joinable(self, p: Product, q: Product) -> tuple[WeightExpr, WeightExpr] | None:
        """The weights of p and q if the plan says they replace the same original weight and both
        biases are constant tensors (a model's own consecutive layers are never merged)."""
        a, b = self.weight(p), self.weight(q)
        if a is None or b is None or self.source(a) is None or self.source(a) != self.source(b):
            return None
        if any(x is not None and not self.is_tensor(x) for x in (p.bias, q.bias)):
            return None
        return a, b

    # -- new parameters -----------------------------------------------------------------------
    def new_param(self, graph: fx.Graph, value: torch.Tensor, like: torch.Tensor, final: str,
                  origin: str | None) -> fx.Node:
        """Register `value` (cast like `like`) under a fresh name that becomes `final` when free."""
        self._counter += 1
        tmp = f"_sg_fold_{self._counter}"
        _set_attr(self.gm, tmp, nn.Parameter(value.to(dtype=like.dtype, device=like.device)), is_param=True)
        self.preferred[tmp] = final
        if origin is not None:
            self.origin[tmp] = origin
        return graph.get_attr(tmp)

    def final_name(self, node: fx.Node) -> str:
        return self.preferred.get(node.target, node.target)

    # -- the end: drop what no node reads, give folded tensors their final names ---------------
    def finish(self) -> None:
        gm, graph = self.gm, self.gm.graph
        graph.eliminate_dead_code()
        for node in list(graph.nodes):
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
        _prune(gm)
        for tmp, final in self.preferred.items():
            if not _has_attr(gm, tmp):
                continue
            if _has_attr(gm, final):
                continue  # still taken (shared weight): keep the temporary name
            _set_attr(gm, final, _pop_attr(gm, tmp), is_param=True)
            for node in graph.nodes:
                if node.op == "get_attr" and node.target == tmp:
                    node.target = final
        gm.recompile()


def _maybe_attr(root, path):
    try:
        return _get_attr(root, path)
    except AttributeError:
        return None


def _prune(gm: fx.GraphModule) -> None:
    """Remove parameters, buffers and submodules that no node reads (keeps the plan holder)."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}

    def keep(path: str) -> bool:
        return path in used or any(path.startswith(u + ".") for u in used) or \
            any(u.startswith(path + ".") for u in used) or path.startswith("sparsegraph_plan")

    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if not keep(name):
            _pop_attr(gm, name)
    for name, _ in sorted(gm.named_modules(), key=lambda kv: -kv[0].count(".")):
        if name and not keep(name):
            try:
                _pop_attr(gm, name)
            except AttributeError:
                pass


def _bias_name(weight_name: str) -> str:
    return (weight_name.rsplit(".", 1)[0] + ".bias") if "." in weight_name else weight_name + "_bias"


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _replace(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    old.replace_all_uses_with(new)
    graph.erase_node(old)


# ---------------------------------------------------------------------------------------------
# the algebra, in float64 (also the module form's, fold_module.py)
# ---------------------------------------------------------------------------------------------
def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with BatchNorm(y) = s y + t per channel in eval mode: s = gamma / sqrt(var + eps), t = beta - mean s."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)  # (C,)
    return scale, beta - mean * scale


def scale_out(w: torch.Tensor, s: torch.Tensor, out_axis: int) -> torch.Tensor:
    """w with every output (row of axis `out_axis`) multiplied by its entry of s."""
    shape = [1] * w.dim()
    shape[out_axis] = -1
    return w * s.view(shape)


def compose(U: torch.Tensor, V: torch.Tensor, b1: torch.Tensor | None, b2: torch.Tensor | None, out_axis: int
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, bias) of the one product equal to V applied after U: V(U x + b1) + b2, V pointwise.
    Weights as the ops hold them: out_axis 0 (linear, conv) or 1 (addmm/mm, Hugging Face Conv1D)."""
    if U.dim() > 2:  # conv: U (d, in, *k), V (out, d, 1, ...): W[o] = sum_d V[o, d] U[d]
        v2 = V.reshape(V.shape[0], V.shape[1])
        W = torch.einsum("od,d...->o...", v2, U)
        vb = v2 @ b1 if b1 is not None else None
    elif out_axis == 0:  # linear: U (d, in), V (out, d)
        W = V @ U
        vb = V @ b1 if b1 is not None else None
    else:  # addmm/mm: U (in, d), V (d, out)
        W = U @ V
        vb = b1 @ V if b1 is not None else None
    parts = [b for b in (vb, b2) if b is not None]
    return W, (sum(parts) if parts else None)


# ---------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------
def fold_batchnorm(st: FoldState, node: fx.Node) -> bool:
    """product -> BatchNorm module (running statistics)  =>  product with scaled weight and shifted bias."""
    if node.op != "call_module":
        return False
    bn = _maybe_attr(st.gm, node.target)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None or len(node.args) != 1:
        return False
    src = node.args[0]
    p = as_product(src) if isinstance(src, fx.Node) else None
    if p is None or _sole_user(src) is not node:
        return False
    we = st.weight(p)
    if we is None or (p.bias is not None and not st.is_tensor(p.bias)):
        return False
    if not p.is_conv and p.kind.name in ("linear", "matmul") and _rank(src) != 2:
        return False  # BatchNorm1d normalises dim 1, the features only for 2-D outputs
    scale, shift = bn_affine(bn)  # (C,) each
    w_old = st.tensor(we.param)
    w_new = scale_out(w_old.double(), scale, p.kind.out_axis)
    b_old = st.tensor(p.bias).double() if p.bias is not None else torch.zeros_like(scale)
    b_new = b_old * scale + shift
    graph = st.gm.graph
    with graph.inserting_before(src):
        w_node = st.new_param(graph, w_new, w_old, st.final_name(we.param), st.origin.get(we.param.target))
        if we.mask is not None:
            w_node = graph.call_function(aten.mul.Tensor, (w_node, we.mask))
        b_final = st.final_name(p.bias) if p.bias is not None else _bias_name(st.final_name(we.param))
        b_node = st.new_param(graph, b_new, w_old, b_final, None)
        out = rebuild(graph, p, p.x, w_node, b_node)
    _replace(graph, node, out)
    graph.erase_node(src)
    st.log.append({"rule": "batchnorm", "into": st.final_name(we.param), "norm": node.target})
    return True


def fold_compose(st: FoldState, node: fx.Node) -> bool:
    """P2(P1(x, U, b1), V, b2), P2 pointwise  =>  P1(x, V.U, V b1 + b2) (both factors of one original weight)."""
    p2 = as_product(node)
    if p2 is None or not p2.pointwise():
        return False
    p1 = as_product(p2.x)
    if p1 is None or _sole_user(p1.node) is not node or p1.is_conv != p2.is_conv:
        return False
    if (p1.kind.out_axis != p2.kind.out_axis) or p1.conv.get("groups", 1) != 1:
        return False
    if (uv := st.joinable(p1, p2)) is None:
        return False
    u, v = uv
    b1, b2 = (st.tensor(p.bias).double() if p.bias is not None else None for p in (p1, p2))
    W, bias = compose(st.effective(u), st.effective(v), b1, b2, p1.kind.out_axis)
    source = st.source(u)
    like = st.tensor(u.param)
    graph = st.gm.graph
    with graph.inserting_before(p1.node):
        w_node = st.new_param(graph, W, like, source, source)
        b_node = st.new_param(graph, bias, like, _bias_name(source), None) if bias is not None else None
        out = rebuild(graph, p1, p1.x, w_node, b_node)
    _replace(graph, node, out)
    graph.erase_node(p1.node)
    st.log.append({"rule": "compose", "into": source, "from": [u.param.target, v.param.target]})
    return True


def fold_sum(st: FoldState, node: fx.Node) -> bool:
    """P(x, A, a) + P(x, B, b)  =>  P(x, A + B, a + b) (parts of one original weight, same op)."""
    if node.op != "call_function" or node.target is not aten.add.Tensor or len(node.args) != 2 or node.kwargs:
        return False
    pa, pb = (as_product(a) if isinstance(a, fx.Node) else None for a in node.args)
    if pa is None or pb is None or pa.node is pb.node or pa.x is not pb.x:
        return False
    if any(_sole_user(p.node) is not node for p in (pa, pb)):
        return False
    if _family(pa) != _family(pb) or pa.conv != pb.conv:
        return False
    if (ab := st.joinable(pa, pb)) is None:
        return False
    a, b = ab
    W = st.effective(a) + st.effective(b)
    biases = [st.tensor(p.bias).double() for p in (pa, pb) if p.bias is not None]
    source, like = st.source(a), st.tensor(a.param)
    graph = st.gm.graph
    with graph.inserting_before(pa.node if _before(pa.node, pb.node) else pb.node):
        w_node = st.new_param(graph, W, like, source, source)
        b_node = st.new_param(graph, sum(biases), like, _bias_name(source), None) if biases else None
        out = rebuild(graph, pa, pa.x, w_node, b_node)
    _replace(graph, node, out)
    graph.erase_node(pa.node)
    graph.erase_node(pb.node)
    st.log.append({"rule": "sum", "into": source, "from": [a.param.target, b.param.target]})
    return True


def _family(p: Product) -> str:
    """Products that compute the same map up to a bias: addmm and mm, or one convolution op."""
    if p.is_conv:
        return str(p.node.target)
    return {"addmm": "mm"}.get(p.kind.name, p.kind.name)


def _before(a: fx.Node, b: fx.Node) -> bool:
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return True


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    tm = node.meta.get("tensor_meta")
    return len(tm.shape) if tm is not None and hasattr(tm, "shape") else None


# the pattern table: rule name -> rule
RULES: dict[str, Callable[[FoldState, fx.Node], bool]] = {
    "batchnorm": fold_batchnorm,
    "compose": fold_compose,
    "sum": fold_sum,
}


def make_passes(st: FoldState) -> list[Pass]:
    """One Pass per rule, each applying its rule wherever it matches."""
    def as_pass(name: str, rule) -> Pass:
        def run(gm: fx.GraphModule) -> PassResult:
            changed = False
            for node in list(gm.graph.nodes):
                if not getattr(node, "_erased", False) and rule(st, node):
                    changed = True
            return PassResult(gm, changed)
        return Pass(f"fold_{name}", run)
    return [as_pass(name, rule) for name, rule in RULES.items()]


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def fold(model: nn.Module, example_inputs: Any = None, max_rounds: int = 20) -> nn.Module:
    """Fold a model back to dense layers of the original size where the algebra allows (see module doc).

    `model` is a sparsegraph model or any `nn.Module`. The module form of `sg.sparsify` (your own
    class, with its plan) gives a copy of itself, same class, its Sparse Parallel, Factorized and
    Doped layers folded (`fold_module.py`; `example_inputs`, default the model's own, find the norm
    after each parallel layer). The graph form (an `fx.GraphModule`) gives a GraphModule folded by
    the rules above; any other module is captured with `example_inputs`, and then only BatchNorm
    folds. The input is not modified; the result is in eval mode, and its plan records the folds
    in `plan.lowering["fold"]`.
    """
    if module_form(model):
        from .fold_module import fold_module  # it imports this module's algebra

        return fold_module(model, example_inputs)
    plan = plan_of(model)
    gm, inputs = captured_copy(model, example_inputs, "fold", FoldError)
    gm.eval()
    st = FoldState(gm, plan)
    manager = PassManager(make_passes(st))
    for _ in range(max_rounds):
        if not manager(gm).modified:
            break
    st.finish()
    gm.example_inputs = getattr(model, "example_inputs", inputs)
    if plan is not None:
        plan = copy.deepcopy(plan)
        plan.lowering["fold"] = {"rules": sorted({e["rule"] for e in st.log}), "folds": st.log,
                                 "params": sum(p.numel() for p in gm.parameters())}
        attach_plan(gm, plan)
    return gm.eval()


__all__ = ["fold", "RULES", "FoldState", "FoldError", "make_passes", "bn_affine", "scale_out", "compose"]
