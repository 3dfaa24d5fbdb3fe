"""ONNX emitter: apply a SparsityPlan to an onnx_ir model (the ONNX twin of `emit_torch`).

Planning is shared with PyTorch (`sparse_ift.make_plan` on the ModelGraph from `capture_onnx`);
this file only applies the plan, mechanically, to a copy of the captured model:

  sparse_wide        initializers get their planned shapes (fresh PyTorch-default values, or the
                     old values embedded in front with init="keep"); BatchNormalization running
                     statistics follow their channels; Reshape/Expand/Split/Slice constants, Conv
                     `group` and Attention `scale` named by the plan's patches are rewritten, and
                     so are the attention scales the exporter folds into scalar Mul/Div constants
  sparse_parallel    the MatMul/Gemm/Conv is repeated once per branch and the branches summed;
                     with a BatchNormalization right after it, every branch gets its own
  sparse_factorized  U (same op, inner width d) then V (pointwise), optional BN + Relu between
  sparse_doped       S x + V(U x)

Sparse weights are stored multiplied by their masks (`masks.make_mask`, reproducible from
(seed, name)), so the ONNX rewrite of a dense export holds the same tensors as the export of the
PyTorch rewrite with the same seed. The plan goes into `metadata_props["sparsegraph.plan"]`.

The graph-editing helpers here (constants, node construction, redirecting uses, re-inferring
shapes) are shared by `onnx.folding` and `onnx.lowering`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from ..dims import analyze_dims
from ..graph import ModelGraph, SparsegraphError
from ..masks import make_mask, parse_mask
from ..plan import ONNX_PLAN_KEY, SparsityPlan, WeightPlan, branch_norm_path
from ..passes.emit_torch import init_tensor

PLAN_KEY = ONNX_PLAN_KEY  # metadata_props key holding the plan's JSON
LOWERING_KEY = "sparsegraph.lowering"  # per-weight lowering choices (JSON)
MIN_OPSET = 13  # Split/Squeeze/ReduceSum take their sizes and axes as inputs from opset 13
MAX_OPSET = onnx.defs.onnx_opset_version()
MS_DOMAIN = "com.microsoft"


class OnnxPassError(SparsegraphError):
    """An ONNX graph the sparsegraph passes cannot handle; one line naming the node or value."""


# ---------------------------------------------------------------------------------------------
# model-level checks
# ---------------------------------------------------------------------------------------------
def opset_of(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)) or 0)


def check_opset(model: ir.Model, label: str) -> None:
    """The default-domain opset must be one the passes emit nodes for (13 to the onnx package's latest)."""
    v = opset_of(model)
    if not MIN_OPSET <= v <= MAX_OPSET:
        raise OnnxPassError(f"{label}: ONNX opset {v} is not supported by the sparsegraph ONNX passes "
                            f"(opsets {MIN_OPSET} to {MAX_OPSET}); convert it first, e.g. "
                            f"onnx.version_converter.convert_version(model, 17)")


def node_label(node: ir.Node) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"


# ---------------------------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------------------------
def is_constant(v: ir.Value | None) -> bool:
    """An initializer that cannot be overridden at run time, or a Constant node's output."""
    if v is None:
        return False
    if v.is_initializer():
        return not v.is_graph_input() and v.const_value is not None
    prod = v.producer()
    return prod is not None and prod.op_type == "Constant" and prod.domain in ("", "ai.onnx")


def const_array(v: ir.Value | None) -> np.ndarray | None:
    if not is_constant(v):
        return None
    t = ir.convenience.get_const_tensor(v)
    return t.numpy() if t is not None else None


def weight_source(v: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """The constant a weight operand reads, looking through Transpose/Identity: (constant, views)."""
    views: list[ir.Node] = []
    while v is not None and not is_constant(v):
        prod = v.producer()
        if prod is None or prod.op_type not in ("Transpose", "Identity") or prod.domain not in ("", "ai.onnx"):
            return None
        views.append(prod)
        v = prod.inputs[0]
    return (v, views) if v is not None else None


def apply_views(arr: np.ndarray, views: list[ir.Node]) -> np.ndarray:
    """The value a weight operand has after its Transpose/Identity views (innermost first)."""
    for node in reversed(views):
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            arr = np.transpose(arr, perm) if perm is not None else arr.T
    return arr


def gemm_operands(node: ir.Node) -> tuple[np.ndarray, float, np.ndarray | None] | None:
    """(W as (K, N), alpha, beta * C in float64 or None) of a MatMul/Gemm computing x @ W with a
    constant 2-D W; None for anything else (a transposed x, a run-time W or C)."""
    W = weight_value(node.inputs[1])
    if W is None or W.ndim != 2:
        return None
    if node.op_type != "Gemm":
        return W, 1.0, None
    if node.attributes.get_int("transA", 0):
        return None
    if node.attributes.get_int("transB", 0):
        W = W.T
    C = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        C = const_array(node.inputs[2])
        if C is None:
            return None  # a run-time C
        C = C.astype(np.float64) * node.attributes.get_float("beta", 1.0)
    return W, node.attributes.get_float("alpha", 1.0), C


def weight_value(v: ir.Value | None) -> np.ndarray | None:
    """A weight operand's numpy value if it is a constant seen through views, else None."""
    src = weight_source(v)
    if src is None:
        return None
    arr = const_array(src[0])
    return apply_views(arr, src[1]) if arr is not None else None


class Namer:
    """Unique value and node names in a graph."""

    def __init__(self, graph: ir.Graph):
        self.taken = set(graph.initializers)
        self.taken.update(v.name for v in graph.inputs if v.name)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.taken.update(v.name for v in node.outputs if v.name)
            if node.name:
                self.taken.add(node.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name


def add_initializer(graph: ir.Graph, namer: Namer, base: str, array: np.ndarray) -> ir.Value:
    name = namer(base)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def set_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> None:
    """Give an existing initializer a new value (and shape)."""
    v = graph.initializers[name]
    v.const_value = ir.tensor(np.ascontiguousarray(array), name=name)
    v.shape = ir.Shape(array.shape)
    v.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))


def numpy_dtype(v: ir.Value) -> np.dtype:
    t = v.const_value
    dtype = t.dtype if t is not None else v.dtype
    return dtype.numpy() if dtype is not None else np.dtype(np.float32)


# ---------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------
class Builder:
    """Creates nodes (named after a prefix) and collects them for one insertion."""

    def __init__(self, graph: ir.Graph, namer: Namer, prefix: str, metadata: dict | None = None):
        self.graph, self.namer, self.prefix = graph, namer, prefix
        self.nodes: list[ir.Node] = []
        self.metadata = dict(metadata or {})

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: dict | None = None, *,
           domain: str = "", num_outputs: int = 1, name: str | None = None) -> ir.Value | tuple[ir.Value, ...]:
        node_name = self.namer(f"{self.prefix}/{name or op_type}")
        outputs = [ir.Value(name=self.namer(f"{node_name}_out{i}" if num_outputs > 1 else f"{node_name}_out"))
                   for i in range(num_outputs)]
        node = ir.node(op_type, list(inputs), attributes or {}, domain=domain, outputs=outputs, name=node_name,
                       metadata_props=dict(self.metadata))
        self.nodes.append(node)
        return outputs[0] if num_outputs == 1 else tuple(outputs)

    def const(self, base: str, array: Any, dtype=None) -> ir.Value:
        return add_initializer(self.graph, self.namer, f"{self.prefix}/{base}", np.asarray(array, dtype=dtype))

    def insert_after(self, node: ir.Node) -> None:
        if self.nodes:
            self.graph.insert_after(node, self.nodes)
        self.nodes = []


