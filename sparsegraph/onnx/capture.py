"""ONNX frontend: an `.onnx` file, `onnx.ModelProto` or `onnx_ir.Model` -> ModelGraph.

1. Load with onnx_ir; model-local functions are inlined, the graph is checked for values that
   nothing defines (a truncated or corrupt file).
2. Concrete shapes. Every symbolic input dimension gets a size (`input_shapes`, else 2 for
   axis 0 and 16 for the others, retried with 224 if inference fails at 16). ONNX shape
   inference runs on a weight-free skeleton of the graph; small shape computations
   (Shape -> Gather -> Concat -> Reshape ...) are constant-folded with the ONNX reference
   evaluator and fed back as constants until every shape is known. A second run with every
   symbolic size doubled flags the axes that depend on them (`Value.symbolic`).
3. Every node is mapped to the canonical vocabulary of `capture.py` through one table, `OPS`,
   with the PyTorch frontend's argument names, so `dims.RULES`, `layers.find_layers` and
   `flops.op_flops` apply unchanged.

Conventions
  - Initializers: float ones are parameters (kind "param", `param` = initializer name), except
    scalars (kind "const") and BatchNormalization running statistics (kind "buffer"). Other
    initializers and Constant outputs are kind "const"; `constant_value` returns their values.
  - `op.inputs` lists the tensors whose *data* an op reads. Shape/Size read only the shape of
    their input and CastLike only the dtype of its second input: those are named in `args` as
    plain strings, so a shape query does not tie (or fix) the tensor it looks at.
  - Integer arguments computed from tensor shapes at run time (Shape -> ... -> Reshape) are
    `capture.SymSize`, never patched by rewrites; literal constants are plain ints.
"""
from __future__ import annotations

import ast
import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnx.reference import ReferenceEvaluator

from ..capture import SymSize, _first_line
from ..graph import CaptureError, ModelGraph, Op, Ref, Value

_BATCH_SIZE = 2  # default size of a symbolic axis 0
_DEFAULT_SIZES = (16, 224)  # default size of other symbolic axes, the second tried if the first fails
_FOLD_LIMIT = 4096  # elements: larger tensors are never constant-folded
_MAX_ROUNDS = 12  # shape inference <-> folding rounds
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
            "Multinomial", "If", "Loop", "Scan"}
_DEFAULT_DOMAINS = ("", "ai.onnx")
# ops of other domains ONNX cannot infer, given to its shape inference as a standard op of the same
# output shape: com.microsoft SparseToDenseMatMul(A (N, K), B (K, M)) without transposes is a MatMul
_SHAPE_STANDINS = {("com.microsoft", "SparseToDenseMatMul"): "MatMul"}


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _load(src: Any) -> tuple[ir.Model, str]:
    """The onnx_ir model and a label naming it in error messages."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise CaptureError(f"ONNX file not found: {path}")
        if os.path.isdir(path):
            raise CaptureError(f"cannot read ONNX file {path}: it is a directory")
        try:
            model = read_model(path)
        except CaptureError:
            raise
        except Exception as e:  # noqa: BLE001 - protobuf DecodeError, OSError, ...
            raise CaptureError(f"cannot read ONNX file {path}: not a valid ONNX model "
                               f"(truncated or corrupt? {_first_line(e)})") from None
        return model, path
    if isinstance(src, onnx.ModelProto):
        label = f"ONNX model {src.graph.name or '<unnamed>'}"
        try:
            if has_sparse_tensors(src):
                src = densify_sparse_initializers(src)
            return ir.serde.deserialize_model(src), label
        except Exception as e:  # noqa: BLE001
            raise CaptureError(f"cannot read {label}: {_first_line(e)}") from None
    if isinstance(src, ir.Model):
        return src, f"ONNX model {src.graph.name or '<unnamed>'}"
    raise CaptureError(f"cannot capture {type(src).__name__}: expected a path to an .onnx file, "
                       "an onnx.ModelProto or an onnx_ir.Model")


def sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of an ONNX sparse tensor (COO, linearised or per-axis indices)."""
    values = onnx.numpy_helper.to_array(sp.values)
    idx = onnx.numpy_helper.to_array(sp.indices).astype(np.int64)
    dense = np.zeros(_numel(sp.dims), dtype=values.dtype)
    dense[idx if idx.ndim == 1 else np.ravel_multi_index(tuple(idx.T), tuple(sp.dims))] = values
    return dense.reshape(tuple(sp.dims))


def _sparse_constant(node: onnx.NodeProto) -> onnx.SparseTensorProto | None:
    """The sparse tensor of a `Constant(sparse_value=...)` node (how sparse weights are stored)."""
    if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
        for a in node.attribute:
            if a.name == "sparse_value":
                return a.sparse_tensor
    return None


def has_sparse_tensors(proto: onnx.ModelProto) -> bool:
    """Whether the graph holds sparse initializers or sparse `Constant`s (onnx_ir reads neither)."""
    return bool(proto.graph.sparse_initializer) or any(_sparse_constant(n) is not None for n in proto.graph.node)


