"""The ONNX frontend: ONNX exports of the built-in models analyse like the PyTorch models.

Exports use the dynamo exporter. The GPT and small-ResNet exports use `optimize=False`: the
exporter's optimizer deduplicates identical initializers (every fresh LayerNorm weight is all
ones, every bias all zeros, so they collapse into one tensor named after the first of them),
which merges parameters that are separate in PyTorch and would make name correspondence
meaningless. Unoptimised, every parameter keeps its name and MatMul weights are read through
`Transpose(W)`, so the comparison below is parameter by parameter. ResNet-18 is exported
*optimised* (BatchNorm folded into the convolutions, Gemm heads) with randomised BatchNorm
statistics so no two folded tensors are equal: the convolution weights keep their names there.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import sparsegraph as sg
from sparsegraph.capture import SymSize
from sparsegraph.onnx.capture import capture_onnx, constant_value
from sparsegraph.dims import analyze_dims
from sparsegraph.layers import find_layers
from sparsegraph.models import builtin


def _export(model, args, path, **kw):
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=True, verbose=False, **kw)
    return str(path)


def _randomize_batch_norms(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data = torch.randn(t.shape, generator=g)
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5


def _assert_groups_match(torch_graph: sg.ModelGraph, onnx_graph: sg.ModelGraph) -> None:
    """Every widenable PyTorch group has a widenable ONNX group with the same member sizes that
    holds the same (parameter, axis) pairs, for the parameters that keep their names in the file."""
    tdims, odims = analyze_dims(torch_graph), analyze_dims(onnx_graph)
    assert len(tdims.widenable) == len(odims.widenable)
    for grp in tdims.widenable:
        kept = [(p, a) for p, a in grp.params if p in onnx_graph.params]
        assert kept, grp.label()
        other = odims.param_group(*kept[0])
        assert other.widenable, other.reasons
        assert sorted(set(other.sizes.values())) == sorted(set(grp.sizes.values()))
        assert [pa for pa in other.params if pa[0] in torch_graph.params] == kept


# ---------------------------------------------------------------------------------------------
# the built-in models, exported
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    spec = builtin("gpt-mini", n_layer=2)
    path = _export(spec.model, spec.example_inputs, tmp_path_factory.mktemp("gpt") / "gpt.onnx", optimize=False)
    return spec, path


@pytest.fixture(scope="module")
def gpt_dynamic(tmp_path_factory):
    spec = builtin("gpt-mini", n_layer=2)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=128)}
    path = _export(spec.model, spec.example_inputs, tmp_path_factory.mktemp("gpt") / "gpt_dyn.onnx",
                   optimize=False, dynamic_shapes=(dims,))
    return spec, path


def test_gpt_mini_matches_pytorch(gpt):
    spec, path = gpt
    torch_report = sg.analyze(spec.model, spec.example_inputs)
    onnx_report = sg.analyze(path)  # capture() dispatches .onnx paths to capture_onnx
    g = onnx_report.graph
    assert g.frontend == "onnx" and isinstance(g.source, ir.Model)
    assert all(isinstance(op.source, ir.Node) and op.target == op.source.op_type for op in g)
    assert onnx_report.dense_flops == torch_report.dense_flops
    assert onnx_report.params == torch_report.params
    assert onnx_report.unknown_ops == []
    # the exporter's metadata names the owning modules: same layers, roles, FLOPs per layer
    rows = lambda r: [(l.name, l.kind, l.role, l.weight, l.dense_flops) for l in r.layers]  # noqa: E731
    assert rows(onnx_report) == rows(torch_report)
    _assert_groups_match(torch_report.graph, g)


def test_gpt_mini_dynamic_export(gpt_dynamic):
    spec, path = gpt_dynamic
    g = capture_onnx(path, input_shapes={"idx": tuple(spec.example_inputs[0].shape)})
    torch_report = sg.analyze(spec.model, spec.example_inputs)
    assert sg.analyze(g).dense_flops == torch_report.dense_flops
    _assert_groups_match(torch_report.graph, g)
    # batch and sequence are symbolic, the model's own sizes are not
    assert g.values["idx"].symbolic == (True, True)
    assert g.values[g.outputs[0]].shape == (2, 64, 256)
    assert g.values[g.outputs[0]].symbolic == (True, True, False)
    assert not any(g.values[v].symbolic and any(g.values[v].symbolic) for v in g.params.values())
    # view(B, T, n_head, head_dim): B and T computed from Shape at run time, the rest literal
    view = next(op for op in g if op.target == "Reshape" and len(op.args.get("size", [])) == 4)
    assert view.args["size"] == [2, 64, 4, 32]
    assert [type(s) for s in view.args["size"]] == [SymSize, SymSize, int, int]
    # patches (the constants a widening rewrites) are the same as in the PyTorch graph
    patches = lambda graph: sorted((p.key, p.index, p.fn) for grp in analyze_dims(graph).widenable  # noqa: E731
                                   for p in grp.patches)
    assert patches(g) == patches(torch_report.graph)


def test_symbolic_dims_get_defaults(gpt_dynamic):
    _, path = gpt_dynamic
    g = capture_onnx(path)
    assert g.values["idx"].shape == (2, 16)  # batch 2, other symbolic axes 16
    assert g.values[g.outputs[0]].shape == (2, 16, 256)


def test_resnet_mini_matches_pytorch(tmp_path):
    spec = builtin("resnet-mini")
    _randomize_batch_norms(spec.model)
    path = _export(spec.model, spec.example_inputs, tmp_path / "resnet_mini.onnx", optimize=False)
    torch_report, onnx_report = sg.analyze(spec.model, spec.example_inputs), sg.analyze(path)
    assert onnx_report.dense_flops == torch_report.dense_flops
    assert onnx_report.params == torch_report.params  # running statistics are buffers
    g = onnx_report.graph
    assert g.values[g.params["bn1.running_mean"]].kind == "buffer"
    assert g.values[g.params["bn1.weight"]].kind == "param"
    assert [(l.name, l.role) for l in onnx_report.layers] == [(l.name, l.role) for l in torch_report.layers]
    _assert_groups_match(torch_report.graph, g)


def test_resnet18_optimized_export(tmp_path):
    spec = builtin("resnet18")
    _randomize_batch_norms(spec.model)
    path = _export(spec.model, spec.example_inputs, tmp_path / "resnet18.onnx", optimize=True)
    torch_report, onnx_report = sg.analyze(spec.model, spec.example_inputs), sg.analyze(path)
    g = onnx_report.graph
    assert not any(op.op == "batch_norm" for op in g)  # folded into the convolutions
    assert onnx_report.dense_flops == torch_report.dense_flops
    assert {op.target for op in g if op.op == "linear"} == {"Gemm"}
    _assert_groups_match(torch_report.graph, g)


def test_torchscript_export_resnet_mini(tmp_path):
    """The older exporter: BatchNorm folded into renamed weights, Flatten + Gemm head, a dynamic batch."""
    spec = builtin("resnet-mini")
    _randomize_batch_norms(spec.model)
    spec.model.eval()
    path = str(tmp_path / "resnet_mini_ts.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.model, spec.example_inputs, path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "N"}})
    torch_report, onnx_report = sg.analyze(spec.model, spec.example_inputs), sg.analyze(path)
    assert onnx_report.graph.values["x"].symbolic == (True, False, False, False)
    assert onnx_report.dense_flops == torch_report.dense_flops
    # modules come from node names such as "/layers/layers.0/layers.0.0/conv1/Conv"
    convs = lambda r: [l.name.split(":")[0] for l in r.layers if l.kind != "norm"]  # noqa: E731
    assert convs(onnx_report) == convs(torch_report)
    sizes = lambda g: sorted(sorted(set(grp.sizes.values())) for grp in analyze_dims(g).widenable)  # noqa: E731
    assert sizes(onnx_report.graph) == sizes(torch_report.graph)


# ---------------------------------------------------------------------------------------------
# small graphs built with onnx.helper
# ---------------------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits=(), opset=20, name="g"):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _init(name, shape, dtype=np.float32, value=None):
    arr = np.asarray(value, dtype=dtype) if value is not None else \
        np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return numpy_helper.from_array(arr, name)


def _mlp():
    """x (N, 8) -> Gemm transB=1 (16) -> Relu -> Gemm transB=0 (4), named like an nn.Linear MLP."""
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["a"], transB=1, name="fc1"),
             helper.make_node("Relu", ["a"], ["h"], name="act"),
             helper.make_node("Gemm", ["h", "fc2.weight", "fc2.bias"], ["y"], name="fc2")]  # W (in, out)
    inits = [_init("fc1.weight", (16, 8)), _init("fc1.bias", (16,)), _init("fc2.weight", (16, 4)),
             _init("fc2.bias", (4,))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, name="mlp")


def test_gemm_mlp():
    g = capture_onnx(_mlp(), input_shapes={"x": (5, 8)})
    assert [(op.op, op.target) for op in g] == [("linear", "Gemm"), ("elementwise", "Relu"), ("addmm", "Gemm")]
    fc1, _, fc2 = g
    assert fc1.args["weight"] == "fc1.weight" and fc1.args["bias"] == "fc1.bias"
    assert fc2.args["mat2"] == "fc2.weight" and fc2.args["self"] == "fc2.bias"
    assert g.values["y"].shape == (5, 4) and g.values["y"].symbolic == (True, False)
    assert sg.analyze(g).dense_flops == 2 * 5 * (8 * 16 + 16 * 4)
    layers = {l.weight: (l.out_axis, l.in_axes, l.role) for l in find_layers(g)}
    assert layers == {"fc1.weight": (0, (1,), "stem"), "fc2.weight": (1, (0,), "head")}
    (hidden,) = analyze_dims(g).widenable
    assert sorted(hidden.params) == [("fc1.bias", 0), ("fc1.weight", 0), ("fc2.weight", 0)]


def test_gemm_transposed_input_is_kept_fixed_but_counted():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)  # (6, 3)^T @ (6, 5) -> (3, 5)
    g = capture_onnx(_model([gemm], [x], [y], [_init("w", (6, 5))]))
    (op,) = g
    assert op.op == "other" and op.flops == 2 * 3 * 6 * 5
    assert g.values["y"].shape == (3, 5)
    assert not analyze_dims(g).widenable


def test_reshape_with_constant_shape():
    """x (N, 8, 32) @ W (32, 64) -> Reshape [0, 8, 4, 16] -> Relu -> Reshape [0, 8, 64] @ V (64, 32):
    the head axis (4) is kept, head_dim (16) grows with W's outputs and V's inputs."""
    nodes = [helper.make_node("MatMul", ["x", "proj.weight"], ["p"]),
             helper.make_node("Constant", [], ["split_heads"], value=_init("s", None, np.int64, [0, 8, 4, 16])),
             helper.make_node("Reshape", ["p", "split_heads"], ["heads"], name="split"),
             helper.make_node("Relu", ["heads"], ["r"]),
             helper.make_node("Reshape", ["r", "merge_heads"], ["merged"], name="merge"),
             helper.make_node("MatMul", ["merged", "out.weight"], ["y"])]
    inits = [_init("proj.weight", (32, 64)), _init("merge_heads", None, np.int64, [0, 8, 64]),
             _init("out.weight", (64, 32))]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 32])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, opset=17)
    g = capture_onnx(m, input_shapes={"x": (3, 8, 32)})
    split, merge = g.ops["split"], g.ops["merge"]
    assert split.args["size"] == [0, 8, 4, 16] and all(type(s) is int for s in split.args["size"])
    assert merge.args["size"] == [0, 8, 64]
    assert split.inputs == ["p", "split_heads"]
    assert g.values["heads"].shape == (3, 8, 4, 16) and g.values["merged"].shape == (3, 8, 64)
    assert g.values["split_heads"].kind == "const" and g.values["merge_heads"].kind == "const"
    np.testing.assert_array_equal(constant_value(g, "split_heads"), [0, 8, 4, 16])
    np.testing.assert_array_equal(constant_value(g, "merge_heads"), [0, 8, 64])
    dims = analyze_dims(g)
    head_dim = dims.group("heads", 3)
    assert head_dim.widenable and head_dim.params == [("out.weight", 0), ("proj.weight", 1)]
    assert sorted(set(head_dim.sizes.values())) == [16, 64]
    assert "head count" in dims.group("heads", 2).reasons
    assert sorted((p.op, p.key, p.index) for p in head_dim.patches) == [("merge", "size", 2), ("split", "size", 3)]


def test_slice_on_one_axis_and_on_several():
    big = np.iinfo(np.int64).max
    consts = {"s": [16], "e": [big], "a": [-1], "s2": [1, 2], "e2": [big, big], "a2": [1, 2]}
    nodes = [helper.make_node("Constant", [], [k], value=_init(k, None, np.int64, v)) for k, v in consts.items()]
    nodes += [helper.make_node("Slice", ["x", "s", "e", "a"], ["half"]),  # x[..., 16:]
              helper.make_node("Slice", ["x", "s2", "e2", "a2"], ["corner"])]  # x[:, 1:, 2:]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 32])],
               [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("half", "corner")])
    g = capture_onnx(m)
    half, corner = (op for op in g if op.target == "Slice")
    assert half.op == "slice" and (half.args["dim"], half.args["start"], half.args["end"]) == (2, 16, 32)
    assert g.values["half"].shape == (2, 6, 16)
    assert corner.op == "index" and g.values["corner"].shape == (2, 5, 30)


# ---------------------------------------------------------------------------------------------
# errors: one line naming the file and what is wrong
# ---------------------------------------------------------------------------------------------
def _one_line_error(src, *, match, **kw) -> str:
    with pytest.raises(sg.CaptureError, match=match) as info:
        capture_onnx(src, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.onnx"
    assert str(path) in _one_line_error(str(path), match="not found")


def test_missing_or_short_external_data(tmp_path):
    """A model whose weights live in a separate data file: read when it is complete, one clear line
    naming the data file when it is missing or cut short (sg.analyze and sg.onnx both)."""
    import onnx

    path = tmp_path / "ext.onnx"
    onnx.save(_mlp(), str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    assert sg.analyze(str(path), {"x": (2, 8)}).dense_flops == 2 * 2 * (8 * 16 + 16 * 4)
    data = tmp_path / "ext.data"
    full = data.read_bytes()
    data.write_bytes(full[:100])
    _one_line_error(str(path), match=r"external data file ext.data is truncated \(100 bytes; tensor .* needs \d+\)")
    data.unlink()
    message = _one_line_error(str(path), match=r"the external data file ext.data of tensor fc1.weight is missing")
    assert str(path) in message and str(tmp_path) in message
    with pytest.raises(sg.SparsegraphError, match="ext.data of tensor fc1.weight is missing"):
        sg.onnx.load(str(path))
    with pytest.raises(sg.SparsegraphError, match="ext.data of tensor fc1.weight is missing"):
        sg.analyze(str(path))


def test_random_bytes(tmp_path):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert str(path) in _one_line_error(str(path), match="not a valid ONNX model")


def test_truncated_file(tmp_path):
    data = _mlp().SerializeToString()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[:len(data) // 2])
    assert str(path) in _one_line_error(str(path), match="truncated or corrupt")
    capture_onnx(_mlp(), input_shapes={"x": (2, 8)})  # the whole model is fine


def test_empty_file_and_undefined_values(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert str(path) in _one_line_error(str(path), match="no outputs")
    dangling = _model([helper.make_node("Add", ["x", "lost"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    _one_line_error(dangling, match="reads 'lost', which nothing defines")


def test_shapes_that_cannot_be_inferred():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    mismatch = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_init("w", (4, 5))])
    _one_line_error(mismatch, match="shape inference failed.*matrix multiplication")
    data_dependent = _model([helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Transpose", ["nz"], ["y"])],
                            [x], [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    _one_line_error(data_dependent, match="shape of 'nz' .*NonZero.* cannot be inferred")


def test_bad_input_shapes():
    _one_line_error(_mlp(), match="unknown inputs", input_shapes={"z": (2, 8)})
    _one_line_error(_mlp(), match="has rank 3", input_shapes={"x": (2, 8, 1)})
    _one_line_error(_mlp(), match="fixed size 8", input_shapes={"x": (2, 9)})