def redirect(graph: ir.Graph, old: ir.Value, new: ir.Value, keep: Iterable[ir.Node] = ()) -> None:
    """Every reader of `old` (except the nodes in `keep`) and graph outputs read `new` instead."""
    keep = set(map(id, keep))
    for use in list(old.uses()):
        if id(use.node) not in keep:
            use.node.replace_input_with(use.idx, new)
    for i, out in enumerate(graph.outputs):
        if out is old:
            name = old.name
            old.name = None
            new.name = name  # graph outputs keep their names
            new.shape, new.type = old.shape, old.type
            graph.outputs[i] = new


def cleanup(model: ir.Model) -> None:
    """Remove dead nodes and initializers, forget stale intermediate shapes, re-infer them."""
    ir_common.RemoveUnusedNodesPass()(model)
    keep = {id(v) for v in model.graph.inputs} | {id(v) for v in model.graph.outputs}
    for node in model.graph:  # outputs keep theirs: their sizes never change (fixed dimension groups)
        if node.domain != "":  # ONNX shape inference does not know other domains: keep what the pass set
            continue
        for v in node.outputs:
            if id(v) not in keep and isinstance(v.type, ir.TensorType):
                v.shape = None  # element types never change; sequence types are kept as they are
    infer_shapes(model)


def infer_shapes(model: ir.Model) -> None:
    """ONNX shape inference, merged into tensor-typed values only (onnx_ir's ShapeInferencePass turns a
    sequence-typed value into a tensor when it copies the element type); left as is if inference fails."""
    from onnx_ir.passes.common._c_api_utils import call_onnx_api

    try:
        proto = call_onnx_api(lambda p: onnx.shape_inference.infer_shapes(p, data_prop=True), model)
    except Exception:  # noqa: BLE001 - an op ONNX cannot infer: keep what the values have
        return
    inferred = {}
    for info in [*proto.graph.value_info, *proto.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            inferred[info.name] = ir.serde.deserialize_value_info_proto(info, None)
    for node in model.graph:
        for v in node.outputs:
            new = inferred.get(v.name)
            if new is None or not isinstance(new.type, ir.TensorType) or \
                    (v.type is not None and not isinstance(v.type, ir.TensorType)):
                continue
            v.type = new.type
            if v.shape is None:
                v.shape = new.shape


def keep_weight_views(node: ir.Node) -> bool | None:
    """Constant-folding guard: Transpose/Identity of an initializer stays (folding it would rename the
    weight; ONNX Runtime folds it at load)."""
    if node.op_type in ("Transpose", "Identity") and node.inputs and node.inputs[0] is not None \
            and node.inputs[0].is_initializer():
        return False
    return None


def fold_constants(model: ir.Model) -> None:
    """onnxscript's constant folding (small computations on constants, e.g. the zero bias an
    unoptimised export builds with Shape/Expand), weight views kept; skipped without onnxscript."""
    try:
        from onnxscript.optimizer import _constant_folding
    except ImportError:
        return
    _constant_folding.FoldConstantsPass(shape_inference=True,
                                        input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                        output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                        should_fold=keep_weight_views)(model)


def weight_input_index(node: ir.Node) -> int | None:
    """Which input of a MatMul/Gemm/Conv carries the constant weight (None: no constant weight)."""
    if node.op_type in ("Gemm", "Conv", "ConvTranspose"):
        return 1 if weight_source(node.inputs[1]) is not None else None
    if node.op_type == "MatMul":
        for i in (1, 0):
            if weight_source(node.inputs[i]) is not None:
                return i
    return None


# ---------------------------------------------------------------------------------------------
# the emitter
# ---------------------------------------------------------------------------------------------
def _conv_kernel_rank(node: ir.Node) -> int:
    w = node.inputs[1]
    shape = w.shape if w.shape is not None else (const_array(w).shape if const_array(w) is not None else None)
    return len(shape) - 2 if shape is not None else 2


class _Emitter:
    def __init__(self, model: ir.Model, g: ModelGraph, plan: SparsityPlan, init: str):
        self.model, self.g, self.plan, self.init = model, g, plan, init
        self.graph = model.graph
        self.namer = Namer(self.graph)
        # op name in the ModelGraph -> node of the model being rewritten (a clone: matched by position)
        position = {id(n): i for i, n in enumerate(g.source.graph)}
        nodes = list(self.graph)
        self.node_of = {op.name: nodes[position[id(op.source)]] for op in g if id(op.source) in position}
        self.layer_fan_in = {w.source: w.fan_in for w in plan.weights if w.part in ("weight", "s", "branch0")}
        self.masks: dict[str, np.ndarray] = {}

    # -- tensors ------------------------------------------------------------------------------
    def dtype(self, name: str) -> np.dtype:
        return numpy_dtype(self.graph.initializers[name])

    def fresh(self, w: WeightPlan, dtype: np.dtype) -> np.ndarray:
        fan = self.layer_fan_in.get(w.source) if w.part == "bias" else None
        if w.kind == "bias" and fan is None:
            fan = w.fan_in
        return init_tensor(w, self.plan, fan).numpy().astype(dtype)

    def mask(self, w: WeightPlan) -> np.ndarray:
        density = parse_mask(w.mask).density_fixed or w.density  # N:M: the nominal N/M
        m = make_mask(w.mask, tuple(w.shape), density, seed=self.plan.seed, name=w.name,
                      out_axis=w.out_axis, in_axes=tuple(w.in_axes)).numpy()
        self.masks[w.name] = m
        return m

    def masked(self, w: WeightPlan, arr: np.ndarray) -> np.ndarray:
        return arr * self.mask(w).astype(arr.dtype) if w.sparse else arr

    def put(self, w: WeightPlan, arr: np.ndarray) -> ir.Value:
        """Store weight `w` (masked) under its own name: replace it or add it."""
        arr = self.masked(w, arr)
        if w.name in self.graph.initializers:
            set_initializer(self.graph, w.name, arr)
            return self.graph.initializers[w.name]
        value = ir.Value(name=w.name, shape=ir.Shape(arr.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)), const_value=ir.tensor(arr, name=w.name))
        self.namer.taken.add(w.name)
        self.graph.register_initializer(value)
        return value

    # -- Sparse Wide --------------------------------------------------------------------------
    def widen(self) -> None:
        norms = self.batch_norms()
        bn_params = {v.name for n in norms for v in n.inputs[1:3] if v is not None}
        for w in self.plan.weights:
            if w.name not in self.graph.initializers:
                raise OnnxPassError(f"{self.plan.model}: planned weight {w.name!r} is not an initializer of the model")
            old = self.graph.initializers[w.name].const_value.numpy()
            dtype = old.dtype
            fresh = self.init == "default" and w.kind in ("linear", "conv", "embedding", "norm", "bias")
            if w.name in bn_params and tuple(w.shape) != tuple(old.shape):
                fresh = True  # a widened BatchNorm is rebuilt (weight 1, bias 0), as emit_torch does
            if fresh:
                arr = self.fresh(w, dtype)
            elif tuple(w.shape) != tuple(old.shape):
                arr = np.zeros(w.shape, dtype)  # init="keep": original values in front, zeros after
                arr[tuple(slice(0, s) for s in old.shape)] = old
            else:
                arr = old
            self.put(w, arr)
        for node in norms:  # running statistics follow their channels (fresh: mean 0, var 1)
            scale = node.inputs[1]
            channels = self.graph.initializers[scale.name].const_value.shape[0]
            for idx, fill in ((3, 0.0), (4, 1.0)):
                stat = node.inputs[idx]
                if stat is None or not stat.is_initializer():
                    continue
                arr = stat.const_value.numpy()
                if arr.shape[0] != channels or self.init == "default":
                    new = np.full((channels,), fill, arr.dtype)
                    if stat.uses() and len(stat.uses()) > 1:
                        node.replace_input_with(idx, add_initializer(self.graph, self.namer, stat.name, new))
                    else:
                        set_initializer(self.graph, stat.name, new)
        patcher = _Patcher(self)
        for p in self.plan.patches:
            patcher.add(p)
        patcher.attention_scales()
        patcher.apply()

    def batch_norms(self) -> list[ir.Node]:
        planned = {w.name for w in self.plan.weights}
        return [n for n in self.graph if n.op_type == "BatchNormalization" and n.inputs[1] is not None
                and n.inputs[1].name in planned]

    # -- local replacements -------------------------------------------------------------------
    def replace(self, source: str, parts: list[WeightPlan]) -> None:
        first = parts[0]
        node = self.node_of[first.op]
        family = first.family
        k = weight_input_index(node)
        if k is None:
            raise OnnxPassError(f"{self.plan.model}: {node_label(node)} does not read its weight {source!r} "
                                "from an initializer")
        src, views = weight_source(node.inputs[k])
        if src.name != source:
            raise OnnxPassError(f"{self.plan.model}: {node_label(node)} reads {src.name!r}, the plan expects {source!r}")
        dtype = numpy_dtype(src)
        values: dict[str, ir.Value] = {}
        for w in parts:
            if w.name == source and self.init != "default":
                arr = src.const_value.numpy()
            else:
                arr = self.fresh(w, dtype)
            values[w.name] = self.put(w, arr)
        by_part = {w.part: w for w in parts}
        x = node.inputs[1 - k] if node.op_type == "MatMul" else node.inputs[0]
        bias = node.inputs[2] if node.op_type in ("Gemm", "Conv", "ConvTranspose") and len(node.inputs) > 2 else None
        b = Builder(self.graph, self.namer, node.name or source, node.metadata_props)
        product = _Product(b, node, k, views)
        y = node.outputs[0]
        bn = _single_batch_norm_user(self.graph, y)
        if family == "sparse_parallel":
            outs = []
            for i, w in enumerate(parts):
                out = product(x, values[w.name], bias if i == 0 else None)
                if bn is not None:
                    out = self.branch_norm(b, bn, out, i)
                outs.append(out)
            result = _sum(b, outs)
            replaced = bn.outputs[0] if bn is not None else y
        elif family == "sparse_factorized":
            u, v = values[by_part["u"].name], values[by_part["v"].name]
            h = product(x, u, None)
            if self.plan.options.get("factorized_bn") and first.kind == "conv":
                h = b.op("Relu", [self.new_norm(b, f"{source.rsplit('.', 1)[0]}.uv_bn", h, by_part["u"].shape[0],
                                                dtype, eps=1e-5, momentum=0.9)])
            result = product(h, v, bias, pointwise=True)
            replaced = y
        else:  # sparse_doped
            result = product(x, values[by_part["s"].name], bias)
            if "u" in by_part:
                h = product(x, values[by_part["u"].name], None)
                result = b.op("Add", [result, product(h, values[by_part["v"].name], None, pointwise=True)])
            replaced = y
        anchor = bn if (family == "sparse_parallel" and bn is not None) else node
        b.insert_after(anchor)
        redirect(self.graph, replaced, result)  # the original node (and BN) are now dead: removed by cleanup

    def branch_norm(self, b: Builder, bn: ir.Node, out: ir.Value, i: int) -> ir.Value:
        """Branch i's BatchNormalization: the original for branch 0, a fresh one (1, 0, 0, 1) for the others."""
        if i == 0:
            # branch 0 keeps the model's BN node: a copy reading the branch output
            return b.op("BatchNormalization", [out, *bn.inputs[1:]], _attrs(bn), name="bn0")
        scale = bn.inputs[1]
        prefix = scale.name[:-len(".weight")] if scale.name.endswith(".weight") else scale.name
        channels = scale.const_value.shape[0]
        return self.new_norm(b, branch_norm_path(prefix, i), out, channels, numpy_dtype(scale),
                             attributes=_attrs(bn))

    def new_norm(self, b: Builder, prefix: str, x: ir.Value, channels: int, dtype, *, eps: float = 1e-5,
                 momentum: float = 0.9, attributes: dict | None = None) -> ir.Value:
        """A fresh BatchNormalization (weight 1, bias 0, running mean 0, var 1) named like a torch module."""
        inits = [add_initializer(self.graph, self.namer, f"{prefix}.{n}", np.full((channels,), f, dtype))
                 for n, f in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0))]
        attrs = attributes if attributes is not None else {"epsilon": eps, "momentum": momentum}
        return b.op("BatchNormalization", [x, *inits], attrs, name=prefix.rsplit(".", 1)[-1])

    def run(self) -> None:
        if self.plan.transform == "sparse_wide":
            self.widen()
            return
        parallel_norms: list[ir.Node] = []
        replaced = {w.source for w in self.plan.weights if w.family != "dense"}
        for source in [w.source for w in self.plan.weights if w.family != "dense" and w.part in
                       ("branch0", "u", "s")]:
            if source not in replaced:
                continue
            replaced.discard(source)
            parts = [w for w in self.plan.weights if w.source == source and w.family != "dense"]
            node = self.node_of[parts[0].op]
            if parts[0].family == "sparse_parallel":
                bn = _single_batch_norm_user(self.graph, node.outputs[0])
                if bn is not None:
                    parallel_norms.append(bn)
            self.replace(source, parts)
        if self.init == "default":  # fresh values for the dense parameters too (as emit_torch does)
            norm_params = {v.name for n in self.graph if n.op_type == "BatchNormalization"
                           for v in n.inputs[1:] if v is not None}
            for w in self.plan.weights:
                if w.family == "dense" and w.kind in ("linear", "conv", "embedding", "norm", "bias") \
                        and w.name not in norm_params and w.name in self.graph.initializers:
                    self.put(w, self.fresh(w, self.dtype(w.name)))