def densify_sparse_initializers(proto: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """`proto` (a copy unless `inplace`) with its sparse weights stored as dense initializers:
    sparse initializers, and `Constant(sparse_value)` nodes (onnx_ir reads neither)."""
    proto = proto if inplace else copy.deepcopy(proto)
    for sp in proto.graph.sparse_initializer:
        proto.graph.initializer.append(onnx.numpy_helper.from_array(sparse_to_dense(sp), sp.values.name))
    del proto.graph.sparse_initializer[:]
    nodes = []
    for node in proto.graph.node:
        sp = _sparse_constant(node)
        if sp is None:
            nodes.append(node)
        else:
            proto.graph.initializer.append(onnx.numpy_helper.from_array(sparse_to_dense(sp), node.output[0]))
    if len(nodes) != len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return proto


def _tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    """Every TensorProto of a graph and its subgraphs: initializers, sparse ones, node attributes."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield from (sp.values, sp.indices)
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(g)


def check_external_data(proto: onnx.ModelProto, path: str) -> None:
    """Every tensor stored outside the `.onnx` file is where the file says, and complete: one
    line naming the missing or short data file otherwise (`proto` loaded without its data)."""
    base = os.path.dirname(os.path.abspath(path))
    for t in _tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        data = os.path.join(base, location)
        if not location or not os.path.isfile(data):
            raise CaptureError(f"cannot read ONNX file {path}: the external data file {location or '?'} of "
                               f"tensor {t.name} is missing (looked in {base})")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if os.path.getsize(data) < end:
            raise CaptureError(f"cannot read ONNX file {path}: the external data file {location} is "
                               f"truncated ({os.path.getsize(data)} bytes; tensor {t.name} needs {end})")


def read_model(path: str) -> ir.Model:
    """`onnx_ir.load`, also for files with sparse weights (stored dense in the returned model);
    external data is checked, then read when a tensor is used."""
    proto = onnx.load(path, load_external_data=False)
    check_external_data(proto, path)
    if has_sparse_tensors(proto):
        proto = densify_sparse_initializers(proto, inplace=True)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, os.path.dirname(path))
    return model


def _is_defined(v: ir.Value) -> bool:
    return v.producer() is not None or v.is_graph_input() or v.is_initializer()


def _check_structure(model: ir.Model, label: str) -> None:
    """Every value read is defined: a truncated or corrupt file fails here, with one line."""
    graph = model.graph
    if not graph.outputs:
        raise CaptureError(f"cannot capture {label}: the graph has no outputs (empty, truncated or corrupt file?)")
    for i, node in enumerate(graph):
        for v in node.inputs:
            if v is not None and v.name and not _is_defined(v):
                raise CaptureError(f"cannot capture {label}: {_node_label(node, i)} reads "
                                   f"{v.name!r}, which nothing defines (truncated or corrupt file?)")
    for v in graph.outputs:
        if not _is_defined(v):
            raise CaptureError(f"cannot capture {label}: graph output {v.name!r} is not computed by any node")


def _prepare(model: ir.Model, owned: bool) -> ir.Model:
    """Inline model-local functions and restore topological order if needed."""
    if model.functions:
        model = model if owned else model.clone()
        ir_passes.InlinePass()(model)
    defined = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    for node in model.graph:
        if any(v is not None and v.name and v.name not in defined for v in node.inputs):
            model.graph.sort()
            break
        defined.update(v.name for v in node.outputs)
    return model


# ---------------------------------------------------------------------------------------------
# input sizes: concrete values for symbolic dimensions
# ---------------------------------------------------------------------------------------------
def _user_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


@dataclass
class _Sizes:
    shapes: dict[str, tuple[int, ...]]  # input name -> concrete shape
    doubled: dict[str, tuple[int, ...]] | None  # every symbolic size doubled; None: all static
    symbolic: dict[str, tuple[bool, ...]]  # input name -> per axis: symbolic in the file
    uses_default: bool  # some symbolic size was not given by the caller


def _input_sizes(model: ir.Model, given: dict[str, Any], default: int, label: str) -> _Sizes:
    """Sizes for every input axis; one dim_param gets one size across inputs."""
    names = [v.name for v in _user_inputs(model)]
    if isinstance(given, (list, tuple)):  # shapes in input order (the CLI's repeated --input-shape)
        if len(given) > len(names):
            raise CaptureError(f"cannot capture {label}: {len(given)} input shapes for {len(names)} inputs {names}")
        given = dict(zip(names, given))
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise CaptureError(f"cannot capture {label}: input_shapes names unknown inputs {unknown}; "
                           f"the model's inputs are {names}")
    by_param: dict[str, int] = {}
    shapes, doubled, symbolic, uses_default = {}, {}, {}, False
    for v in _user_inputs(model):
        want = given.get(v.name)
        if v.shape is None and want is None:
            raise CaptureError(f"cannot capture {label}: input {v.name!r} has no shape in the file; "
                               f"pass input_shapes={{{v.name!r}: (...)}}")
        dims = list(v.shape) if v.shape is not None else [None] * len(want)
        if want is not None and len(want) != len(dims):
            raise CaptureError(f"cannot capture {label}: input_shapes[{v.name!r}] = {tuple(want)} has rank "
                               f"{len(want)}, the input has rank {len(dims)}")
        shape, flags = [], []
        for axis, d in enumerate(dims):
            w = int(want[axis]) if want is not None and isinstance(want[axis], (int, np.integer)) else None
            if w is not None and w <= 0:
                raise CaptureError(f"cannot capture {label}: input_shapes[{v.name!r}] has a non-positive size {w}")
            if isinstance(d, int):
                if w is not None and w != d:
                    raise CaptureError(f"cannot capture {label}: input {v.name!r} axis {axis} has the fixed size "
                                       f"{d} in the file, input_shapes asks for {w}")
                shape.append(d)
                flags.append(False)
                continue
            key = getattr(d, "value", None) or f"{v.name}:{axis}"  # unnamed dims: one size each
            if w is None and key not in by_param:
                uses_default = True
            size = w if w is not None else by_param.get(key, _BATCH_SIZE if axis == 0 else default)
            by_param.setdefault(key, size)
            shape.append(size)
            flags.append(True)
        shapes[v.name] = tuple(shape)
        doubled[v.name] = tuple(s * 2 if f else s for s, f in zip(shape, flags))
        symbolic[v.name] = tuple(flags)
    any_symbolic = any(any(f) for f in symbolic.values())
    return _Sizes(shapes, doubled if any_symbolic else None, symbolic, uses_default)


# ---------------------------------------------------------------------------------------------
# shape inference with constant folding of shape computations
# ---------------------------------------------------------------------------------------------
@dataclass
class _Facts:
    """What inference and folding know about the values at one set of input sizes."""

    shapes: dict[str, tuple[int | None, ...] | None] = field(default_factory=dict)  # tensors
    elem: dict[str, int] = field(default_factory=dict)  # ONNX element type of tensors
    sequences: set[str] = field(default_factory=set)  # sequence-typed values
    consts: dict[str, np.ndarray] = field(default_factory=dict)  # folded values (small)
    derived: set[str] = field(default_factory=set)  # values computed from tensor shapes at run time

    def shape(self, name: str) -> tuple[int, ...] | None:
        s = self.shapes.get(name)
        return s if s is not None and all(d is not None for d in s) else None  # type: ignore[return-value]


def _numel(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)


def _is_used(v: ir.Value) -> bool:
    return bool(v.uses()) or v.is_graph_output()


def _for_inference(node: ir.Node) -> onnx.NodeProto:
    proto = ir.serde.serialize_node(node)
    standin = _SHAPE_STANDINS.get((node.domain, node.op_type))
    if standin and not any(a.name in ("transA", "transB") and a.i for a in proto.attribute):
        proto = onnx.helper.make_node(standin, proto.input, proto.output, name=proto.name)
    return proto


class _Inference:
    """Shape inference on a weight-free skeleton, iterated with folding of shape computations."""

    def __init__(self, model: ir.Model, label: str):
        self.model, self.label = model, label
        self.nodes = list(model.graph)
        self.protos = [_for_inference(n) for n in self.nodes]
        self.opsets = dict(model.opset_imports) or {"": 17}
        self.small: dict[str, np.ndarray] = {}  # initializers small enough to fold with
        self.init_protos: list[onnx.TensorProto] = []
        self.init_inputs: list[onnx.ValueInfoProto] = []  # large initializers: typed inputs
        for name, v in model.graph.initializers.items():
            t = v.const_value
            if t is not None and _numel(t.shape) <= _FOLD_LIMIT:
                proto = ir.serde.serialize_tensor(t)
                proto.name = name
                self.init_protos.append(proto)
                self.small[name] = t.numpy()
            else:
                shape = t.shape if t is not None else v.shape
                dtype = t.dtype if t is not None else v.dtype
                self.init_inputs.append(onnx.helper.make_tensor_value_info(
                    name, int(dtype), [int(d) for d in shape] if shape is not None else None))

    # -- one skeleton -----------------------------------------------------------------------
    def _skeleton(self, sizes: dict[str, tuple[int, ...]], facts: _Facts, folded: set[int]) -> onnx.ModelProto:
        graph = onnx.GraphProto(name=self.model.graph.name or "main")
        for v in _user_inputs(self.model):
            if v.dtype is None:
                raise CaptureError(f"cannot capture {self.label}: input {v.name!r} has no element type")
            graph.input.append(onnx.helper.make_tensor_value_info(v.name, int(v.dtype), list(sizes[v.name])))
        graph.input.extend(self.init_inputs)
        graph.initializer.extend(self.init_protos)
        for i, (node, proto) in enumerate(zip(self.nodes, self.protos)):
            if i in folded:
                graph.node.extend(_constant_node(v.name, facts.consts[v.name]) for v in node.outputs if v.name)
            else:
                graph.node.append(proto)
                if node.domain not in _DEFAULT_DOMAINS:  # ONNX cannot infer other domains' ops: static shapes from the file
                    graph.value_info.extend(ir.serde.serialize_value(v) for v in node.outputs if v.name and v.dtype
                                            and v.shape is not None and all(isinstance(d, int) for d in v.shape))
        for v in self.model.graph.outputs:
            info = ir.serde.serialize_value(v)
            if info.type.HasField("tensor_type"):
                info.type.tensor_type.ClearField("shape")  # the file's shapes may be symbolic: re-infer
            graph.output.append(info)
        return onnx.helper.make_model(graph, ir_version=self.model.ir_version or onnx.IR_VERSION,
                                      opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in self.opsets.items()])

    def _infer(self, proto: onnx.ModelProto, facts: _Facts) -> None:
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        except Exception as e:  # noqa: BLE001 - InferenceError, ValidationError
            raise CaptureError(f"cannot capture {self.label}: ONNX shape inference failed: "
                               f"{_first_line(e)}") from None
        g = inferred.graph
        for t in g.initializer:
            facts.shapes[t.name], facts.elem[t.name] = tuple(t.dims), t.data_type
        for info in [*g.input, *g.value_info, *g.output]:
            kind = info.type.WhichOneof("value")
            if kind == "sequence_type":
                facts.sequences.add(info.name)
            elif kind == "tensor_type":
                tt = info.type.tensor_type
                facts.elem[info.name] = tt.elem_type
                facts.shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                                for d in tt.shape.dim) if tt.HasField("shape") else None

    def _missing(self, facts: _Facts) -> tuple[int, ir.Node, ir.Value] | None:
        """The first used tensor whose shape is still unknown."""
        for i, node in enumerate(self.nodes):
            for v in node.outputs:
                if v.name and v.name not in facts.sequences and _is_used(v) and facts.shape(v.name) is None:
                    return i, node, v
        return None

    # -- folding ----------------------------------------------------------------------------
    def _fold(self, facts: _Facts, folded: set[int]) -> bool:
        new = False
        for i, node in enumerate(self.nodes):
            if i in folded:
                continue
            values = self._evaluate(i, node, facts)
            if values is None:
                continue
            folded.add(i)
            new = True
            derived = node.op_type in ("Shape", "Size") or any(
                v is not None and v.name in facts.derived for v in node.inputs)
            for v, arr in zip(node.outputs, values):
                if not v.name:
                    continue
                facts.consts[v.name] = arr
                if derived:
                    facts.derived.add(v.name)
        return new

    def _evaluate(self, i: int, node: ir.Node, facts: _Facts) -> list[np.ndarray] | None:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type in _NO_FOLD or not node.outputs:
            return None
        if node.op_type in ("Shape", "Size"):
            shape = facts.shape(node.inputs[0].name)
            if shape is None:
                return None
            if node.op_type == "Size":
                return [np.array(_numel(shape), dtype=np.int64)]
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(shape))
            return [np.array(shape[start:end], dtype=np.int64)]
        inputs = [v for v in node.inputs if v is not None and v.name]
        if any(v.name not in facts.consts for v in inputs) or not self._small_outputs(node, facts):
            return None
        try:
            feeds = {v.name: facts.consts[v.name] for v in inputs}
            out = ReferenceEvaluator(self.protos[i], opsets=self.opsets).run(None, feeds)
        except Exception:  # noqa: BLE001 - an op the reference evaluator cannot run: not folded
            return None
        if len(out) < len(node.outputs) or not all(isinstance(a, np.ndarray) and a.size <= _FOLD_LIMIT
                                                    for a in out):
            return None
        return [np.asarray(a) for a in out]

    def _small_outputs(self, node: ir.Node, facts: _Facts) -> bool:
        shapes = [facts.shape(v.name) for v in node.outputs if v.name]
        if all(s is not None for s in shapes):
            return all(_numel(s) <= _FOLD_LIMIT for s in shapes)
        c = [facts.consts.get(v.name) if v is not None else None for v in node.inputs]
        try:  # ops whose output size follows from input values
            if node.op_type == "ConstantOfShape":
                return _numel(c[0]) <= _FOLD_LIMIT
            if node.op_type == "Range":
                return abs(float(c[1]) - float(c[0])) / max(abs(float(c[2])), 1e-12) <= _FOLD_LIMIT
            if node.op_type == "Expand":
                return _numel(np.broadcast_shapes(c[0].shape, tuple(int(s) for s in c[1]))) <= _FOLD_LIMIT
        except Exception:  # noqa: BLE001
            return False
        return False  # unknown output size: wait for the next inference round

    # -- driver -----------------------------------------------------------------------------
    def run(self, sizes: dict[str, tuple[int, ...]]) -> _Facts:
        facts = _Facts(consts=dict(self.small))
        folded: set[int] = set()
        for _ in range(_MAX_ROUNDS):
            self._infer(self._skeleton(sizes, facts, folded), facts)
            new = self._fold(facts, folded)
            if not new or self._missing(facts) is None:
                break
        missing = self._missing(facts)
        if missing is not None:
            i, node, v = missing
            at = ", ".join(f"{k}={list(s)}" for k, s in sizes.items())
            raise CaptureError(f"cannot capture {self.label}: the shape of {v.name!r} ({_node_label(node, i)}) "
                               f"cannot be inferred (inputs {at})")
        return facts


def _node_label(node: ir.Node, index: int) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node #{index}"


def _constant_node(name: str, value: np.ndarray) -> onnx.NodeProto:
    return onnx.helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value, name))


# ---------------------------------------------------------------------------------------------
# what the op rules see
# ---------------------------------------------------------------------------------------------
def _dtype_name(elem: int) -> str:
    try:
        dtype = ir.DataType(elem)
    except ValueError:
        return "undefined"
    try:
        return str(dtype.numpy())  # float32, int64, bool, bfloat16 ...
    except Exception:  # noqa: BLE001 - no numpy equivalent (strings, undefined)
        return dtype.name.lower()


class _Ctx:
    def __init__(self, g: ModelGraph, facts: _Facts, facts_b: _Facts | None, sizes: _Sizes):
        self.g, self.facts, self.facts_b, self.sizes = g, facts, facts_b, sizes
        self.pieces: dict[str, list[str]] = {}  # sequence value -> its tensors

    # -- values -----------------------------------------------------------------------------
    def symbolic(self, name: str, shape: tuple[int, ...]) -> tuple[bool, ...]:
        if name in self.sizes.symbolic:
            return self.sizes.symbolic[name]
        if self.facts_b is None:
            return (False,) * len(shape)
        other = self.facts_b.shape(name)
        if other is None or len(other) != len(shape):
            return (True,) * len(shape)  # cannot tell: treat as dynamic (kept fixed)
        return tuple(a != b for a, b in zip(shape, other))

    def add(self, name: str, kind: str, param: str | None = None) -> Value:
        shape = self.facts.shape(name)
        assert shape is not None, name
        return self.g.add_value(Value(name, shape, _dtype_name(self.facts.elem.get(name, 0)), kind, param,
                                      self.symbolic(name, shape)))

    def value(self, v: ir.Value | None) -> Value | None:
        return self.g.values.get(v.name) if v is not None else None

    # -- arguments --------------------------------------------------------------------------
    def ref(self, v: ir.Value | None) -> Ref | None:
        return Ref(v.name) if v is not None and v.name in self.g.values else None

    def refs(self, v: ir.Value | None) -> list[Ref]:
        """The tensors a value stands for: itself, or the pieces of a sequence."""
        if v is not None and v.name in self.pieces:
            return [Ref(p) for p in self.pieces[v.name]]
        r = self.ref(v)
        return [r] if r is not None else []

    def shape(self, v: ir.Value | None) -> tuple[int, ...]:
        return self.g.values[v.name].shape if v is not None and v.name in self.g.values else ()

    def const(self, v: ir.Value | None) -> np.ndarray | None:
        return self.facts.consts.get(v.name) if v is not None else None

    def scalar(self, v: ir.Value | None) -> int | None:
        arr = self.const(v)
        if arr is None or arr.size != 1:
            return None
        x = int(arr.reshape(-1)[0])
        return SymSize(x) if v.name in self.facts.derived else x

    def entries(self, v: ir.Value | None) -> list[int] | None:
        """A 1-D integer constant as a list: literal entries int, run-time (shape-derived) SymSize."""
        arr = self.const(v)
        if arr is None or arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
            return None
        vals = [int(x) for x in arr.reshape(-1)]
        if v.name not in self.facts.derived:
            return vals
        prod = v.producer()
        if prod is not None and prod.op_type == "Concat":
            parts = [self.entries(p) for p in prod.inputs]
            if all(p is not None for p in parts) and sum(len(p) for p in parts) == len(vals):
                return [x for p in parts for x in p]
        return [SymSize(x) for x in vals]


def _in(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _positional(c: _Ctx, node: ir.Node) -> dict[str, Any]:
    """Tensor inputs as input, other, arg2, arg3 ... (sequences expanded to their pieces)."""
    refs = [r for v in node.inputs for r in c.refs(v)]
    names = ["input", "other"] + [f"arg{i}" for i in range(2, len(refs))]
    return dict(zip(names, refs))


# ---------------------------------------------------------------------------------------------
# op rules: ONNX node -> (canonical op, canonical args[, outputs]); None: no op
# ---------------------------------------------------------------------------------------------
Rule = Callable[[_Ctx, ir.Node], Any]


def _gemm(c: _Ctx, n: ir.Node):
    a, b, bias = (_in(n, i) for i in range(3))
    ta, tb = n.attributes.get_int("transA", 0), n.attributes.get_int("transB", 0)
    extra = {k: x for k, x in (("alpha", n.attributes.get_float("alpha", 1.0)),
                               ("beta", n.attributes.get_float("beta", 1.0))) if x != 1.0}
    if ta:  # A^T B: no canonical op reads a transposed input; kept fixed, FLOPs counted below
        return "other", {"input": c.ref(a), "other": c.ref(b), "bias": c.ref(bias),
                         "transA": ta, "transB": tb, **extra}
    if tb:  # A W^T + C, W (out, in) as nn.Linear
        n_out = c.shape(b)[0]
        key = "bias" if c.shape(bias)[-1:] == (n_out,) else "c"  # a broadcast C ties nothing
        return "linear", {"input": c.ref(a), "weight": c.ref(b), key: c.ref(bias), **extra}
    return "addmm", {"self": c.ref(bias), "mat1": c.ref(a), "mat2": c.ref(b), **extra}


def _matmul(c: _Ctx, n: ir.Node):
    return "matmul", {"self": c.ref(_in(n, 0)), "other": c.ref(_in(n, 1))}


def _conv(c: _Ctx, n: ir.Node):
    x, w, b = (_in(n, i) for i in range(3))
    k = len(c.shape(w)) - 2
    pads = list(n.attributes.get_ints("pads", [0] * 2 * k))
    args = {"input": c.ref(x), "weight": c.ref(w), "bias": c.ref(b),
            "stride": list(n.attributes.get_ints("strides", [1] * k)),
            "padding": pads[:k] if pads[:k] == pads[k:] else pads,  # asymmetric: ONNX order (begins, ends)
            "dilation": list(n.attributes.get_ints("dilations", [1] * k)),
            "groups": n.attributes.get_int("group", 1),
            "transposed": n.op_type == "ConvTranspose"}
    if n.op_type == "ConvTranspose":
        args["output_padding"] = list(n.attributes.get_ints("output_padding", [0] * k))
    if n.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        args["auto_pad"] = n.attributes.get_string("auto_pad")
    return "convolution", args


def _gather(c: _Ctx, n: ir.Node):
    data, idx = _in(n, 0), _in(n, 1)
    rank = len(c.shape(data))
    axis = n.attributes.get_int("axis", 0) % max(rank, 1)
    dv = c.value(data)
    if dv is not None and dv.kind == "param" and dv.rank == 2 and axis == 0:
        return "embedding", {"weight": c.ref(data), "indices": c.ref(idx)}
    if c.shape(idx) == ():  # one position along `axis`: the axis is removed
        index = c.scalar(idx)
        return "select", {"input": c.ref(data), "dim": axis, "index": index, "indices": c.ref(idx)}
    return "index", {"input": c.ref(data), "indices": c.ref(idx), "dim": axis}


def _batch_norm(c: _Ctx, n: ir.Node):
    keys = ("input", "weight", "bias", "running_mean", "running_var")
    return "batch_norm", {**{k: c.ref(_in(n, i)) for i, k in enumerate(keys)},
                          "eps": n.attributes.get_float("epsilon", 1e-5),
                          "momentum": n.attributes.get_float("momentum", 0.9)}


def _instance_norm(c: _Ctx, n: ir.Node):
    return "batch_norm", {"input": c.ref(_in(n, 0)), "weight": c.ref(_in(n, 1)), "bias": c.ref(_in(n, 2)),
                          "eps": n.attributes.get_float("epsilon", 1e-5)}


def _normalized_shape(c: _Ctx, n: ir.Node) -> list[int]:
    shape = c.shape(_in(n, 0))
    return list(shape[n.attributes.get_int("axis", -1) % len(shape):]) if shape else []


def _layer_norm(c: _Ctx, n: ir.Node):
    return "layer_norm", {"input": c.ref(_in(n, 0)), "normalized_shape": _normalized_shape(c, n),
                          "weight": c.ref(_in(n, 1)), "bias": c.ref(_in(n, 2)),
                          "eps": n.attributes.get_float("epsilon", 1e-5)}


def _rms_norm(c: _Ctx, n: ir.Node):
    return "rms_norm", {"input": c.ref(_in(n, 0)), "normalized_shape": _normalized_shape(c, n),
                        "weight": c.ref(_in(n, 1)), "eps": n.attributes.get_float("epsilon", 1e-5)}


def _group_norm(c: _Ctx, n: ir.Node):
    x, scale, bias = (_in(n, i) for i in range(3))
    args = {"input": c.ref(x), "num_groups": n.attributes.get_int("num_groups", 1),
            "eps": n.attributes.get_float("epsilon", 1e-5)}
    if c.shape(scale) == c.shape(x)[1:2]:  # opset 21: per channel
        return "group_norm", {**args, "weight": c.ref(scale), "bias": c.ref(bias)}
    return "group_norm", {**args, "group_scale": c.ref(scale), "group_bias": c.ref(bias)}  # opset 18: per group


def _reshape(c: _Ctx, n: ir.Node):
    args = {"input": c.ref(_in(n, 0)), "shape": c.ref(_in(n, 1))}
    size = c.entries(_in(n, 1))
    return "reshape", args if size is None else {**args, "size": size}


def _view(c: _Ctx, n: ir.Node):
    return "reshape", {"input": c.ref(_in(n, 0)), "axes": c.ref(_in(n, 1))}


def _transpose(c: _Ctx, n: ir.Node):
    rank = len(c.shape(_in(n, 0)))
    perm = n.attributes.get_ints("perm", list(range(rank))[::-1])
    return "permute", {"input": c.ref(_in(n, 0)), "dims": [int(p) % rank for p in perm]}


def _identity(c: _Ctx, n: ir.Node):
    return "permute", {"input": c.ref(_in(n, 0)), "dims": list(range(len(c.shape(_in(n, 0)))))}


def _concat(c: _Ctx, n: ir.Node):
    return "cat", {"tensors": [r for v in n.inputs for r in c.refs(v)], "dim": n.attributes.get_int("axis", 0)}


def _split(c: _Ctx, n: ir.Node):
    x, split = _in(n, 0), _in(n, 1)
    args = {"input": c.ref(x), "dim": n.attributes.get_int("axis", 0) % len(c.shape(x))}
    sizes = c.entries(split) if split is not None else n.attributes.get_ints("split", None)
    if sizes is not None:
        args["split_sizes"] = list(sizes)
    if split is not None:
        args["split"] = c.ref(split)
    return "split", args


def _split_to_sequence(c: _Ctx, n: ir.Node):
    x, split, seq = _in(n, 0), _in(n, 1), n.outputs[0]
    shape, xv = c.shape(x), c.value(x)
    d = n.attributes.get_int("axis", 0) % len(shape)
    sp = c.const(split)
    if split is not None and sp is None:
        return "other", _positional(c, n)
    keep = True
    if sp is None:  # pieces of size 1, the axis dropped unless keepdims
        sizes, keep = [1] * shape[d], bool(n.attributes.get_int("keepdims", 1))
    elif sp.ndim == 0:  # equal pieces, a shorter last one
        s = int(sp)
        sizes = [s] * (shape[d] // s) + ([shape[d] % s] if shape[d] % s else [])
    else:
        sizes = [int(s) for s in sp]
    pieces = []
    for i, s in enumerate(sizes):
        name = f"{seq.name}.{i}"
        pshape = shape[:d] + ((s,) if keep else ()) + shape[d + 1:]
        flags = xv.symbolic[:d] + (xv.symbolic[d:d + 1] if keep else ()) + xv.symbolic[d + 1:]
        c.g.add_value(Value(name, pshape, xv.dtype, "activation", None, flags))
        pieces.append(name)
    c.pieces[seq.name] = pieces
    args: dict[str, Any] = {"input": c.ref(x), "dim": d}
    if sp is not None and sp.ndim == 0:
        args["split_size"] = c.scalar(split)
    elif sp is not None:
        args["split_sizes"] = c.entries(split)
    if split is not None:
        args["split"] = c.ref(split)
    return "split", args, pieces


def _sequence_at(c: _Ctx, n: ir.Node):
    pieces, pos = c.pieces.get(n.inputs[0].name), c.scalar(_in(n, 1))
    if pieces is None or pos is None or not -len(pieces) <= pos < len(pieces):
        return "other", _positional(c, n)
    return "alias", {"input": Ref(pieces[pos]), "position": c.ref(_in(n, 1))}


def _sequence_construct(c: _Ctx, n: ir.Node):
    c.pieces[n.outputs[0].name] = [str(r) for v in n.inputs for r in c.refs(v)]
    return None


def _concat_from_sequence(c: _Ctx, n: ir.Node):
    if n.inputs[0].name not in c.pieces or n.attributes.get_int("new_axis", 0):
        return "other", _positional(c, n)  # stacking adds an axis: kept fixed
    return "cat", {"tensors": c.refs(n.inputs[0]), "dim": n.attributes.get_int("axis", 0)}


def _slice_bounds(c: _Ctx, n: ir.Node):
    """(starts, ends, axes, steps) as int lists, None where not constant."""
    if len(n.inputs) == 1:  # opset < 10: attributes
        starts, ends = n.attributes.get_ints("starts", None), n.attributes.get_ints("ends", None)
        axes, steps = n.attributes.get_ints("axes", None), None
    else:
        starts, ends = c.entries(_in(n, 1)), c.entries(_in(n, 2))
        axes = c.entries(_in(n, 3)) if _in(n, 3) is not None else None
        steps = c.entries(_in(n, 4)) if _in(n, 4) is not None else None
        if (_in(n, 3) is not None and axes is None) or (_in(n, 4) is not None and steps is None):
            return None
    if starts is None or ends is None:
        return None
    axes = list(axes) if axes is not None else list(range(len(starts)))
    return list(starts), list(ends), axes, list(steps) if steps is not None else [1] * len(starts)


def _clamp(i: int, n: int) -> int:
    return min(max(i + n if i < 0 else i, 0), n)


def _slice(c: _Ctx, n: ir.Node):
    x = _in(n, 0)
    shape = c.shape(x)
    tensors = {k: c.ref(_in(n, i)) for i, k in enumerate(("starts", "ends", "axes", "steps"), 1) if _in(n, i)}
    bounds = _slice_bounds(c, n)
    if bounds is None:
        return "index", {"input": c.ref(x), **tensors}
    cuts = []
    for start, end, axis, step in zip(*bounds):
        d = axis % len(shape)
        if step > 0:  # ONNX clamps positive-step bounds to [0, size]
            start = type(start)(_clamp(start, shape[d]))
            end = type(end)(_clamp(end, shape[d]))
        if not (step == 1 and start == 0 and end >= shape[d]):
            cuts.append((d, start, end, step))
    if len(cuts) > 1:  # several axes cut: no canonical op
        return "index", {"input": c.ref(x), **tensors}
    d, start, end, step = cuts[0] if cuts else (bounds[2][0] % len(shape) if bounds[2] else 0, 0, None, 1)
    end = shape[d] if end is None else end
    return "slice", {"input": c.ref(x), "dim": d, "start": start, "end": end, "step": step, **tensors}


def _expand(c: _Ctx, n: ir.Node):
    x, s, y = _in(n, 0), _in(n, 1), n.outputs[0]
    args = {"input": c.ref(x), "shape": c.ref(s)}
    vals = c.entries(s)
    if vals is None:
        return "expand", args
    ry, sx = len(c.shape(y)), c.shape(x)
    size = []
    for i in range(ry):  # ONNX broadcasts `shape` right-aligned; torch spells kept sizes -1
        v = vals[i - ry + len(vals)] if i >= ry - len(vals) else None
        xi = sx[i - ry + len(sx)] if i >= ry - len(sx) else None
        size.append(-1 if v is None or (v == 1 and xi is not None) else v)
    return "expand", {**args, "size": size}


def _reduce(c: _Ctx, n: ir.Node):
    x, axes_in = _in(n, 0), _in(n, 1)
    axes = n.attributes.get_ints("axes", None)
    if axes is None and axes_in is not None:
        axes = c.entries(axes_in)
        if axes is None:  # axes computed at run time
            return "other", _positional(c, n)
    if not axes and n.attributes.get_int("noop_with_empty_axes", 0):
        return "elementwise", {"input": c.ref(x)}
    return "reduction", {"input": c.ref(x), "dim": list(axes) if axes else None,
                         "keepdim": bool(n.attributes.get_int("keepdims", 1)), "axes": c.ref(axes_in)}


def _pool(c: _Ctx, n: ir.Node):
    args = {"input": c.ref(_in(n, 0))}
    if n.op_type.startswith("Global"):
        return "pool", args
    return "pool", {**args, "kernel_size": list(n.attributes.get_ints("kernel_shape", [])),
                    "stride": list(n.attributes.get_ints("strides", [])),
                    "padding": list(n.attributes.get_ints("pads", []))}


def _attention(c: _Ctx, n: ir.Node):
    args = {"query": c.ref(_in(n, 0)), "key": c.ref(_in(n, 1)), "value": c.ref(_in(n, 2)),
            "attn_mask": c.ref(_in(n, 3)), "scale": n.attributes.get_float("scale", None),
            "is_causal": bool(n.attributes.get_int("is_causal", 0))}
    cache = any(_in(n, i) is not None for i in (4, 5)) or any(_is_used(v) for v in n.outputs[1:])
    if cache:  # past/present key-value or score outputs: kept fixed
        return "other", {**args, **{f"arg{i}": c.ref(_in(n, i)) for i in range(4, len(n.inputs))}}
    return "scaled_dot_product_attention", args


def _cast_like(c: _Ctx, n: ir.Node):
    return "elementwise", {"input": c.ref(_in(n, 0)), "like": n.inputs[1].name}


def _elementwise(c: _Ctx, n: ir.Node):
    return "elementwise", _positional(c, n)


def _shape_of(c: _Ctx, n: ir.Node):
    return "const", {"of": n.inputs[0].name}


def _const(c: _Ctx, n: ir.Node):
    args = _positional(c, n)
    value = c.const(n.outputs[0])
    return "const", args if value is None else {**args, "value": value}


def _index(c: _Ctx, n: ir.Node):
    return "index", _positional(c, n)


def _other(c: _Ctx, n: ir.Node):
    return "other", _positional(c, n)


_ELEMENTWISE = (
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Relu", "LeakyRelu",
    "PRelu", "Elu", "Selu", "Celu", "Gelu", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Softplus",
    "Softsign", "Mish", "Swish", "ThresholdedRelu", "Shrink", "Erf", "Sqrt", "Reciprocal", "Exp", "Log",
    "Neg", "Abs", "Sign", "Floor", "Ceil", "Round", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh",
    "Cosh", "Asinh", "Acosh", "Atanh", "Clip", "Softmax", "LogSoftmax", "Hardmax", "Cast", "Dropout",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN",
    "IsInf", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "BitShift", "Trilu",
    "RandomNormalLike", "RandomUniformLike", "Bernoulli", "MeanVarianceNormalization", "LpNormalization")
_REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
_POOLS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "AveragePool", "MaxPool", "LpPool")
_INDEXING = ("GatherElements", "GatherND", "ScatterElements", "ScatterND", "Scatter", "NonZero", "TopK",
             "ArgMax", "ArgMin", "CumSum", "OneHot", "Compress", "Unique", "ReverseSequence")

# The mapping, one entry per group of ONNX ops (default domain). Anything else -> "other".
OPS: list[tuple[tuple[str, ...], Rule]] = [
    (("Gemm",), _gemm),  # transB=1: linear(input, weight, bias); else addmm(self=bias, mat1, mat2); transA: other
    (("MatMul",), _matmul),  # matmul(self, other); a Transpose'd weight is found through the permute
    (("Conv", "ConvTranspose"), _conv),  # convolution(input, weight, bias, stride, padding, dilation, groups, ...)
    (("Gather",), _gather),  # 2-D float initializer on axis 0: embedding(weight, indices); scalar: select; else index
    (("BatchNormalization",), _batch_norm),  # batch_norm(input, weight, bias, running_mean, running_var)
    (("InstanceNormalization",), _instance_norm),  # batch_norm without running statistics: a per-channel affine
    (("LayerNormalization",), _layer_norm),  # layer_norm(input, normalized_shape = input.shape[axis:], weight, bias)
    (("RMSNormalization", "SimplifiedLayerNormalization"), _rms_norm),  # rms_norm(input, normalized_shape, weight)
    (("GroupNormalization",), _group_norm),  # group_norm(input, weight, bias, num_groups)
    (("Reshape",), _reshape),  # reshape(input, size = the folded shape, 0 and -1 kept; run-time entries SymSize)
    (("Flatten", "Squeeze", "Unsqueeze"), _view),  # reshape(input): dims matches the axes by their sizes
    (("Transpose",), _transpose),  # permute(input, dims = perm)
    (("Identity",), _identity),  # permute(input, identity dims): a view layers see weights through
    (("Concat",), _concat),  # cat(tensors, dim = axis)
    (("Split",), _split),  # split(input, dim, split_sizes if given), one output per piece
    (("SplitToSequence",), _split_to_sequence),  # split into tensors "<sequence>.<i>", like torch's split outputs
    (("SequenceAt",), _sequence_at),  # alias of the piece at a constant position
    (("SequenceConstruct",), _sequence_construct),  # no op: remembers the tensors of the sequence
    (("ConcatFromSequence",), _concat_from_sequence),  # cat(tensors = the pieces, dim); stacking: other
    (("Slice",), _slice),  # one axis cut with constant bounds: slice(input, dim, start, end, step); else index
    (("Expand",), _expand),  # expand(input, size): right-aligned to the output, -1 where the input's size is kept
    (_REDUCTIONS, _reduce),  # reduction(input, dim = axes, keepdim); run-time axes: other
    (_POOLS, _pool),  # pool(input, kernel_size, stride, padding): spatial axes fixed
    (("Attention",), _attention),  # scaled_dot_product_attention(query, key, value, attn_mask, scale); KV cache: other
    (("CastLike",), _cast_like),  # elementwise(input); the second input is read for its dtype only
    (_ELEMENTWISE, _elementwise),  # elementwise: right-aligned broadcasting of every input
    (("Shape", "Size"), _shape_of),  # const: reads only the shape of `of`, not its data
    (("Constant", "ConstantOfShape", "Range", "EyeLike", "RandomNormal", "RandomUniform"), _const),  # const
    (_INDEXING, _index),  # index: data-dependent selection, every axis kept fixed
]
# ONNX Runtime contrib ops that are plain activations
CONTRIB_OPS: list[tuple[tuple[str, ...], Rule]] = [
    (("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd"), _elementwise),  # com.microsoft activations
]
ONNX_RULES: dict[tuple[str, str], Rule] = {  # (domain, op_type) -> rule
    **{(d, op): rule for names, rule in OPS for op in names for d in _DEFAULT_DOMAINS},
    **{("com.microsoft", op): rule for names, rule in CONTRIB_OPS for op in names},
}


# ---------------------------------------------------------------------------------------------
# FLOPs of ops without a canonical formula (as torch's FlopCounterMode counts their decomposition)
# ---------------------------------------------------------------------------------------------
def _gemm_flops(c: _Ctx, n: ir.Node) -> int:
    a, b = c.shape(_in(n, 0)), c.shape(_in(n, 1))
    m, k = (a[1], a[0]) if n.attributes.get_int("transA", 0) else a
    cols = b[0] if n.attributes.get_int("transB", 0) else b[1]
    return 2 * m * k * cols


def _einsum_flops(c: _Ctx, n: ir.Node) -> int:
    """Two operands without ellipsis: 2 x the product of all index sizes, if one is summed over."""
    eq = n.attributes.get_string("equation", "").replace(" ", "")
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if "..." in eq or len(terms) != 2 or len(n.inputs) != 2:
        return 0
    sizes: dict[str, int] = {}
    for term, v in zip(terms, n.inputs):
        for ch, s in zip(term, c.shape(v)):
            sizes[ch] = max(sizes.get(ch, 1), s)
    summed = set(sizes) - set(out)
    return 2 * _numel(sizes.values()) if summed else 0


OTHER_FLOPS: dict[str, Callable[[_Ctx, ir.Node], int]] = {"Gemm": _gemm_flops, "Einsum": _einsum_flops}


# ---------------------------------------------------------------------------------------------
# building the ModelGraph
# ---------------------------------------------------------------------------------------------
def _initializer_kind(v: ir.Value) -> str:
    t = v.const_value
    dtype = t.dtype if t is not None else v.dtype
    if dtype is None or not dtype.is_floating_point() or (t is not None and _numel(t.shape) <= 1):
        return "const"
    uses = v.uses()
    if uses and all(u.node.op_type == "BatchNormalization" and u.idx in (3, 4) for u in uses):
        return "buffer"  # running statistics
    return "param"


def _module_of(node: ir.Node) -> tuple[str, str]:
    """Owning module and its class: from the dynamo exporter's metadata, else from a TorchScript
    exporter node name such as "/layers/layers.0/layers.0.0/conv1/Conv" ("" otherwise)."""
    meta = node.metadata_props
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
        except (ValueError, SyntaxError):
            return "", ""
        module = scopes[-2] if len(scopes) >= 2 else ""  # the last scope is the op itself
        return module, classes[-2].rsplit(".", 1)[-1] if len(classes) >= 2 else ""
    if not (node.name or "").startswith("/"):
        return "", ""
    module, prev = "", ""
    for seg in node.name.split("/")[1:-1]:  # a container's children repeat its name: layers/layers.0
        child = seg[len(prev) + 1:] if prev and seg.startswith(prev + ".") else seg
        module, prev = f"{module}.{child}" if module else child, seg
    return module, ""


def _flatten(args: Iterable[Any]) -> Iterable[Any]:
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flatten(a)
        else:
            yield a


def _add_values(c: _Ctx, model: ir.Model) -> None:
    for v in _user_inputs(model):
        c.add(v.name, "input")
        c.g.inputs.append(v.name)
    for name, v in model.graph.initializers.items():
        if _is_used(v):
            kind = _initializer_kind(v)
            c.add(name, kind, name if kind in ("param", "buffer") else None)


def _add_op(c: _Ctx, node: ir.Node, index: int) -> None:
    for v in node.outputs:  # `_Inference.run` guarantees the shape of every used tensor
        if v.name and v.name not in c.facts.sequences and c.facts.shape(v.name) is not None:
            c.add(v.name, "const" if node.op_type == "Constant" else "activation")
    rule = ONNX_RULES.get((node.domain, node.op_type), _other)
    mapped = rule(c, node)
    if mapped is None:
        return
    canon, args, *rest = mapped
    outputs = rest[0] if rest else [v.name for v in node.outputs if v.name in c.g.values]
    if not outputs and canon not in ("const", "index", "other"):
        canon = "other"  # nothing to tie the inputs to
    name = node.name or f"{node.op_type}_{index}"
    if name in c.g.ops:
        name = f"{name}_{index}"
    module, mtype = _module_of(node)
    inputs = [str(a) for a in _flatten(args.values()) if isinstance(a, Ref)]
    op = Op(name, canon, inputs, outputs, args, target=node.op_type, module=module, module_type=mtype,
            source=node)
    if canon in ("other", "index"):
        flops = OTHER_FLOPS.get(node.op_type)
        op.flops = flops(c, node) if flops is not None else 0
    c.g.add_op(op)


def _first_inference(inference: _Inference, model: ir.Model, given: dict[str, Any],
                     label: str) -> tuple[_Sizes, _Facts]:
    """Infer at the default sizes; if that fails and a default was used, at the larger default."""
    first: CaptureError | None = None
    for default in _DEFAULT_SIZES:
        sizes = _input_sizes(model, given, default, label)
        try:
            return sizes, inference.run(sizes.shapes)
        except CaptureError as e:
            first = first or e
            if not sizes.uses_default:
                break
    raise first


def _model_name(src: Any, model: ir.Model) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.path.splitext(os.path.basename(os.fspath(src)))[0]
    return model.graph.name or "model"


def capture_onnx(path_or_model: Any, name: str | None = None,
                 input_shapes: dict[str, Any] | None = None) -> ModelGraph:
    """Capture an ONNX model (path, `onnx.ModelProto` or `onnx_ir.Model`) into a `ModelGraph`.

    `input_shapes` maps input names to shapes for the symbolic dimensions (other symbolic
    sizes default to 2 on axis 0 and 16 elsewhere); FLOPs are counted at these sizes.

    >>> from onnx import helper, TensorProto
    >>> w = helper.make_tensor("fc.weight", TensorProto.FLOAT, [4, 8], [0.0] * 32)
    >>> gemm = helper.make_node("Gemm", ["x", "fc.weight"], ["y"], transB=1)
    >>> graph = helper.make_graph([gemm], "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
    ...                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    >>> g = capture_onnx(helper.make_model(graph), input_shapes={"x": (3, 8)})
    >>> [(op.op, g.shape(op.outputs[0])) for op in g]
    [('linear', (3, 4))]
    """
    model, label = _load(path_or_model)
    _check_structure(model, label)
    model = _prepare(model, owned=not isinstance(path_or_model, ir.Model))
    inference = _Inference(model, label)
    sizes, facts = _first_inference(inference, model, input_shapes or {}, label)
    facts_b = None
    if sizes.doubled is not None:
        try:
            facts_b = inference.run(sizes.doubled)
        except CaptureError:
            facts_b = None  # only the input axes are known to be symbolic
    g = ModelGraph("onnx", source=model, name=name or _model_name(path_or_model, model))
    c = _Ctx(g, facts, facts_b, sizes)
    _add_values(c, model)
    for i, node in enumerate(model.graph):
        _add_op(c, node, i)
    g.outputs = [v.name for v in model.graph.outputs if v.name in g.values]
    return g


def constant_value(g: ModelGraph, value: str) -> np.ndarray | None:
    """The numpy value of an initializer or Constant output of an ONNX ModelGraph, else None."""
    init = g.source.graph.initializers.get(value)
    if init is not None and init.const_value is not None:
        return init.const_value.numpy()
    op = g.producer(value)
    if op is not None and op.target == "Constant" and isinstance(op.source, ir.Node):
        tensor = ir.convenience.get_const_tensor(op.source.outputs[0])
        return tensor.numpy() if tensor is not None else None
    return None
