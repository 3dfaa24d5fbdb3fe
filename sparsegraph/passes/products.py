"""Weight-bearing products in aten-level fx graphs, as the fold and lowering passes see them.

A *product* is one of `linear(x, W, b)`, `addmm(b, x, W)`, `mm/matmul(x, W)` or a (non-transposed)
convolution `conv(x, W, b, stride, padding, dilation, groups)`; its weight operand is a tensor
(`get_attr`, or a graph input in Dynamo graphs) or `weight * mask` of two of them. The table
`PRODUCTS` says, per aten op, where x, W and the bias sit and which weight axis holds the outputs;
`rebuild` re-emits a product of the same kind with new operands.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from ..capture import aten_name
from ..plan import plan_of

aten = torch.ops.aten
CONVS = ("conv1d", "conv2d", "conv3d", "convolution")


@dataclass(frozen=True)
class ProductKind:
    """Where a product keeps its operands: arg positions of x, W, bias; the weight's output axis."""
    name: str
    x: int
    w: int
    bias: int | None
    out_axis: int  # weight axis of the outputs: 0 for linear/conv (out, in, ...), 1 for addmm/mm (in, out)


PRODUCTS: dict[str, ProductKind] = {
    "linear": ProductKind("linear", 0, 1, 2, 0),
    "addmm": ProductKind("addmm", 1, 2, 0, 1),
    "mm": ProductKind("mm", 0, 1, None, 1),
    "matmul": ProductKind("matmul", 0, 1, None, 1),
    **{c: ProductKind("conv", 0, 1, 2, 0) for c in CONVS},
}


@dataclass
class Product:
    node: fx.Node
    kind: ProductKind
    x: fx.Node
    w: fx.Node
    bias: fx.Node | None
    conv: dict = field(default_factory=dict)  # stride, padding, dilation, groups (convolutions)

    @property
    def is_conv(self) -> bool:
        return self.kind.name == "conv"

    def pointwise(self) -> bool:
        """A 1x1 convolution with unit stride, no padding, no dilation, one group (or any matrix product)."""
        if not self.is_conv:
            return True
        c = self.conv
        return all(s == 1 for s in c["stride"]) and all(p == 0 for p in c["padding"]) and \
            all(d == 1 for d in c["dilation"]) and c["groups"] == 1


def _args(node: fx.Node) -> dict[str, Any]:
    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return dict(norm.kwargs) if norm is not None else {}


def _as_list(v, nd: int) -> list[int]:
    return list(v) if isinstance(v, (list, tuple)) else [v] * nd


def as_product(node: fx.Node) -> Product | None:
    """The product `node` computes, or None (also for transposed or >2-D-weight matmuls)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    name = aten_name(node.target)
    kind = PRODUCTS.get(name)
    if kind is None:
        return None
    try:
        kw = _args(node)
    except Exception:  # noqa: BLE001 - an unexpected spelling: not a product we handle
        return None
    names = [a.name for a in node.target._schema.arguments]

    def get(i):  # normalize_function spells the schema's `self` as `input`
        key = names[i]
        return kw.get(key, kw.get("input")) if key == "self" else kw.get(key)

    x, w = get(kind.x), get(kind.w)
    bias = get(kind.bias) if kind.bias is not None else None
    if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
        return None  # scaled addmm: not a plain product
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or (bias is not None and not isinstance(bias, fx.Node)):
        return None
    conv = {}
    if kind.name == "conv":
        if kw.get("transposed", False):
            return None
        wval = w.meta.get("val")
        nd = (wval.dim() - 2) if isinstance(wval, torch.Tensor) else {"conv1d": 1, "conv3d": 3}.get(name, 2)
        conv = {"stride": _as_list(kw.get("stride", 1), nd), "padding": kw.get("padding", 0),
                "dilation": _as_list(kw.get("dilation", 1), nd), "groups": int(kw.get("groups", 1))}
        if isinstance(conv["padding"], str):  # "same"/"valid": keep as given (never pointwise unless valid)
            conv["padding"] = [0] * nd if conv["padding"] == "valid" else conv["padding"]
        else:
            conv["padding"] = _as_list(conv["padding"], nd)
        if name == "convolution" and any(p != 0 for p in _as_list(kw.get("output_padding", 0), nd)):
            return None
    return Product(node, kind, x, w, bias, conv)


def rebuild(graph: fx.Graph, like: Product, x: fx.Node, w: fx.Node, bias: fx.Node | None) -> fx.Node:
    """A product of `like`'s kind and hyperparameters on new operands (inserted at the current point)."""
    name = like.kind.name
    if name == "linear":
        return graph.call_function(aten.linear.default, (x, w, bias))
    if name in ("addmm", "mm", "matmul"):
        if bias is None:
            return graph.call_function(aten.mm.default if name != "matmul" else aten.matmul.default, (x, w))
        return graph.call_function(aten.addmm.default, (bias, x, w))
    c = like.conv
    if aten_name(like.node.target) == "convolution":
        nd = len(c["stride"])
        return graph.call_function(aten.convolution.default, (x, w, bias, c["stride"], c["padding"], c["dilation"],
                                                              False, [0] * nd, c["groups"]))
    return graph.call_function(like.node.target, (x, w, bias, c["stride"], c["padding"], c["dilation"], c["groups"]))