def _attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def _single_batch_norm_user(graph: ir.Graph, v: ir.Value) -> ir.Node | None:
    uses = list(v.uses())
    if len(uses) == 1 and uses[0].node.op_type == "BatchNormalization" and uses[0].idx == 0 \
            and not v.is_graph_output() and len([o for o in uses[0].node.outputs if o.uses() or o.is_graph_output()]) == 1:
        return uses[0].node
    return None


def _sum(b: Builder, parts: list[ir.Value]) -> ir.Value:
    out = parts[0]
    for p in parts[1:]:
        out = b.op("Add", [out, p])
    return out


class _Product:
    """Re-apply a MatMul/Gemm/Conv node to (x, another weight, bias), keeping its attributes and the
    weight's Transpose views; `pointwise` makes a convolution 1x1 with stride 1 and no padding."""

    def __init__(self, b: Builder, node: ir.Node, k: int, views: list[ir.Node]):
        self.b, self.node, self.k, self.views = b, node, k, views

    def __call__(self, x: ir.Value, w: ir.Value, bias: ir.Value | None, pointwise: bool = False) -> ir.Value:
        b, node = self.b, self.node
        for view in reversed(self.views):  # innermost view first
            w = b.op(view.op_type, [w], _attrs(view))
        attrs = _attrs(node)
        if node.op_type == "MatMul":
            return b.op("MatMul", [x, w] if self.k == 1 else [w, x])
        if node.op_type == "Gemm":
            return b.op("Gemm", [x, w] + ([bias] if bias is not None else []), attrs)
        if pointwise:
            nd = _conv_kernel_rank(node)
            attrs.update(strides=[1] * nd, pads=[0] * (2 * nd), dilations=[1] * nd)
            attrs.pop("auto_pad", None)
            if "kernel_shape" in attrs:
                attrs["kernel_shape"] = [1] * nd
        return b.op(node.op_type, [x, w] + ([bias] if bias is not None else []), attrs)


