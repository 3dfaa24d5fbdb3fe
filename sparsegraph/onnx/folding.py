"""ONNX fold pass: collapse chains of linear ops with constant weights into one layer (DESIGN.md section 6).

Every value computed from one source tensor x by constant-weight linear ops alone is an affine
map of x, and is tracked as one:

  matmul form   y = x @ A + c            A (K, N), c (N,)          MatMul/Gemm with constant weights
  conv form     y = conv(x, A) + c       A (O, I/groups, *kernel)   Conv with constant weights

Rules (all in float64, exact algebra):
  MatMul(f, W)              A' = A W,  c' = c W
  Gemm(f, W, C)             A' = alpha A W',  c' = alpha c W' + beta C      (W' = W or W^T)
  Conv1x1(f, W, b)          A' = W[:, :, 0, 0] . A,  c' = W c + b            (stride 1, no padding, group 1)
  BatchNormalization(f)     s = gamma / sqrt(var + eps):  A' = s A,  c' = s (c - mean) + beta
  Add(f, g), same x         A' = A_f + A_g,  c' = c_f + c_g               (convs: same attributes)
  Add(f, constant)          c' = c + constant                             (broadcast along the output axis)

The folded weight keeps the name of the chain's first weight (Conv + BN: the conv's), or
`<name>.folded` when the plan in the model's metadata lists that name as a sparse weight: its
planned density does not describe the sum. A chain is only extended through a value read by
nothing else (and not a graph output). A form
that absorbed two or more weight ops (Conv + BN, parallel branches summed, U then V, S + U.V)
is rebuilt as one MatMul (+ Add) or one Conv, when that is no more expensive than the chain
(dense multiply-adds per output position). Nonlinear ops (Relu after a BN between U and V)
end a chain, so Sparse Factorized with `factorized_bn` does not fold.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..plan import plan_of
from .rewrite import (Builder, Namer, add_initializer, cleanup, const_array, fold_constants, gemm_operands,
                           redirect, weight_value)


@dataclass
class _Form:
    kind: str  # "matmul" | "conv"
    src: ir.Value  # the tensor the chain starts from
    A: np.ndarray  # float64 once combined (a single op's form holds a view of its constant)
    c: np.ndarray | None  # float64, (N,) or (O,)
    attrs: dict  # conv: strides, pads, dilations, group (normalised); matmul: {}
    nodes: list[ir.Node]  # nodes absorbed (first weight op first)
    weight_ops: int
    cost: int  # dense multiply-adds per output position of the chain as it is
    dtype: np.dtype
    names: list[str] = field(default_factory=list)  # weight initializers read (first one names the result)
    absorbed: bool = False  # a consumer's form contains this one

    def bias(self) -> np.ndarray:
        return self.c if self.c is not None else np.zeros(self.A.shape[1] if self.kind == "matmul" else self.A.shape[0])

    def folded_cost(self) -> int:  # multiply-adds per output position (row / pixel) of the folded layer
        return int(np.prod(self.A.shape))


def _conv_attrs(node: ir.Node, w: np.ndarray) -> dict | None:
    if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return None
    k = w.ndim - 2
    return {"strides": tuple(node.attributes.get_ints("strides", [1] * k)),
            "pads": tuple(node.attributes.get_ints("pads", [0] * 2 * k)),
            "dilations": tuple(node.attributes.get_ints("dilations", [1] * k)),
            "group": int(node.attributes.get_int("group", 1)), "kernel": tuple(w.shape[2:])}


def _pointwise(attrs: dict) -> bool:
    return (all(s == 1 for s in attrs["kernel"]) and all(s == 1 for s in attrs["strides"])
            and all(p == 0 for p in attrs["pads"]) and attrs["group"] == 1)


def _weight_name(v: ir.Value) -> str:
    while v is not None and not v.is_initializer() and v.producer() is not None and v.producer().inputs:
        v = v.producer().inputs[0]
    return v.name if v is not None and v.name else "folded"


class _Folder:
    def __init__(self, model: ir.Model):
        self.model, self.graph = model, model.graph
        self.forms: dict[int, _Form] = {}  # id(value) -> its form
        self.values: dict[int, ir.Value] = {}

    def form(self, v: ir.Value | None, kind: str) -> _Form | None:
        """The form of `v` if a consumer may extend it (read once, not a graph output)."""
        if v is None:
            return None
        f = self.forms.get(id(v))
        if f is None or f.kind != kind or len(v.uses()) != 1 or v.is_graph_output():
            return None
        return f

    def set(self, node: ir.Node, f: _Form, *parents: _Form) -> None:
        for p in parents:
            p.absorbed = True
        out = node.outputs[0]
        self.forms[id(out)] = f
        self.values[id(out)] = out

    # -- rules ----------------------------------------------------------------------------------
    def matmul(self, node: ir.Node) -> None:
        operands = gemm_operands(node)
        if operands is None:
            return
        W, alpha, C = operands
        if C is not None:
            if C.size not in (1, W.shape[1]) or (C.ndim == 2 and C.shape[0] != 1):
                return  # a C with rows: not a bias
            C = np.broadcast_to(C.reshape(-1), (W.shape[1],))
        W = W * alpha if alpha != 1.0 else W  # a view of the constant: converted only when combined
        x = node.inputs[0]
        base = self.form(x, "matmul")
        if base is not None:
            W = W.astype(np.float64)
            c = base.c @ W if base.c is not None else None
            f = _Form("matmul", base.src, _f64(base.A) @ W, c, {}, base.nodes + [node], base.weight_ops + 1,
                      base.cost + W.size, base.dtype, base.names + [_weight_name(node.inputs[1])])
        else:
            f = _Form("matmul", x, W, None, {}, [node], 1, W.size, _dtype(node.inputs[1]),
                      [_weight_name(node.inputs[1])])
        if C is not None:
            f.c = f.bias() + C
        self.set(node, f, *([base] if base is not None else []))

    def conv(self, node: ir.Node) -> None:
        W = weight_value(node.inputs[1])
        if W is None or W.ndim < 3:
            return
        attrs = _conv_attrs(node, W)
        if attrs is None:
            return
        b = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = const_array(node.inputs[2])
            if b is None:
                return
            b = b.astype(np.float64)
        x = node.inputs[0]
        base = self.form(x, "conv")
        per_position = int(np.prod(W.shape))
        if base is not None and _pointwise(attrs) and base.attrs["group"] == 1:  # V (1x1) after U: one conv
            W2 = W.reshape(W.shape[0], W.shape[1]).astype(np.float64)
            A = np.tensordot(W2, _f64(base.A), axes=(1, 0))
            c = W2 @ base.c if base.c is not None else None
            f = _Form("conv", base.src, A, c, base.attrs, base.nodes + [node], base.weight_ops + 1,
                      base.cost + per_position, base.dtype, base.names + [_weight_name(node.inputs[1])])
            if b is not None:
                f.c = f.bias() + b
            self.set(node, f, base)
            return
        f = _Form("conv", x, W, b, attrs, [node], 1, per_position, _dtype(node.inputs[1]),
                  [_weight_name(node.inputs[1])])
        self.set(node, f)

    def batch_norm(self, node: ir.Node) -> None:
        if node.attributes.get_int("training_mode", 0) or any(o.uses() or o.is_graph_output()
                                                                for o in node.outputs[1:]):
            return
        base = self.form(node.inputs[0], "conv")
        params = [const_array(v) for v in node.inputs[1:5]]
        if base is None or any(p is None for p in params):
            return
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        s = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
        A = _f64(base.A) * s.reshape((-1,) + (1,) * (base.A.ndim - 1))
        c = (base.bias() - mean) * s + beta
        f = _Form("conv", base.src, A, c, base.attrs, base.nodes + [node], base.weight_ops + 1, base.cost,
                  base.dtype, base.names)
        self.set(node, f, base)

    def add(self, node: ir.Node) -> None:
        p, q = node.inputs[0], node.inputs[1]
        for kind in ("matmul", "conv"):
            fp, fq = self.form(p, kind), self.form(q, kind)
            if fp is not None and fq is not None and p is not q:
                if fp.src is not fq.src or fp.A.shape != fq.A.shape or fp.attrs != fq.attrs:
                    continue
                f = _Form(kind, fp.src, _f64(fp.A) + _f64(fq.A), fp.bias() + fq.bias(), fp.attrs, fp.nodes + fq.nodes + [node],
                          fp.weight_ops + fq.weight_ops, fp.cost + fq.cost, fp.dtype, fp.names + fq.names)
                self.set(node, f, fp, fq)
                return
            for f0, other in ((fp, q), (fq, p)):
                if f0 is None:
                    continue
                const = const_array(other)
                n_out = f0.A.shape[1] if kind == "matmul" else f0.A.shape[0]
                if const is None or not _is_channel_vector(const, n_out, f0):
                    continue
                f = _Form(kind, f0.src, f0.A, f0.bias() + np.broadcast_to(const.reshape(-1), (n_out,)),
                          f0.attrs, f0.nodes + [node], f0.weight_ops, f0.cost, f0.dtype, f0.names)
                self.set(node, f, f0)
                return

    # -- driver -----------------------------------------------------------------------------------
    def run(self) -> bool:
        rules = {"MatMul": self.matmul, "Gemm": self.matmul, "Conv": self.conv,
                 "BatchNormalization": self.batch_norm, "Add": self.add}
        for node in list(self.graph):
            rule = rules.get(node.op_type) if node.domain == "" else None
            if rule is not None and node.outputs:
                rule(node)
        namer = Namer(self.graph)
        renames: list[tuple[ir.Value, str]] = []
        plan = plan_of(self.model)
        self.sparse_names = {w.name for w in plan.sparse_weights} if plan is not None else set()
        changed = False
        for key, f in self.forms.items():
            if f.absorbed or f.weight_ops < 2 or f.folded_cost() > f.cost:
                continue
            out = self.values[key]
            self.materialize(f, out, namer, renames)
            changed = True
        if changed:
            cleanup(self.model)
            for value, name in renames:  # the folded weight takes its first weight's name once that is free
                if name not in self.graph.initializers and value.is_initializer():
                    value.name = name
        return changed

    def materialize(self, f: _Form, out: ir.Value, namer: Namer, renames: list) -> None:
        last = out.producer()
        anchor = f.nodes[0]
        b = Builder(self.graph, namer, anchor.name or "fold", anchor.metadata_props)
        base = f.names[0]
        if base in self.sparse_names:  # the plan's density for that name no longer applies: a new name
            base = f"{base}.folded"
        if f.kind == "matmul":
            w = add_initializer(self.graph, namer, base, f.A.astype(f.dtype))
            y = b.op("MatMul", [f.src, w], name="MatMul")
            if f.c is not None and np.any(f.c):
                bias = add_initializer(self.graph, namer, _bias_name(base), f.c.astype(f.dtype))
                renames.append((bias, _bias_name(base)))
                y = b.op("Add", [y, bias], name="Add")
        else:
            w = add_initializer(self.graph, namer, base, f.A.astype(f.dtype))
            inputs = [f.src, w]
            if f.c is not None:
                bias = add_initializer(self.graph, namer, _bias_name(base), f.c.astype(f.dtype))
                inputs.append(bias)
                renames.append((bias, _bias_name(base)))
            attrs = {"strides": list(f.attrs["strides"]), "pads": list(f.attrs["pads"]),
                     "dilations": list(f.attrs["dilations"]), "group": f.attrs["group"],
                     "kernel_shape": list(f.attrs["kernel"])}
            y = b.op("Conv", inputs, attrs, name="Conv")
        renames.append((w, base))
        b.insert_after(last)
        redirect(self.graph, out, y)


def _f64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64, copy=False)


def _bias_name(weight: str) -> str:
    return weight[:-len("weight")] + "bias" if weight.endswith("weight") else weight + ".bias"


def _dtype(v: ir.Value) -> np.dtype:
    while v is not None and v.const_value is None and v.producer() is not None and v.producer().inputs:
        v = v.producer().inputs[0]
    t = v.const_value if v is not None else None
    return t.dtype.numpy() if t is not None else np.dtype(np.float32)


def _is_channel_vector(const: np.ndarray, n: int, f: _Form) -> bool:
    """A constant that adds one value per output feature (or a scalar): right-aligned, (..., N) for
    matmul forms, (..., O, 1, ..., 1) with one 1 per kernel axis for conv forms; other axes 1."""
    if const.size == 1:
        return True
    if const.size != n:
        return False
    k = 0 if f.kind == "matmul" else len(f.attrs["kernel"])
    rank = len(f.src.shape) if f.src.shape is not None else None
    if rank is None or const.ndim > rank:  # broadcasting would add axes to the output
        return False
    return const.ndim > k and const.shape[const.ndim - 1 - k] == n


def _known(d) -> bool:
    return isinstance(d, int) or (isinstance(d, ir.SymbolicDim) and d.value is not None)


def split_concat(model: ir.Model) -> bool:
    """Split(Concat(a_1 .. a_n, axis), axis) into pieces of a_i's sizes is a_1 .. a_n: the module form's
    stacked Sparse Parallel branches (joined along the batch axis, one BatchNorm per chunk) become
    the branches themselves, which the rules above then fold."""
    changed = False
    for node in list(model.graph):
        src = node.inputs[0] if node.op_type == "Split" and node.domain == "" and node.inputs else None
        cat = src.producer() if src is not None else None
        if cat is None or cat.op_type != "Concat" or cat.domain != "" or len(cat.inputs) != len(node.outputs):
            continue
        shapes = [v.shape for v in cat.inputs]
        if any(sh is None for sh in shapes) or len({len(sh) for sh in shapes}) != 1:
            continue
        rank = len(shapes[0])
        axis = node.attributes.get_int("axis", 0) % rank
        if cat.attributes.get_int("axis", 0) % rank != axis or not all(_known(sh[axis]) for sh in shapes):
            continue
        sizes = [sh[axis] for sh in shapes]
        if len(node.inputs) > 1 and node.inputs[1] is not None:  # explicit sizes
            split = const_array(node.inputs[1])
            if split is None or [int(v) for v in split.reshape(-1)] != sizes:
                continue
        elif any(sz != sizes[0] for sz in sizes):  # num_outputs: equal pieces
            continue
        for out, piece in zip(node.outputs, cat.inputs):
            redirect(model.graph, out, piece)
        changed = True
    if changed:
        cleanup(model)
    return changed


class FoldPass(ir.passes.InPlacePass):
    """Fold BatchNormalization into the Conv before it, Sparse Parallel branches into one weight, and
    U.V products (Sparse Factorized without a nonlinearity, Sparse Doped S + U.V) into one matrix."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fold_constants(model)  # e.g. the Shape/Expand zero biases of unoptimised exports
        joined = split_concat(model)
        return ir.passes.PassResult(model, _Folder(model).run() or joined)


__all__ = ["FoldPass", "split_concat"]
