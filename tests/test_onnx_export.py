"""sg.export_onnx: ONNX Runtime reproduces PyTorch (1e-4 relative, fp32) in every lower mode.

`export_onnx(lower=mode)` is `to_onnx` (masks multiplied out), then `sg.onnx.lower(mode)` (fold,
then lower), then `sg.onnx.save`. Each variant is exported once with lower="dense" and the other
modes are produced from that file with `sg.onnx.lower`, the same passes; the Sparse Wide variants
are also exported with `export_onnx(lower=mode)` directly. The reference is always the PyTorch
model itself (eval mode).
"""
from __future__ import annotations

import copy
import errno
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import sparsegraph as sg
from sparsegraph.cli import main
from sparsegraph.models import builtin
from sparsegraph.onnx.lowering import LAYOUTS
from sparsegraph.plan import attach_plan

from .conftest import hf_model
from .onnx_checks import check_written, randomize_batch_norms, rel_err

MODES = ("dense", "ort-block", "ort-sparse", "ort-native")
FAMILIES = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
OPTIONS = {"gpt-mini": {"mask": "balanced_block:16"},  # d 128 -> 256: whole 16-blocks
           "resnet-mini": {"mask": "balanced_block:8", "include_head": True}}  # the Gemm head is sparse too


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, kw in (("gpt-mini", {"n_layer": 2}), ("resnet-mini", {})):
        spec = builtin(name, **kw)
        randomize_batch_norms(spec.model)
        out[name] = (spec, sg.capture(spec.model, spec.example_inputs))
    return out


def _variant(models, model: str, family: str, output: str = "module") -> tuple[torch.nn.Module, tuple]:
    spec, graph = models[model]
    if family == "dense":
        return spec.model.eval(), spec.example_inputs
    m = sg.sparsify(spec.model, spec.example_inputs, family, 0.75, seed=0, graph=graph, output=output,
                    **OPTIONS[model])
    randomize_batch_norms(m)  # per-branch BatchNorms with statistics worth folding
    return m.eval(), spec.example_inputs


def dense_original(models, model: str, tmp_path) -> str:
    path = tmp_path / "original.onnx"
    if not path.exists():
        spec = models[model][0]
        sg.export_onnx(spec.model.eval(), spec.example_inputs, path)
    return str(path)


def _ort(path_or_model, inputs) -> np.ndarray:
    out = sg.onnx.Session(path_or_model)(*[x.numpy() for x in inputs])
    return out[0] if isinstance(out, list) else out  # Hugging Face models: logits first


def _logits(model, inputs) -> np.ndarray:
    with torch.no_grad():
        out = model(*inputs)
    out = out["logits"] if isinstance(out, dict) or hasattr(out, "logits") else out
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


def _no_masks(path) -> bool:
    proto = onnx.load(str(path))
    names = [t.name for t in proto.graph.initializer] + [t.values.name for t in proto.graph.sparse_initializer]
    return not any(n.endswith("_mask") for n in names)