# ---------------------------------------------------------------------------------------------
# constants that spell a widened size
# ---------------------------------------------------------------------------------------------
_CONST_INPUT = {  # (ONNX op, patch key) -> input holding the constant
    ("Reshape", "size"): 1, ("Expand", "size"): 1, ("Split", "split_sizes"): 1,
    ("SplitToSequence", "split_sizes"): 1, ("SplitToSequence", "split_size"): 1,
    ("Slice", "start"): 1, ("Slice", "end"): 2,
}
_ATTRIBUTE = {("Conv", "groups"): "group", ("ConvTranspose", "groups"): "group", ("Attention", "scale"): "scale"}
_DERIVED = {("LayerNormalization", "normalized_shape"), ("RMSNormalization", "normalized_shape"),
            ("SimplifiedLayerNormalization", "normalized_shape")}  # follows the input's shape: nothing to patch


class _Patcher:
    """Collects the plan's patches per node input, then writes patched copies of the constants."""

    def __init__(self, em: _Emitter):
        self.em = em
        self.edits: dict[tuple[int, int], tuple[ir.Node, int, dict[int, tuple[float, float]]]] = {}

    def add(self, p: dict) -> None:
        em = self.em
        node = em.node_of.get(p["op"])
        if node is None:
            raise OnnxPassError(f"{em.plan.model}: the plan patches op {p['op']!r}, which is not in the model")
        key = (node.op_type, p["key"])
        if key in _DERIVED:
            return
        if key in _ATTRIBUTE:
            name = _ATTRIBUTE[key]
            node.attributes[name] = ir.AttrFloat32(name, float(p["new"])) if name == "scale" else \
                ir.AttrInt64(name, int(p["new"]))
            return
        if key == ("Split", "split_sizes") and len(node.inputs) < 2 and "split" in node.attributes:  # opset < 13
            sizes = list(node.attributes.get_ints("split"))
            sizes[p["index"]] = int(p["new"])
            node.attributes["split"] = ir.AttrInt64s("split", sizes)
            return
        if key not in _CONST_INPUT:
            raise OnnxPassError(f"{em.plan.model}: cannot patch {p['key']!r} of {node_label(node)} "
                                f"(from {p['old']} to {p['new']})")
        idx = _CONST_INPUT[key]
        entry = self._slice_entry(node, p) if key[0] == "Slice" else (p["index"] if p["index"] is not None else 0)
        slot = self.edits.setdefault((id(node), idx), (node, idx, {}))
        slot[2][entry] = (p["old"], p["new"])

    def _slice_entry(self, node: ir.Node, p: dict) -> int:
        """Position, in the starts/ends lists, of the one axis a slice cuts."""
        axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        starts = _resolve(node.inputs[1])
        rank = len(self.em.g.values[node.inputs[0].name].shape)
        n = len(starts) if starts is not None else 1
        axes = [int(a) % rank for a in (axes if axes is not None else range(n))]
        op = self.em.g.ops[p["op"]]
        return axes.index(op.args["dim"])

    def attention_scales(self) -> None:
        """The optimised dynamo export folds SDPA's 1/sqrt(head_dim) into scalar constants: q * d^-1/4
        and k^T * d^-1/4 (or q * d^-1/2, or q / sqrt(d)). A scalar Mul/Div constant equal to such a
        power of the size of its operand's last or second-to-last axis, where that axis was widened,
        follows the new size. (Unoptimised exports compute the scale from Shape: nothing to patch.)"""
        em = self.em
        dims = analyze_dims(em.g)
        units = {gp.id: gp.unit[1] for gp in em.plan.groups}
        for op in em.g:
            node = em.node_of.get(op.name)
            if node is None or node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
                continue
            for ci in (0, 1):
                c, other = node.inputs[ci], node.inputs[1 - ci]
                arr = const_array(c)
                if arr is None or arr.size != 1 or not np.issubdtype(arr.dtype, np.floating) or \
                        other is None or other.name not in em.g.values or (node.op_type == "Div" and ci == 0):
                    continue
                shape = em.g.values[other.name].shape
                if len(shape) < 3:
                    continue
                x = float(arr.reshape(-1)[0])
                powers = (0.5, 0.25) if node.op_type == "Mul" else (-0.5,)
                for axis in (len(shape) - 1, len(shape) - 2):  # q (.., T, D) or k^T (.., D, T)
                    var = (other.name, axis)
                    grp = dims.groups[dims.of[var]] if var in dims.of else None
                    if grp is None or grp.id not in units:
                        continue
                    old, new = shape[axis], grp.scale(var) * units[grp.id]
                    for pw in powers:
                        if old != new and math.isclose(x, old ** -pw, rel_tol=1e-5):
                            slot = self.edits.setdefault((id(node), ci), (node, ci, {}))
                            slot[2][-1] = (x, float(new) ** -pw)

    def apply(self) -> None:
        for node, idx, entries in self.edits.values():
            value = node.inputs[idx]
            node.replace_input_with(idx, self._patched(node, idx, value, entries))

    def _patched(self, node: ir.Node, idx: int, value: ir.Value,
                 entries: dict[int, tuple[float, float]]) -> ir.Value:
        """A copy of the constant `value` (or of the Concat of constants computing it) with entries edited."""
        em = self.em
        arr = const_array(value)
        if arr is not None:
            flat = arr.reshape(-1).copy()
            for i, (old, new) in entries.items():
                if i == -1:  # a scalar
                    flat[0] = new
                    continue
                raw = flat[i]
                if node.op_type == "Reshape" and raw in (0, -1):
                    continue  # copied from the input / inferred: follows the widening by itself
                if node.op_type == "Slice" and idx == 2 and raw > old:
                    continue  # an end past the axis ("to the end"): still the end
                if raw != old:
                    raise OnnxPassError(f"{em.plan.model}: {node_label(node)}: constant {value.name!r} holds "
                                        f"{raw} at position {i}, the plan expects {old}")
                flat[i] = new
            return add_initializer(em.graph, em.namer, value.name or "patched", flat.reshape(arr.shape).astype(arr.dtype))
        prod = value.producer()
        if prod is not None and prod.op_type == "Concat" and int(prod.attributes.get_int("axis", 0)) == 0:
            pieces, start = [], 0
            for piece in prod.inputs:
                n = _length(piece, em.g)
                if n is None:
                    raise OnnxPassError(f"{em.plan.model}: {node_label(node)}: cannot tell the length of "
                                        f"{piece.name!r} in the shape it patches")
                mine = {i - start: e for i, e in entries.items() if start <= i < start + n}
                pieces.append(self._patched(node, idx, piece, mine) if mine else piece)
                start += n
            b = Builder(em.graph, em.namer, prod.name or "concat", prod.metadata_props)
            out = b.op("Concat", pieces, {"axis": 0})
            b.insert_after(prod)
            return out
        raise OnnxPassError(f"{em.plan.model}: {node_label(node)}: the size to patch is computed at run time "
                            f"({value.name!r}), not a constant")


