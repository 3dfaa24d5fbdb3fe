"""`sg.onnx`: Sparse-IFT rewrites, folding and ONNX Runtime lowering of ONNX models.

    sg.onnx.sparsify(path_or_model, transform, sparsity, mask, seed)   rewrite an ONNX graph directly
    sg.onnx.fold(path_or_model)                 BN into Conv, parallel branches and U.V products into one layer
    sg.onnx.lower(path_or_model, target)        "ort-block" | "ort-sparse" | "ort-native" (after folding)
    sg.onnx.save(model, path) / sg.onnx.load(path)   sparse weights stored sparse where that shrinks the file
    sg.onnx.read_plan(path_or_model)            the SparsityPlan from metadata_props
    sg.onnx.Session(path_or_model)              ONNX Runtime, feeding ort-sparse weights, with the ort-native op

Every function takes a path, an `onnx.ModelProto` or an `onnx_ir.Model` and returns a new
`onnx_ir.Model` (the input is never modified); `output=` writes the result atomically (a
temporary file renamed into place after `onnx.checker.check_model(full_check=True)` passed), with
sparse weights as `Constant(sparse_value)` nodes, or as dense initializers with
`sparse_initializers=False` for runtimes that read no sparse tensors.

>>> import sparsegraph as sg, numpy as np
>>> from onnx import helper, numpy_helper
>>> w = lambda n, s: numpy_helper.from_array(np.random.default_rng(0).standard_normal(s).astype(np.float32), n)
>>> nodes = [helper.make_node("Gemm", ["x", "fc1.weight"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
...          helper.make_node("Gemm", ["r", "fc2.weight"], ["a"], transB=1), helper.make_node("Relu", ["a"], ["b"]),
...          helper.make_node("Gemm", ["b", "fc3.weight"], ["y"], transB=1)]
>>> graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", 1, [4, 8])],
...     [helper.make_tensor_value_info("y", 1, [4, 8])], [w("fc1.weight", (32, 8)), w("fc2.weight", (32, 32)),
...     w("fc3.weight", (8, 32))])
>>> m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
>>> wide = sg.onnx.sparsify(m, "sparse_wide", sparsity=0.75)
>>> wide.graph.initializers["fc2.weight"].const_value.shape
Shape([64, 64])
>>> sg.onnx.read_plan(wide).transform
'sparse_wide'
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir

from .capture import (capture_onnx, check_external_data, densify_sparse_initializers, has_sparse_tensors,
                           sparse_to_dense)
from ..graph import CaptureError, SparsegraphError
from ..fsutil import atomic_write
from .rewrite import (LOWERING_KEY, PLAN_KEY, ApplyPlanPass, OnnxPassError, check_opset,
                                  check_weights)
from ..passes.sparse_ift import Options, make_plan
from ..plan import SparsityPlan

__all__ = ["sparsify", "fold", "lower", "save", "load", "to_proto", "read_plan", "read_lowering", "Session",
           "TARGETS", "OnnxPassError"]

TARGETS = ("fold", "ort-block", "ort-sparse", "ort-native")
_SPARSE_MIN_ELEMENTS = 64  # smaller initializers are always stored dense


# ---------------------------------------------------------------------------------------------
# reading and writing
# ---------------------------------------------------------------------------------------------
def _read_proto(src: Any) -> tuple[onnx.ModelProto, str]:
    """A ModelProto (sparse initializers intact) and a label for messages."""
    if isinstance(src, onnx.ModelProto):
        return src, f"ONNX model {src.graph.name or '<unnamed>'}"
    if isinstance(src, ir.Model):
        return ir.serde.serialize_model(src), f"ONNX model {src.graph.name or '<unnamed>'}"
    if not isinstance(src, (str, os.PathLike)):
        raise SparsegraphError(f"expected a path to an .onnx file, an onnx.ModelProto or an onnx_ir.Model, "
                               f"got {type(src).__name__}")
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise SparsegraphError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - DecodeError, OSError ...
        raise SparsegraphError(f"cannot read ONNX file {path}: not a valid ONNX model (truncated or corrupt? "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    check_external_data(proto, path)
    onnx.load_external_data_for_model(proto, os.path.dirname(os.path.abspath(path)))
    if not proto.graph.output:
        raise SparsegraphError(f"cannot read ONNX file {path}: the graph has no outputs "
                               "(empty, truncated or corrupt file?)")
    return proto, path


def load(path_or_model: Any) -> ir.Model:
    """An onnx_ir model; sparse initializers are stored dense in it (onnx_ir keeps only dense ones)."""
    if isinstance(path_or_model, ir.Model):
        return path_or_model
    proto, _ = _read_proto(path_or_model)
    if has_sparse_tensors(proto):  # a proto read from a file is ours to change
        proto = densify_sparse_initializers(proto, inplace=isinstance(path_or_model, (str, os.PathLike)))
    return ir.serde.deserialize_model(proto)


def _sparse_inputs(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.input if i.type.HasField("sparse_tensor_type")}


def _sparse_tensor(t: onnx.TensorProto) -> onnx.SparseTensorProto:
    """COO with linearised int64 indices (ascending), as ONNX specifies."""
    arr = onnx.numpy_helper.to_array(t)
    flat = arr.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    values = onnx.numpy_helper.from_array(flat[idx], t.name)
    return onnx.helper.make_sparse_tensor(values, onnx.numpy_helper.from_array(idx, t.name + ".indices"),
                                          list(arr.shape))


def to_proto(model: ir.Model, sparse_initializers: bool = True) -> onnx.ModelProto:
    """Serialise. With `sparse_initializers`, every float initializer whose COO form (values +
    int64 linear indices) is smaller becomes a `Constant` node with a `sparse_value`: ONNX's
    standard form of a sparse constant, typed as a dense tensor, so the file passes the full
    checker (a `sparse_initializer` read by a standard op does not) and ONNX Runtime densifies it
    at load. The default values of sparse-tensor inputs (ort-sparse weights) are always sparse
    initializers."""
    sparse = set()
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if t is None or (v.is_graph_input() and not isinstance(v.type, ir.SparseTensorType)):
            continue  # an overridable dense input's default stays dense
        if isinstance(v.type, ir.SparseTensorType):
            sparse.add(name)  # an ort-sparse weight: always sparse
            continue
        if not sparse_initializers or not t.dtype.is_floating_point() or t.size < _SPARSE_MIN_ELEMENTS:
            continue
        if isinstance(t, ir.ExternalTensor):
            continue
        nnz = int(np.count_nonzero(t.numpy()))
        if nnz * (t.dtype.itemsize + 8) < t.size * t.dtype.itemsize:  # values + int64 linear indices vs dense
            sparse.add(name)
    proto = ir.serde.serialize_model(model)
    sparse_in = _sparse_inputs(proto.graph)
    dims = {t.name: list(t.dims) for t in proto.graph.initializer if t.name in sparse_in}
    for i in proto.graph.input:  # onnx_ir writes sparse-tensor types without their shape
        if i.name in dims and not i.type.sparse_tensor_type.HasField("shape"):
            for d in dims[i.name]:
                i.type.sparse_tensor_type.shape.dim.add().dim_value = d
    if sparse:
        _store_sparse(proto, sparse, sparse_in)
    return proto


def _store_sparse(proto: onnx.ModelProto, sparse: set[str], sparse_in: set[str]) -> None:
    """Move the initializers named in `sparse` out of `proto.graph.initializer`: sparse-tensor
    inputs' defaults to `sparse_initializer`, the others to `Constant(sparse_value)` nodes placed
    before every other node."""
    keep, constants = [], []
    for t in proto.graph.initializer:
        if t.name not in sparse:
            keep.append(t)
        elif t.name in sparse_in:
            proto.graph.sparse_initializer.append(_sparse_tensor(t))
        else:
            constants.append(onnx.helper.make_node("Constant", [], [t.name], name=f"{t.name}.sparse",
                                                   sparse_value=_sparse_tensor(t)))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    nodes = constants + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def save(model: Any, path: str | os.PathLike, *, sparse_initializers: bool = True, check: bool = True) -> str:
    """Write an ONNX model atomically, after `onnx.checker.check_model(full_check=True)` passed.
    `sparse_initializers=False` stores every weight dense (for runtimes that read no sparse tensors)."""
    proto = to_proto(load(model), sparse_initializers) if not isinstance(model, onnx.ModelProto) else model
    path = os.fspath(path)
    try:
        data = proto.SerializeToString()
    except ValueError as e:  # protobuf's 2 GB limit
        raise SparsegraphError(f"cannot write {path}: {e} (models over 2 GB need external data, not supported)")
    if check:
        _check(proto, path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
    return path


def _check(proto: onnx.ModelProto, label: str) -> None:
    """`onnx.checker` with `full_check=True`: the structure, and strict shape and type inference."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError
        raise SparsegraphError(f"{label}: the written model fails onnx.checker: "
                               f"{str(e).strip().splitlines()[0]}") from None