@pytest.mark.parametrize("model", ["gpt-mini", "resnet-mini"])
@pytest.mark.parametrize("family", ("dense",) + FAMILIES)
def test_export_parity(models, tmp_path, model, family):
    """The module form (your own class) of every family; graph forms: test_graph_form_export_parity."""
    m, inputs = _variant(models, model, family)
    assert type(m) is type(models[model][0].model)
    with torch.no_grad():
        expected = m(*inputs).numpy()
    dense = sg.export_onnx(m, inputs, tmp_path / "dense.onnx")
    assert _no_masks(dense)  # multiplied into the weights
    dense_flops = sg.analyze(models[model][0].model, inputs).dense_flops
    for mode in MODES:
        path = dense if mode == "dense" else str(tmp_path / f"{mode}.onnx")
        if mode != "dense":
            sg.onnx.lower(dense, mode, output=path)
        check_written(path)
        assert rel_err(_ort(path, inputs), expected) <= 1e-4, (mode, rel_err(_ort(path, inputs), expected))
        lowered = sg.onnx.read_lowering(path)
        ops = {n.op_type for n in onnx.load(path).graph.node}
        if family == "sparse_wide" and mode != "dense":  # every sparse MatMul/Gemm weight is lowered,
            kinds = ("linear", "conv") if mode == "ort-native" else ("linear",)  # and with ort-native every Conv
            sparse = {w.name for w in sg.plan_of(m).sparse_weights if w.kind in kinds}
            assert sparse and sparse <= set(lowered), sorted(sparse - set(lowered))
            assert ("SparseToDenseMatMul" in ops) == (mode == "ort-sparse")
            assert ("SparseLinear" in ops) == (mode == "ort-native")
            assert ("SparseConv" in ops) == (mode == "ort-native" and model == "resnet-mini")
            block = int(OPTIONS[model]["mask"].rsplit(":", 1)[1])  # the plan's block mask is preferred
            assert all(c["block"] == block for c in lowered.values() if c["target"] in ("ort-block", "ort-native"))
        if family in ("sparse_parallel", "sparse_factorized", "sparse_doped") and mode != "dense":
            assert "BatchNormalization" not in ops
    if family in ("sparse_parallel", "sparse_factorized", "sparse_doped"):
        # folded back to single layers of the original shapes: exactly the dense original's FLOPs
        # (a folded product may itself be block-sparse, which ort-block then lowers)
        folded = sg.onnx.fold(dense)
        assert sg.analyze(folded).dense_flops == dense_flops
        assert sum(n.op_type in ("MatMul", "Gemm", "Conv") for n in folded.graph) == \
            sum(n.op_type in ("MatMul", "Gemm", "Conv") for n in sg.onnx.load(dense_original(models, model, tmp_path)).graph)
    if family == "sparse_wide":  # export_onnx(lower=mode) directly: the same model as lowering the dense file
        for mode in MODES[1:]:
            direct = sg.export_onnx(m, inputs, tmp_path / f"direct_{mode}.onnx", lower=mode)
            assert sg.onnx.read_lowering(direct).keys() == sg.onnx.read_lowering(tmp_path / f"{mode}.onnx").keys()
            assert rel_err(_ort(direct, inputs), expected) <= 1e-4


@pytest.mark.parametrize("model, family", [("gpt-mini", "sparse_wide"),
                                           pytest.param("resnet-mini", "sparse_parallel", marks=pytest.mark.slow)])
def test_graph_form_export_parity(models, tmp_path, model, family):
    m, inputs = _variant(models, model, family, output="graph")
    with torch.no_grad():
        expected = m(*inputs).numpy()
    for mode in MODES:
        path = sg.export_onnx(m, inputs, tmp_path / f"{mode}.onnx", lower=mode)
        assert _no_masks(path) and sg.onnx.read_plan(path) == sg.plan_of(m)
        assert rel_err(_ort(path, inputs), expected) <= 1e-4, mode


def test_ort_block_layouts_match_pytorch(tmp_path):
    """Every ort-block formulation of a Sparse Wide gpt-mini at s = 0.9 (d 416: one 32-block per
    output block, where "auto" picks blocks) reproduces PyTorch through ONNX Runtime
    (`export_onnx(layout=...)`: test_cli_export's --layout)."""
    spec = builtin("gpt-mini", n_layer=1)
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:32").eval()
    with torch.no_grad():
        expected = wide(*spec.example_inputs).numpy()
    dense = sg.export_onnx(wide, spec.example_inputs, tmp_path / "dense.onnx")
    sparse = {w.name for w in sg.plan_of(wide).sparse_weights if w.kind == "linear"}
    for layout in ("auto", *LAYOUTS):
        path = str(tmp_path / f"{layout}.onnx")
        sg.onnx.lower(dense, "ort-block", layout=layout, output=path)
        check_written(path)
        lowered = sg.onnx.read_lowering(path)
        assert sparse <= set(lowered)
        assert {c["layout"] for c in lowered.values()} == {"blocks" if layout == "auto" else layout}
        handed = {k for k, c in lowered.items() if "input_from" in c}  # GELU(c_fc) read in block layout
        assert handed == ({"h.0.mlp.c_proj.weight"} if layout in ("auto", "blocks") else set())
        assert rel_err(_ort(path, spec.example_inputs), expected) <= 1e-4, layout