def _resolve(v: ir.Value | None) -> np.ndarray | None:
    arr = const_array(v)
    if arr is not None or v is None:
        return arr
    prod = v.producer()
    if prod is not None and prod.op_type == "Concat":
        parts = [_resolve(p) for p in prod.inputs]
        if all(p is not None for p in parts):
            return np.concatenate([p.reshape(-1) for p in parts])
    return None


def _length(v: ir.Value, g: ModelGraph) -> int | None:
    """Length of a 1-D shape piece: a constant's size, else the size capture inferred for it."""
    arr = const_array(v)
    if arr is not None:
        return arr.size
    known = g.values.get(v.name)
    if known is not None and len(known.shape) == 1:
        return known.shape[0]
    if v.shape is not None and len(v.shape) == 1 and isinstance(v.shape[0], int):
        return v.shape[0]
    return None


# ---------------------------------------------------------------------------------------------
# passes
# ---------------------------------------------------------------------------------------------
def check_weights(g: ModelGraph) -> None:
    """Conv weights must be initializers (possibly through a Transpose/Identity view)."""
    for op in g:
        node = op.source
        if isinstance(node, ir.Node) and node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
            w = node.inputs[1]
            if weight_source(w) is None:
                where = "a graph input" if w is not None and w.is_graph_input() else (
                    f"computed by {node_label(w.producer())}" if w is not None and w.producer() is not None else "missing")
                raise OnnxPassError(f"{g.name}: {node_label(node)} reads its weight "
                                    f"{w.name if w is not None else ''!r} from {where}, not an initializer; "
                                    "sparsegraph rewrites need initializer weights")