@dataclass
class WeightExpr:
    """A product's weight operand: a tensor node, optionally multiplied by a mask tensor node."""
    param: fx.Node
    mask: fx.Node | None = None
    mul: fx.Node | None = None


def weight_expr(w: fx.Node, is_tensor: Callable[[fx.Node], bool], is_param: Callable[[fx.Node], bool]
                ) -> WeightExpr | None:
    """`w` as W or W * mask (either operand order), with W a parameter and the mask another tensor."""
    if w.op in ("get_attr", "placeholder"):
        return WeightExpr(w) if is_tensor(w) else None
    if w.op == "call_function" and w.target in (aten.mul.Tensor,) and len(w.args) == 2 and not w.kwargs:
        a, b = w.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and is_tensor(a) and is_tensor(b):
            if is_param(a) and not is_param(b):
                return WeightExpr(a, b, w)
            if is_param(b) and not is_param(a):
                return WeightExpr(b, a, w)
    return None


def matrix_view(weight: torch.Tensor, kind: ProductKind) -> torch.Tensor:
    """The (out, fan_in) matrix of a weight: W for linear, W^T for addmm/mm, W.reshape(out, -1) for convs."""
    if kind.out_axis == 1:
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


__all__ = ["PRODUCTS", "ProductKind", "Product", "as_product", "rebuild", "WeightExpr", "weight_expr",
           "matrix_view", "CONVS", "module_form", "captured_copy"]


def module_form(model: Any) -> bool:
    """Is `model` a sparsegraph model in module form (the user's own class with a plan, as
    `sg.sparsify` returns it) rather than a captured graph or a plain module?"""
    return isinstance(model, torch.nn.Module) and not isinstance(model, fx.GraphModule) and plan_of(model) is not None


def captured_copy(model: Any, example_inputs: Any, verb: str, error: type[Exception]) -> tuple[fx.GraphModule, Any]:
    """(a copy of `model` as a captured GraphModule with node shapes recorded, the example inputs used).

    A GraphModule from `sg.sparsify` is deep-copied; any other `nn.Module` is traced (it then
    needs `example_inputs`). Shapes come from running the copy once in eval mode; they are hints
    (2-D linear outputs for BatchNorm1d folding, rows for the cost model), so a failure is ignored.
    """
    import copy

    from ..capture import trace

    inputs = example_inputs if example_inputs is not None else getattr(model, "example_inputs", None)
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
    elif isinstance(model, torch.nn.Module):
        if inputs is None:
            raise error(f"{verb}: {type(model).__name__} is not a captured graph; pass example_inputs")
        gm = trace(copy.deepcopy(model).eval(), inputs)  # eval: tracing must not touch BatchNorm statistics
        gm.train(model.training)  # the captured BatchNorm and dropout follow the mode
    else:
        raise error(f"{verb}: expected an nn.Module, got {type(model).__name__}")
    if inputs is not None:
        _record_shapes(gm, inputs)
    return gm, inputs


def _record_shapes(gm: fx.GraphModule, inputs: Any) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    if any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
        return
    training = gm.training
    try:
        gm.eval()  # no BatchNorm statistics updates while measuring shapes
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception:  # noqa: BLE001 - shapes are hints
        pass
    finally:
        gm.train(training)