@pytest.mark.slow
def test_module_form_torchvision_resnet18(tmp_path):
    """Stacked parallel branches (Concat, Split, a BatchNorm per chunk) fold like the graph form's."""
    torchvision = pytest.importorskip("torchvision")
    dense = torchvision.models.resnet18(num_classes=10).eval()
    x = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    par = sg.sparsify(dense, x, "sparse_parallel", 0.75, mask="balanced_block:16")
    randomize_batch_norms(par)
    par.eval()
    path = sg.export_onnx(par, x, tmp_path / "par.onnx", lower="ort-block")
    check_written(path)
    assert sg.onnx.read_plan(path) == sg.plan_of(par) and _no_masks(path)
    with torch.no_grad():
        assert rel_err(_ort(path, x), par(*x).numpy()) <= 1e-4
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert not ops & {"BatchNormalization", "Concat", "Split"}, ops  # every branch folded into one conv
    assert sg.analyze(path).dense_flops == sg.analyze(dense, x).dense_flops


@pytest.mark.parametrize("family", [FAMILIES[1]] + [pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES[2:]])
# (Sparse Wide: test_hf_gpt2_parity, graph form)
def test_module_form_hf_gpt2(tmp_path, family):
    model = hf_model("gpt2", n_layer=1, n_embd=128, n_head=4, vocab_size=100, n_positions=32)
    x = (torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)),)
    m = sg.sparsify(model, x, family, 0.75, mask="balanced_block:16").eval()
    assert type(m) is type(model)
    for mode in MODES:
        path = sg.export_onnx(m, x, tmp_path / f"{mode}.onnx", lower=mode)
        assert _no_masks(path) and sg.onnx.read_plan(path) == sg.plan_of(m)
        assert rel_err(_ort(path, x), _logits(m, x)) <= 1e-4, mode


@pytest.mark.slow
def test_hf_gpt2_parity(tmp_path):
    """Hugging Face GPT-2 (Conv1D weights (in, out): Gemm without transB; 50257-token head)."""
    model = hf_model("gpt2", n_layer=2)
    x = (torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0)),)
    path = sg.export_onnx(model, x, tmp_path / "gpt2.onnx")
    assert rel_err(_ort(path, x), _logits(model, x)) <= 1e-4
    wide = sg.sparsify(model, x, "sparse_wide", 0.75, mask="balanced_block:16", width=1.25, output="graph").eval()
    expected = _logits(wide, x)
    dense = sg.export_onnx(wide, x, tmp_path / "gpt2_wide.onnx")
    assert rel_err(_ort(dense, x), expected) <= 1e-4
    sparse = {w.name for w in sg.plan_of(wide).sparse_weights}
    for mode in MODES[1:]:  # lowered in memory (the 200 MB files are slow to write here)
        lowered = sg.onnx.lower(dense, mode)
        assert sparse <= set(sg.onnx.read_lowering(lowered))  # every c_attn/c_proj/c_fc Gemm lowered
        assert rel_err(_ort(lowered, x), expected) <= 1e-4, mode


