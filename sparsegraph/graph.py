"""ModelGraph: the framework-neutral view of a captured model.

One node per op, in a small canonical vocabulary (aten-style names with aten's argument names),
tensor values with concrete shapes, parameter references and a back-pointer to the framework
node. The PyTorch frontend (`capture.py`) and the ONNX frontend (`onnx/capture.py`) both build
this; every analysis (dimension groups, FLOPs, roles) and the planner run on it once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx


class SparsegraphError(Exception):
    """One clear message naming what is wrong and where."""


class CaptureError(SparsegraphError):
    pass


class Ref(str):
    """A tensor argument of an op: the name of a value in the graph."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"%{str(self)}"


@dataclass
class Value:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = "activation"  # input | param | buffer | const | activation
    param: str | None = None  # fully-qualified name of the parameter/buffer/initializer
    symbolic: tuple[bool, ...] = ()  # per axis: size depends on a dynamic input dimension

    @property
    def is_float(self) -> bool:
        return "float" in self.dtype or "bfloat" in self.dtype

    @property
    def rank(self) -> int:
        return len(self.shape)


# op name -> coarse kind, for display and role analysis
KINDS = {
    "linear": "linear", "addmm": "linear", "mm": "matmul", "bmm": "matmul", "matmul": "matmul",
    "convolution": "conv", "embedding": "embedding",
    "batch_norm": "norm", "layer_norm": "norm", "group_norm": "norm", "rms_norm": "norm",
    "reshape": "reshape", "permute": "permute", "transpose": "permute",
    "cat": "concat", "split": "split", "getitem": "split",
    "scaled_dot_product_attention": "attention", "reduction": "reduction",
    "elementwise": "elementwise", "unary": "elementwise", "expand": "reshape", "slice": "split",
    "baddbmm": "matmul", "grouped_mm": "matmul", "repeat": "reshape",
}


@dataclass
class Op:
    name: str
    op: str  # canonical op name, see dims.RULES
    inputs: list[str]  # tensor values read
    outputs: list[str]  # tensor values written
    args: dict[str, Any] = field(default_factory=dict)  # canonical args; tensors as Ref
    target: str = ""  # the framework's own op name, e.g. "aten.linear.default" or "MatMul"
    module: str = ""  # fqn of the module that owns this op ("" for the root)
    module_type: str = ""
    source: Any = None  # back-pointer: torch.fx.Node or onnx_ir.Node
    flops: int | None = None  # FLOPs measured by the frontend for ops without a canonical formula

    @property
    def kind(self) -> str:
        return KINDS.get(self.op, "other")

    def ref(self, key: str) -> str | None:
        v = self.args.get(key)
        return str(v) if isinstance(v, Ref) else None


@dataclass
class Layer:
    """A weight-bearing op: what sparsity, SμPar and lowering act on."""

    name: str  # display name: owning module fqn, or the op name
    op: str  # the Op's name
    kind: str  # linear | conv | embedding | norm
    weight: str  # parameter fqn
    bias: str | None
    out_axis: int  # weight axis of output features (neurons)
    in_axes: tuple[int, ...]  # weight axes summed over per output (fan-in)
    role: str = "hidden"  # stem | hidden | head | embedding | norm | router
    batch_axes: tuple[int, ...] = ()  # weight axes of independent matrices (the experts of an MoE layer)


class ModelGraph:
    """A DAG of `Op`s over named `Value`s, backed by a networkx.DiGraph of op names."""

    def __init__(self, frontend: str, source: Any = None, name: str = "model"):
        self.frontend = frontend  # "torch" | "onnx"
        self.source = source  # the fx.GraphModule or onnx_ir.Model
        self.name = name
        self.values: dict[str, Value] = {}
        self.ops: dict[str, Op] = {}  # in topological order
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.params: dict[str, str] = {}  # parameter fqn -> value name
        self.unknown: list[Op] = []  # ops the dims analysis has no rule for (filled by dims)
        self.nx = nx.DiGraph()
        self._producer: dict[str, str] = {}
        self._consumers: dict[str, list[str]] = {}

    # -- building ---------------------------------------------------------------------------
    def add_value(self, value: Value) -> Value:
        if not value.symbolic:
            value.symbolic = (False,) * len(value.shape)
        self.values[value.name] = value
        if value.param is not None:
            self.params[value.param] = value.name
        return value

    def add_op(self, op: Op) -> Op:
        self.ops[op.name] = op
        self.nx.add_node(op.name)
        for v in op.inputs:
            self._consumers.setdefault(v, []).append(op.name)
            if v in self._producer:
                self.nx.add_edge(self._producer[v], op.name, value=v)
        for v in op.outputs:
            self._producer[v] = op.name
        return op

    # -- queries ----------------------------------------------------------------------------
    def producer(self, value: str) -> Op | None:
        name = self._producer.get(value)
        return self.ops[name] if name else None

    def consumers(self, value: str) -> list[Op]:
        return [self.ops[n] for n in self._consumers.get(value, [])]

    def shape(self, value: str) -> tuple[int, ...]:
        return self.values[value].shape

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops.values())

    def __len__(self) -> int:
        return len(self.ops)

    def tensor(self, fqn: str | None):
        """The framework tensor of a parameter or buffer (torch frontend), or None."""
        if fqn is None or self.frontend != "torch" or self.source is None:
            return None
        obj = self.source
        try:
            for part in fqn.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj

    def param_value(self, value: str) -> Value | None:
        """The parameter a value reads, looking through view-like ops (HF Conv1D's `t`, ONNX Transpose)."""
        seen = 0
        while value in self.values and seen < 8:
            v = self.values[value]
            if v.kind in ("param", "buffer"):
                return v
            prod = self.producer(value)
            if prod is None or prod.op not in ("permute", "transpose", "unary", "mask_mul") or not prod.inputs:
                return None
            value = prod.inputs[0]
            seen += 1
        return None

    def __repr__(self) -> str:
        return (f"ModelGraph({self.name!r}, frontend={self.frontend}, ops={len(self.ops)}, "
                f"params={len(self.params)})")