def _metadata(path_or_model: Any) -> dict[str, str]:
    if isinstance(path_or_model, ir.Model):
        return dict(path_or_model.metadata_props)
    proto = path_or_model if isinstance(path_or_model, onnx.ModelProto) else _read_proto(path_or_model)[0]
    return {p.key: p.value for p in proto.metadata_props}


def read_plan(path_or_model: Any) -> SparsityPlan | None:
    """The SparsityPlan stored in an ONNX model's `metadata_props` (None if there is none)."""
    meta = _metadata(path_or_model)
    return SparsityPlan.from_json(meta[PLAN_KEY]) if PLAN_KEY in meta else None


def read_lowering(path_or_model: Any) -> dict:
    """Per-weight lowering choices a lowering pass recorded (`{}` if none)."""
    return json.loads(_metadata(path_or_model).get(LOWERING_KEY, "{}"))


def _label(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    graph = src.graph
    return f"ONNX model {graph.name or '<unnamed>'}"


def _run(p: ir.passes.PassBase, model: ir.Model) -> ir.Model:
    """Run an onnx_ir pass; a SparsegraphError raised inside keeps its own message."""
    try:
        return p(model).model
    except ir.passes.InvariantError as e:
        cause = e.__cause__
        if isinstance(cause, SparsegraphError):
            raise cause from None
        raise SparsegraphError(f"{type(p).__name__}: {e}") from e


def _finish(model: ir.Model, output: str | os.PathLike | None, check: bool,
            sparse_initializers: bool = True) -> ir.Model:
    if output is not None:
        save(model, output, check=check, sparse_initializers=sparse_initializers)
    elif check:  # nothing written: the dense form is checked (the sparse one differs only in storage)
        _check(to_proto(model, sparse_initializers=False), _label(model))
    return model


# ---------------------------------------------------------------------------------------------
# rewriting
# ---------------------------------------------------------------------------------------------
def sparsify(path_or_model: Any, transform: str = "sparse_wide", sparsity: float = 0.75, mask: str = "uniform",
             seed: int = 0, *, include_stem: bool = False, include_head: bool = False,
             filter: Callable[[Any, str], bool] | None = None, budget: float | None = None,
             budget_ratio: float | None = None, factorized_bn: bool = False, width: float | None = None,
             init: str = "default", input_shapes: dict | list | None = None, name: str | None = None,
             output: str | os.PathLike | None = None, check: bool = True,
             sparse_initializers: bool = True) -> ir.Model:
    """Rewrite an ONNX model into a Sparse Iso-FLOP Transformation of itself (same planning as
    `sg.sparsify`). Sparse weights are stored multiplied by their masks; the plan is in
    `metadata_props` (`read_plan`). `init="default"` gives every weight PyTorch's default
    initialisation (the same tensors as the PyTorch rewrite with the same seed), `"keep"` keeps
    the weights whose shape does not change. MatMul, Gemm and Conv weights must be initializers.

    >>> import sparsegraph as sg, torch
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=1)
    >>> path = sg.export_onnx(spec.model, spec.example_inputs, "gpt.onnx")
    >>> wide = sg.onnx.sparsify(path, "sparse_wide", 0.75, output="gpt_wide.onnx")
    >>> sg.onnx.read_plan("gpt_wide.onnx").weight("h.0.mlp.c_fc.weight").shape
    [1024, 256]
    """
    g = _capture(path_or_model, name, input_shapes)
    opts = Options(include_stem, include_head, filter, budget, budget_ratio, factorized_bn, width)
    plan = make_plan(g, transform, sparsity, mask, seed, opts)
    out = _run(ApplyPlanPass(plan, g, init), g.source)
    return _finish(out, output, check, sparse_initializers)


def _capture(path_or_model: Any, name: str | None, input_shapes: Any):
    """Load, check the opset, capture (concrete shapes) and check that Conv weights are initializers."""
    model = load(path_or_model)
    label = name or (os.path.splitext(os.path.basename(os.fspath(path_or_model)))[0]
                     if isinstance(path_or_model, (str, os.PathLike)) else None)
    check_opset(model, _label(path_or_model))
    try:
        g = capture_onnx(model, name=label, input_shapes=input_shapes)
    except CaptureError as e:
        raise SparsegraphError(str(e)) from None
    check_weights(g)
    return g


def rewrite_file(spec, plan_for: Callable[[Any], SparsityPlan], output: str | None,
                 sparse_initializers: bool = True) -> SparsityPlan:
    """`sparsegraph rewrite model.onnx`: capture, plan with `plan_for(graph)`, write `output` if given."""
    if output and not os.fspath(output).endswith(".onnx"):
        raise SparsegraphError(f"{spec.name}: an ONNX model is rewritten to ONNX; give -o a path ending in .onnx")
    g = _capture(spec.model, os.path.splitext(spec.name)[0], list(spec.example_inputs) or None)
    plan = plan_for(g)
    if output:
        _finish(_run(ApplyPlanPass(plan, g), g.source), output, True, sparse_initializers)
    return plan


# ---------------------------------------------------------------------------------------------
# folding and lowering
# ---------------------------------------------------------------------------------------------
def fold(path_or_model: Any, *, output: str | os.PathLike | None = None, check: bool = True,
         sparse_initializers: bool = True) -> ir.Model:
    """Fold what the algebra allows back into single layers (DESIGN.md section 6): BatchNormalization
    into the Conv before it, Sparse Parallel branches into one weight, U.V products (Sparse
    Factorized without a nonlinearity, Sparse Doped S + U.V) into one matrix. Exact up to float
    rounding; the folded layers cost what the dense original did.

    >>> import sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("resnet-mini")
    >>> par = sg.sparsify(spec.model, spec.example_inputs, "sparse_parallel", 0.5)
    >>> path = sg.export_onnx(par, spec.example_inputs, "par.onnx")
    >>> folded = sg.onnx.fold(path)
    >>> sum(n.op_type == "BatchNormalization" for n in folded.graph)
    0
    """
    from .folding import FoldPass

    model = load(path_or_model).clone()
    check_opset(model, _label(path_or_model))
    out = _run(FoldPass(), model)
    return _finish(out, output, check, sparse_initializers)


def lower(path_or_model: Any, target: str = "ort-block", *, fold: bool = True, block: int | None = None,
          max_density: float | None = None, layout: str = "auto", output: str | os.PathLike | None = None,
          check: bool = True, sparse_initializers: bool = True) -> ir.Model:
    """Lower an ONNX model for ONNX Runtime (after folding, unless `fold=False`).

    target  "fold"        folding only
            "ort-block"   block-sparse MatMul/Gemm weights become Gather + batched MatMul over the
                          nonzero blocks (standard ops: any execution provider); `block` fixes the
                          block size (default: the plan's block mask, else the best of 64/32/16/8),
                          layers whose padded block density exceeds `max_density` (default 0.5) stay dense;
                          `layout` "rows" | "blocks" | "column" fixes the formulation (default "auto":
                          per layer, see `sparsegraph.onnx.lowering`)
            "ort-sparse"  com.microsoft SparseToDenseMatMul with the weight as a sparse-tensor input
                          (CPU only; run with `sg.onnx.Session`, which feeds the weights)
            "ort-native"  block-sparse float32 MatMul/Gemm weights become the custom op
                          sparsegraph.SparseLinear and 2-D Conv weights sparsegraph.SparseConv, the native
                          CPU kernels in ONNX Runtime (`sparsegraph.onnx.native`; `sg.onnx.Session`
                          registers its library); `block` and `max_density` as for ort-block

    >>> import numpy as np, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=2)
    >>> wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, mask="balanced_block:32")
    >>> path = sg.export_onnx(wide, spec.example_inputs, "wide.onnx")
    >>> lowered = sg.onnx.lower(path, "ort-sparse")
    >>> sorted({c["target"] for c in sg.onnx.read_lowering(lowered).values()})
    ['ort-sparse']
    >>> blocks = sg.onnx.lower(path, "ort-block", layout="blocks")
    >>> {c["layout"] for c in sg.onnx.read_lowering(blocks).values()}
    {'blocks'}
    >>> sorted(k for k, c in sg.onnx.read_lowering(blocks).items() if "input_from" in c)  # GELU(c_fc) as it is
    ['h.0.mlp.c_proj.weight', 'h.1.mlp.c_proj.weight']
    >>> sg.onnx.Session(lowered)(spec.example_inputs[0].numpy()).shape
    (2, 64, 256)
    >>> native = sg.onnx.lower(path, "ort-native")
    >>> {c["block"] for c in sg.onnx.read_lowering(native).values()}
    {32}
    >>> y = sg.onnx.Session(native)(spec.example_inputs[0].numpy())
    >>> bool(np.abs(y - wide.eval()(*spec.example_inputs).detach().numpy()).max() < 1e-4)
    True
    >>> resnet = builtin("resnet-mini")
    >>> wide = sg.sparsify(resnet.model, resnet.example_inputs, "sparse_wide", 0.75, mask="balanced_block:8").eval()
    >>> native = sg.onnx.lower(sg.export_onnx(wide, resnet.example_inputs, "resnet.onnx"), "ort-native")
    >>> sorted({c["op"] for c in sg.onnx.read_lowering(native).values()})  # its convolutions (the head stays dense)
    ['SparseConv']
    >>> y = sg.onnx.Session(native)(resnet.example_inputs[0].numpy())
    >>> bool(np.abs(y - wide(*resnet.example_inputs).detach().numpy()).max() < 1e-4)
    True
    """
    from .folding import FoldPass
    from .lowering import (LAYOUTS, BlockSparseMatMulPass, NativeSparseConvPass, NativeSparseMatMulPass,
                           SparseToDenseMatMulPass)

    if target not in TARGETS:
        raise SparsegraphError(f"unknown lowering target {target!r}; choose from {', '.join(TARGETS)}")
    if max_density is not None and not 0 < max_density <= 1:
        raise SparsegraphError(f"max_density must be in (0, 1], got {max_density}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise SparsegraphError(f"block must be a positive integer, got {block!r}")
    if layout != "auto" and layout not in LAYOUTS:
        raise SparsegraphError(f"unknown ort-block layout {layout!r}; choose from auto, {', '.join(LAYOUTS)}")
    model = load(path_or_model).clone()
    check_opset(model, _label(path_or_model))
    if fold or target == "fold":
        model = _run(FoldPass(), model)
    if target == "ort-block":
        model = _run(BlockSparseMatMulPass(block=block, max_density=max_density, layout=layout), model)
    elif target == "ort-sparse":
        model = _run(SparseToDenseMatMulPass(max_density=max_density), model)
    elif target == "ort-native":
        model = _run(NativeSparseMatMulPass(block=block, max_density=max_density), model)
        model = _run(NativeSparseConvPass(block=block, max_density=max_density), model)
    return _finish(model, output, check, sparse_initializers)


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
class Session:
    """An ONNX Runtime CPU session for any sparsegraph ONNX file.

    ONNX Runtime densifies sparse initializers when it loads a model, and SparseToDenseMatMul
    accepts its sparse operand only as a run-time input, so "ort-sparse" files carry each weight as
    the default value of a sparse-tensor graph input. This session takes those defaults out of the
    model and feeds them (CSR) on every run. For "ort-native" files it registers the custom-op
    library (`sparsegraph.onnx.native`, built on first use) and cuts each product into `threads`
    pieces for ONNX Runtime's thread pool. Other models run unchanged. `spinning=False` makes idle
    intra-op threads sleep at once (for several sessions taking turns on the same cores).

    >>> import numpy as np, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=1)
    >>> path = sg.export_onnx(spec.model, spec.example_inputs, "session.onnx")
    >>> sg.onnx.Session(path)(np.zeros((2, 64), np.int64)).shape
    (2, 64, 256)
    """

    def __init__(self, path_or_model: Any, *, threads: int | None = None, optimization: str = "all",
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), spinning: bool = True):
        import onnxruntime as ort

        from . import native

        proto, self.label = _read_proto(path_or_model)
        sparse_in = _sparse_inputs(proto.graph)
        if sparse_in and not isinstance(path_or_model, (str, os.PathLike)):
            proto = copy.deepcopy(proto)  # the caller's model stays as it is
        self._arrays: list[np.ndarray] = []  # kept alive: ORT sparse tensors reference numpy memory
        self._sparse: dict[str, Any] = {}
        keep = []
        for sp in proto.graph.sparse_initializer:
            if sp.values.name in sparse_in:
                self._sparse[sp.values.name] = self._csr(ort, sparse_to_dense(sp))
            else:
                keep.append(sp)
        del proto.graph.sparse_initializer[:]
        proto.graph.sparse_initializer.extend(keep)
        dense = [t for t in proto.graph.initializer if t.name in sparse_in]
        for t in dense:
            self._sparse[t.name] = self._csr(ort, onnx.numpy_helper.to_array(t))
        if dense:
            rest = [t for t in proto.graph.initializer if t.name not in sparse_in]
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(rest)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        if not spinning:  # idle intra-op threads sleep at once instead of spinning for the next op
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if any(n.domain == native.DOMAIN for n in proto.graph.node):
            so.register_custom_ops_library(native.library())
            native.set_threads(threads)
        so.log_severity_level = 3
        so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                       "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
        source = os.fspath(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) and not sparse_in \
            else proto.SerializeToString()
        try:
            self.session = ort.InferenceSession(source, so, providers=list(providers))
        except Exception as e:  # noqa: BLE001
            raise SparsegraphError(f"{self.label}: ONNX Runtime cannot load the model: "
                                   f"{str(e).strip().splitlines()[0]}") from None
        self._ort = ort
        self.input_names = [i.name for i in self.session.get_inputs() if i.name not in self._sparse]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _csr(self, ort, dense: np.ndarray):
        import scipy.sparse

        m = scipy.sparse.csr_matrix(np.ascontiguousarray(dense))
        values = np.ascontiguousarray(m.data)
        inner = np.ascontiguousarray(m.indices.astype(np.int64))
        outer = np.ascontiguousarray(m.indptr.astype(np.int64))
        self._arrays += [values, inner, outer]
        st = ort.SparseTensor.sparse_csr_from_numpy(np.array(dense.shape, np.int64), values, inner, outer,
                                                    ort.OrtDevice.make("cpu", 0))
        return ort.OrtValue.ort_value_from_sparse_tensor(st)

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """As `onnxruntime.InferenceSession.run`."""
        if not self._sparse:
            return self.session.run(output_names, feeds)
        values = {k: self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        values.update(self._sparse)
        outs = self.session.run_with_ort_values(output_names or self.output_names, values)
        return [o.numpy() for o in outs]

    def __call__(self, *inputs: np.ndarray):
        outs = self.run(None, dict(zip(self.input_names, inputs)))
        return outs[0] if len(outs) == 1 else outs