# ---------------------------------------------------------------------------------------------
# plan metadata, sparse initializers, atomic writes
# ---------------------------------------------------------------------------------------------
def test_plan_metadata_round_trip(models, tmp_path):
    m, inputs = _variant(models, "gpt-mini", "sparse_wide")
    m = copy.deepcopy(m)
    plan = copy.deepcopy(sg.plan_of(m))
    plan.supar = {"parameterization": "supar", "base_lr": 3e-3, "base_width": 128}
    for w in plan.weights:  # SμPar multipliers, as the SμPar pass records them
        w.supar = {"m_d": w.fan_in / max(w.orig_fan_in, 1), "m_rho": w.density, "init_std": 0.02}
    attach_plan(m, plan)
    dense = sg.export_onnx(m, inputs, tmp_path / "dense.onnx")
    for mode in MODES:
        path = dense if mode == "dense" else str(tmp_path / f"{mode}.onnx")
        if mode != "dense":
            sg.onnx.lower(dense, mode, output=path)
        assert sg.onnx.read_plan(path) == plan
        meta = {p.key: p.value for p in onnx.load(path).metadata_props}
        assert sg.SparsityPlan.from_json(meta["sparsegraph.plan"]) == plan
        assert sg.analyze(path).plan == plan.to_dict()