class ApplyPlanPass(ir.passes.FunctionalPass):
    """Apply a SparsityPlan (planned on `graph`, the capture of the model) to a copy of the model.

    >>> import numpy as np, onnx_ir as ir
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> from sparsegraph.onnx.capture import capture_onnx
    >>> from sparsegraph.passes.sparse_ift import make_plan, Options
    >>> w = lambda n, s: numpy_helper.from_array(np.ones(s, np.float32), n)
    >>> nodes = [helper.make_node("Gemm", ["x", "a.weight"], ["h"], transB=1),
    ...          helper.make_node("Gemm", ["h", "b.weight"], ["y"], transB=1)]
    >>> m = helper.make_model(helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", 1, [4, 8])],
    ...     [helper.make_tensor_value_info("y", 1, [4, 8])], [w("a.weight", (16, 8)), w("b.weight", (8, 16))]))
    >>> g = capture_onnx(m)
    >>> plan = make_plan(g, "sparse_wide", 0.5, opts=Options(include_stem=True, include_head=True))
    >>> out = ApplyPlanPass(plan, g)(g.source).model
    >>> out.graph.initializers["a.weight"].const_value.shape  # 16 -> 16 / sqrt(0.5), rounded
    Shape([22, 8])
    """

    def __init__(self, plan: SparsityPlan, graph: ModelGraph, init: str = "default"):
        super().__init__()
        if init not in ("default", "keep"):
            raise ValueError(f"init must be 'default' or 'keep', got {init!r}")
        self.plan, self.g, self.init = plan, graph, init

    def requires(self, model: ir.Model) -> None:
        if model is not self.g.source:
            raise OnnxPassError("ApplyPlanPass: the model is not the one the plan was made for (pass graph.source)")
        check_opset(model, self.plan.model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        out = model.clone()
        em = _Emitter(out, self.g, self.plan, self.init)
        em.run()
        measure(self.plan, em.masks)
        cleanup(out)
        out.metadata_props[PLAN_KEY] = self.plan.to_json(indent=None)
        return ir.passes.PassResult(out, True)


def measure(plan: SparsityPlan, masks: dict[str, np.ndarray]) -> None:
    """Record the densities the masks really have (as `emit_torch.measure`)."""
    for w in plan.sparse_weights:
        m = masks.get(w.name)
        if m is None:
            continue
        w.density = float(np.count_nonzero(m)) / m.size
        w.sparse_flops = round(w.dense_flops * w.density)
    t = plan.totals
    t["sparse_flops"] = sum(w.sparse_flops for w in plan.weights) + t["other_flops"]
    t["nonzero_params"] = sum(round(math.prod(w.shape) * w.density) for w in plan.weights)


__all__ = ["ApplyPlanPass", "OnnxPassError", "PLAN_KEY", "LOWERING_KEY", "check_opset", "check_weights",
           "cleanup", "weight_source", "weight_value", "const_array", "is_constant", "Namer", "Builder",
           "redirect", "add_initializer", "set_initializer"]