def test_sparse_weights_shrink_the_file_and_pass_the_full_check(models, tmp_path):
    """Sparse weights are stored as Constant(sparse_value) nodes: the file shrinks, passes
    `check_model(path, full_check=True)` as written, and plain ONNX Runtime runs it; with
    `sparse_initializers=False` every weight is a dense initializer (for other runtimes)."""
    m, inputs = _variant(models, "gpt-mini", "sparse_wide")
    small = sg.export_onnx(m, inputs, tmp_path / "sparse.onnx")
    big = sg.export_onnx(m, inputs, tmp_path / "dense.onnx", sparse_initializers=False)
    proto = onnx.load(small)
    names = {n.output[0] for n in proto.graph.node if n.op_type == "Constant"
             and any(a.name == "sparse_value" for a in n.attribute)}
    assert {w.name for w in sg.plan_of(m).sparse_weights} <= names  # density 0.25: 12 bytes per nonzero < 4 per entry
    assert not proto.graph.sparse_initializer
    dense = onnx.load(big)
    assert not dense.graph.sparse_initializer and not any(n.op_type == "Constant" for n in dense.graph.node)
    assert {w.name for w in sg.plan_of(m).sparse_weights} <= {t.name for t in dense.graph.initializer}
    assert os.path.getsize(small) < 0.8 * os.path.getsize(big)
    for path in (small, big):
        onnx.checker.check_model(path, full_check=True)
        onnx.shape_inference.infer_shapes_path(path, str(tmp_path / "inferred.onnx"), check_type=True,
                                               strict_mode=True)
    x = {"idx": inputs[0].numpy()}
    a = ort.InferenceSession(small, providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(big, providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        assert rel_err(a, m(*inputs).numpy()) <= 1e-4


class _Broken(torch.nn.Module):
    def forward(self, x):
        if x.shape[0] > 0:
            raise RuntimeError("this model cannot run")
        return x


class _DataDependent(torch.nn.Module):
    """Runs eagerly; torch.export cannot trace its data-dependent branch."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


def test_no_half_written_output(models, tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous contents")
    with pytest.raises(sg.SparsegraphError, match=r"_Broken does not run on its example inputs \(float32\[2, 3\]\): "
                                                  r"RuntimeError: this model cannot run \(at test_onnx_export.py:\d+\)"):
        sg.export_onnx(_Broken(), (torch.ones(2, 3),), target)
    with pytest.raises(sg.SparsegraphError, match="torch.onnx.export failed for _DataDependent: "
                                                  "GuardOnDataDependentSymNode") as info:
        sg.export_onnx(_DataDependent(), (torch.ones(2, 3),), target)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)  # one line, no terminal colour codes
    assert target.read_bytes() == b"previous contents"
    m, inputs = _variant(models, "gpt-mini", "dense")
    import sparsegraph.onnx.api as api

    def failing_check(proto, label, data=None):
        raise sg.SparsegraphError(f"{label}: the written model fails onnx.checker: simulated")
    with monkeypatch.context() as patch:
        patch.setattr(api, "_check", failing_check)
        with pytest.raises(sg.SparsegraphError, match="simulated"):
            sg.export_onnx(m, inputs, tmp_path / "new.onnx")
    assert not (tmp_path / "new.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary files left

    class DiskFillsUp:  # the disk fills up half-way through writing the temporary file
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    with monkeypatch.context() as patch:
        patch.setattr(api, "open", DiskFillsUp, raising=False)  # what onnx_api's atomic write callback opens
        with pytest.raises(sg.SparsegraphError, match=r"cannot write .*model.onnx: No space left on device$"):
            sg.export_onnx(m, inputs, target)
    assert target.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    with pytest.raises(sg.SparsegraphError, match="unknown lower mode"):
        sg.export_onnx(m, inputs, tmp_path / "x.onnx", lower="tensorrt")


def test_cli_export(models, tmp_path, capsys):
    """A saved sparsegraph model exported from the shell, and a rewrite-then-export in one command."""
    m, inputs = _variant(models, "gpt-mini", "sparse_wide")
    sg.save(m, tmp_path / "wide.sgm")
    out = tmp_path / "wide.onnx"
    assert main(["export", str(tmp_path / "wide.sgm"), "--lower", "ort-block", "--layout", "column", "-o", str(out)]) == 0
    assert "saved to" in capsys.readouterr().out
    assert {c["layout"] for c in sg.onnx.read_lowering(out).values()} == {"column"}
    check_written(out)
    assert sg.onnx.read_lowering(out) and sg.onnx.read_plan(out) == sg.plan_of(m)
    with torch.no_grad():
        assert rel_err(_ort(out, inputs), m(*inputs).numpy()) <= 1e-4
    res = tmp_path / "resnet_par.onnx"
    assert main(["export", "resnet-mini", "--transform", "sparse_parallel", "--sparsity", "0.5", "-o", str(res)]) == 0
    assert sg.onnx.read_plan(res).transform == "sparse_parallel"
    assert main(["export", "gpt-mini", "-o", str(tmp_path / "x.txt")]) == 2
    assert main(["export", str(out), "-o", str(tmp_path / "y.onnx")]) == 2
    assert "already ONNX" in capsys.readouterr().err


def test_export_onnx_is_the_function_whatever_was_imported_first():
    import sparsegraph.onnx.export  # noqa: F401 - binds the submodule on the package

    assert callable(sg.export_onnx) and sg.export_onnx.__name__ == "export_onnx"
    assert sg.onnx.read_plan.__module__ == "sparsegraph.onnx.api"


@pytest.mark.parametrize("split, joined", [([2, 2], True), ([1, 3], False), (None, True)])
def test_split_of_concat_is_its_pieces_only_when_the_sizes_match(split, joined):
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from sparsegraph.onnx.folding import split_concat

    inits = [numpy_helper.from_array(np.array(split, dtype=np.int64), "sizes")] if split else []
    attrs = {"axis": 0} if split else {"axis": 0, "num_outputs": 2}
    graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "b"], ["cat"], axis=0),
         helper.make_node("Split", ["cat", "sizes"] if split else ["cat"], ["p", "q"], **attrs),
         helper.make_node("ReduceSum", ["p"], ["sp"], keepdims=0),
         helper.make_node("ReduceSum", ["q"], ["sq"], keepdims=0),
         helper.make_node("Sub", ["sp", "sq"], ["y"])],
        "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"a": np.random.rand(2, 3).astype(np.float32), "b": np.random.rand(2, 3).astype(np.float32)}
    run = lambda p: ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    model = sg.onnx.load(proto)
    assert split_concat(model) == joined
    after = ir.serde.serialize_model(model)
    ops = {n.op_type for n in after.graph.node}
    assert ("Concat" in ops) != joined and ("Split" in ops) != joined
    np.testing.assert_allclose(run(after), run(proto), rtol=1e-6)
