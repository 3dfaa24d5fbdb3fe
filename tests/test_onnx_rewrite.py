"""Sparse-IFT rewrites, folding and lowering on ONNX graphs (sg.onnx), checked against PyTorch and numpy.

The reference for an ONNX-side rewrite is the PyTorch-side rewrite of the same model with the same
seed: same weight shapes, FLOPs and dimension-group sizes. With init="keep" both keep the dense
model's unchanged weights and draw new ones from the same (seed, name) streams, so the two are the
same function and ONNX Runtime must reproduce the PyTorch output. Every file written is checked
with `check_written`: `onnx.checker.check_model(path, full_check=True)` as written (sparse
weights are stored as `Constant(sparse_value)` nodes, which strict shape inference types; a
`sparse_initializer` read by a standard op it cannot, see
test_sparse_weights_are_written_so_the_full_check_passes).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import sparsegraph as sg
from sparsegraph.cli import main
from sparsegraph.dims import analyze_dims
from sparsegraph.models import builtin
from sparsegraph.onnx.lowering import LAYOUTS, BlockSparseMatMulPass, block_layout, pack_blocks

from .onnx_checks import check_written, randomize_batch_norms, rel_err

FAMILIES = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")


@pytest.fixture(scope="module")
def dense_exports(tmp_path_factory):
    """Dense exports (unoptimised, BatchNorm kept) of the small built-ins, with their captures."""
    folder = tmp_path_factory.mktemp("onnx_rewrite")
    out = {}
    for name, kw in (("gpt-mini", {"n_layer": 2}), ("resnet-mini", {})):
        spec = builtin(name, **kw)
        randomize_batch_norms(spec.model)
        spec.model.eval()
        path = sg.export_onnx(spec.model, spec.example_inputs, folder / f"{name}.onnx", optimize=False)
        out[name] = (spec, sg.capture(spec.model, spec.example_inputs), path, folder)
    return out


# ---------------------------------------------------------------------------------------------
# ONNX-side rewrite == PyTorch-side rewrite
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["gpt-mini", "resnet-mini"])
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_rewrite_matches_pytorch_rewrite(dense_exports, model, family):
    spec, graph, path, folder = dense_exports[model]
    mask = "balanced_block:8"
    out = folder / f"{model}_{family}.onnx"
    onnx_model = sg.onnx.sparsify(path, family, 0.75, mask=mask, seed=3, init="keep", output=out)
    torch_model = sg.sparsify(spec.model, spec.example_inputs, family, 0.75, mask=mask, seed=3, init="keep",
                              graph=graph).eval()
    check_written(out)
    onnx_plan, torch_plan = sg.onnx.read_plan(out), torch_model.plan
    assert sg.onnx.read_plan(onnx_model) == onnx_plan

    # weight shapes, densities and families, by name (a GPT bias is a separate Add in ONNX, so its
    # `part` is "other" there: the capture does not tie it to its MatMul)
    onnx_w = {w.name: (w.shape, round(w.density, 6), w.family) for w in onnx_plan.weights}
    torch_w = {w.name: (w.shape, round(w.density, 6), w.family) for w in torch_plan.weights}
    assert set(onnx_w) == set(torch_w)
    assert onnx_w == torch_w
    # FLOPs of the written file, analysed from scratch, and of the plans
    onnx_report = sg.analyze(str(out))
    torch_report = sg.analyze(torch_model, spec.example_inputs)
    assert onnx_report.dense_flops == torch_report.dense_flops
    assert onnx_report.sparse_flops == torch_report.sparse_flops
    assert onnx_plan.totals == torch_plan.totals
    assert onnx_report.plan == onnx_plan.to_dict()
    # dimension groups of the rewritten graphs
    sizes = lambda g: sorted(sorted(set(grp.sizes.values())) for grp in analyze_dims(g).widenable)  # noqa: E731
    assert sizes(onnx_report.graph) == sizes(torch_report.graph)
    # the same function: ONNX Runtime on the ONNX rewrite == PyTorch on the PyTorch rewrite
    x = [t.numpy() for t in spec.example_inputs]
    with torch.no_grad():
        expected = torch_model(*spec.example_inputs).numpy()
    assert rel_err(sg.onnx.Session(out)(*x), expected) <= 1e-4


def test_attention_scale_folded_by_the_exporter(tmp_path):
    """The optimised export folds SDPA's 1/sqrt(head_dim) into scalar constants (q * d^-1/4, k * d^-1/4);
    widening the heads must patch them (unoptimised exports compute them from Shape at run time)."""
    spec = builtin("gpt-mini", n_layer=1)
    spec.model.eval()
    path = sg.export_onnx(spec.model, spec.example_inputs, tmp_path / "gpt_opt.onnx")
    wide = sg.onnx.sparsify(path, "sparse_wide", 0.75, seed=0, init="keep")
    cfg = spec.model.cfg
    old_dim = cfg.n_embd // cfg.n_head  # 32
    new_dims = {g.unit[1] for g in sg.onnx.read_plan(wide).groups if g.unit[0] == old_dim}  # q~k, v
    assert new_dims and min(new_dims) > old_dim
    scalars = lambda m: [float(v.const_value.numpy().reshape(-1)[0]) for v in m.graph.initializers.values()  # noqa: E731
                         if v.const_value is not None and v.const_value.size == 1]
    assert any(np.isclose(s, old_dim ** -0.25, rtol=1e-6) for s in scalars(sg.onnx.load(path)))
    assert not any(np.isclose(s, old_dim ** -0.25, rtol=1e-6) for s in scalars(wide))
    assert any(np.isclose(s, d ** -0.25, rtol=1e-6) for s in scalars(wide) for d in new_dims)
    torch_wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, seed=0, init="keep").eval()
    with torch.no_grad():
        expected = torch_wide(*spec.example_inputs).numpy()
    assert rel_err(sg.onnx.Session(wide)(spec.example_inputs[0].numpy()), expected) <= 1e-4


def test_dynamic_batch_reshapes_are_patched(tmp_path):
    """With symbolic batch and sequence, view shapes are Concat(Shape(...), constants): the constant
    pieces are patched, and the rewritten model runs at other batch sizes."""
    spec = builtin("gpt-mini", n_layer=1)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=128)}
    path = sg.export_onnx(spec.model, spec.example_inputs, tmp_path / "dyn.onnx", optimize=False,
                          dynamic_shapes=(dims,))
    wide = sg.onnx.sparsify(path, "sparse_wide", 0.5, seed=0, input_shapes={"idx": (2, 64)},
                            output=tmp_path / "dyn_wide.onnx")
    check_written(tmp_path / "dyn_wide.onnx")
    s = sg.onnx.Session(wide)
    for shape in ((1, 8), (3, 64)):
        assert s(np.zeros(shape, np.int64)).shape == (*shape, 256)


# ---------------------------------------------------------------------------------------------
# folding: exact algebra, checked against the unfolded model; never more expensive
# ---------------------------------------------------------------------------------------------
def test_fold_batch_norm_branches_and_low_rank(dense_exports):
    """ResNet exported without the exporter's BN folding: BN into Conv, per-branch BN then the
    Sparse Parallel sum, U then V, S + U.V all fold back to the dense model's convolutions."""
    spec, graph, _, folder = dense_exports["resnet-mini"]
    dense_convs = sum(n.op_type == "Conv" for n in sg.onnx.load(dense_exports["resnet-mini"][2]).graph)
    for family in ("sparse_parallel", "sparse_factorized", "sparse_doped"):
        m = sg.sparsify(spec.model, spec.example_inputs, family, 0.5, mask="uniform", graph=graph)
        randomize_batch_norms(m)
        m.eval()
        path = sg.export_onnx(m, spec.example_inputs, folder / f"fold_{family}.onnx", optimize=False)
        assert any(n.op_type == "BatchNormalization" for n in sg.onnx.load(path).graph)
        folded = sg.onnx.fold(path, output=folder / f"fold_{family}_folded.onnx")
        check_written(folder / f"fold_{family}_folded.onnx")
        ops = [n.op_type for n in folded.graph]
        assert "BatchNormalization" not in ops and ops.count("Conv") == dense_convs, family
        x = spec.example_inputs[0].numpy()
        assert rel_err(sg.onnx.Session(folded)(x), sg.onnx.Session(path)(x)) <= 1e-5
        assert sg.analyze(folded).dense_flops == sg.analyze(spec.model, spec.example_inputs).dense_flops


def _graph(nodes, inits, x_shape, y="y", opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _w(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def test_fold_keeps_cheaper_chains_and_nonlinear_ones():
    """x (8) -> 2 -> 8 is a real bottleneck (32 multiply-adds vs 64 folded): kept. U -> Relu -> V
    cannot fold. Parallel MatMuls of one input with a bias fold into one MatMul + Add."""
    bottleneck = _graph([helper.make_node("MatMul", ["x", "u"], ["h"]), helper.make_node("MatMul", ["h", "v"], ["y"])],
                        [_w("u", (8, 2)), _w("v", (2, 8), 1)], [3, 8])
    assert [n.op_type for n in sg.onnx.fold(bottleneck).graph] == ["MatMul", "MatMul"]
    relu = _graph([helper.make_node("MatMul", ["x", "u"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                   helper.make_node("MatMul", ["r", "v"], ["y"])], [_w("u", (8, 16)), _w("v", (16, 8), 1)], [3, 8])
    assert [n.op_type for n in sg.onnx.fold(relu).graph] == ["MatMul", "Relu", "MatMul"]
    parallel = _graph([helper.make_node("MatMul", ["x", "a"], ["p"]), helper.make_node("Add", ["p", "b"], ["q"]),
                       helper.make_node("Gemm", ["x", "c"], ["r"], transB=1), helper.make_node("Add", ["q", "r"], ["y"])],
                      [_w("a", (8, 6)), _w("b", (6,), 1), _w("c", (6, 8), 2)], [3, 8])
    folded = sg.onnx.fold(parallel)
    assert [n.op_type for n in folded.graph] == ["MatMul", "Add"]
    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    a, b, c = (numpy_helper.to_array(t) for t in parallel.graph.initializer)
    np.testing.assert_allclose(sg.onnx.Session(folded)(x), x @ a + b + x @ c.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["fold", "ort-block"])
def test_gemm_alpha_beta_and_transposes(target):
    """Gemm(x, B, C, transB=1, alpha, beta) = alpha x B^T + beta C, read the same way by fold and lower."""
    from sparsegraph.masks import make_mask

    B = (np.random.default_rng(3).standard_normal((64, 96)) *
         make_mask("balanced_block:16", (64, 96), 0.25, seed=0, name="b").numpy()).astype(np.float32)
    C = np.random.default_rng(4).standard_normal(64).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "b", "c"], ["g"], transB=1, alpha=0.5, beta=2.0)]
    inits = [numpy_helper.from_array(B, "b"), numpy_helper.from_array(C, "c")]
    if target == "fold":  # a second, parallel Gemm on the same input: folds into one
        nodes += [helper.make_node("Gemm", ["x", "b2"], ["h"], transB=1, alpha=3.0),
                  helper.make_node("Add", ["g", "h"], ["y"])]
        inits.append(numpy_helper.from_array(B[::-1].copy(), "b2"))
    else:
        nodes[0].output[0] = "y"
    m = _graph(nodes, inits, [5, 96])
    out = sg.onnx.fold(m) if target == "fold" else sg.onnx.lower(m, "ort-block")
    ops = [n.op_type for n in out.graph]
    assert ops.count("Gemm") + ops.count("MatMul") == 1 and ("Gather" in ops) == (target == "ort-block")
    x = np.random.default_rng(5).standard_normal((5, 96)).astype(np.float32)
    expected = 0.5 * x @ B.T + 2.0 * C + (3.0 * x @ B[::-1].T if target == "fold" else 0)
    np.testing.assert_allclose(sg.onnx.Session(out)(x), expected, rtol=1e-4, atol=1e-4)


def test_fold_keeps_the_output_rank():
    """A constant with more axes than the input (1, 1, N) is not a per-channel bias: folding it
    into one MatMul + Add((N,)) would drop the broadcast axis, so that chain stays unfolded."""
    parallel = _graph([helper.make_node("MatMul", ["x", "a"], ["p"]), helper.make_node("MatMul", ["x", "c"], ["q"]),
                       helper.make_node("Add", ["p", "q"], ["r"]), helper.make_node("Add", ["r", "k"], ["y"])],
                      [_w("a", (8, 6)), _w("c", (8, 6), 2), _w("k", (1, 1, 6), 3)], [3, 8])
    folded = sg.onnx.fold(parallel)  # checked on writing: a rank change fails onnx.checker
    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    a, c, k = (numpy_helper.to_array(t) for t in parallel.graph.initializer)
    y = sg.onnx.Session(folded)(x)
    assert y.shape == (1, 3, 6)
    np.testing.assert_allclose(y, x @ a + x @ c + k, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ort-block lowering against numpy
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,N,b,balanced", [(96, 64, 32, True), (100, 70, 16, False), (64, 64, 8, True),
                                             (40, 45, 16, True)])
def test_block_sparse_matmul_matches_numpy(K, N, b, balanced):
    """Gather + batched MatMul == x @ W for block-sparse W in every layout, ragged edges (100 x 70 at
    b=16, 40 x 45 at b=16 with one block per column: Pad and Slice), unbalanced block-columns
    (padded with zero blocks) with an empty one, at a symbolic batch size."""
    from sparsegraph.masks import make_mask

    kind = f"{'balanced_block' if balanced else 'block'}:{b}"
    mask = make_mask(kind, (N, K), 0.25, seed=1, name="w").numpy()  # PyTorch layout (out, in)
    if not balanced:
        mask[b:2 * b] = 0  # an empty block-row of the PyTorch weight: its outputs are the bias alone (here 0)
    W = (np.random.default_rng(2).standard_normal((N, K)) * mask).astype(np.float32)
    m = _graph([helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
               [numpy_helper.from_array(W, "w")], ["B", 5, K])
    lowered = sg.onnx.lower(m, "ort-block", block=b)
    choice = sg.onnx.read_lowering(lowered)["w"]
    idx, r = block_layout(np.pad(W.T, ((0, -K % b), (0, -N % b))), b)
    assert choice["block"] == b and choice["blocks_per_column"] == r
    assert choice["layout"] == ("blocks" if r == 1 else "rows")  # auto, rows unknown (symbolic batch)
    assert not any(n.op_type == "MatMul" and n.inputs[1].name == "wt" for n in lowered.graph)
    if balanced and K % b == 0:  # every block-column reads the same number of blocks: nothing padded
        assert r * b / K == pytest.approx(float(np.count_nonzero(W)) / W.size, rel=0.05)
    for layout in LAYOUTS:
        model = sg.onnx.lower(m, "ort-block", block=b, layout=layout)
        assert sg.onnx.read_lowering(model)["w"]["layout"] == layout
        s = sg.onnx.Session(model)
        for batch in (1, 4):
            x = np.random.default_rng(batch).standard_normal((batch, 5, K)).astype(np.float32)
            np.testing.assert_allclose(s(x), x @ W.T, rtol=1e-4, atol=1e-4, err_msg=layout)


def test_blocks_layout_gathers_contiguous_blocks():
    """One block per output block-column: x as (Kb, M, b), one Gather of whole blocks and one
    MatMul, no ReduceSum; forced with more blocks per column, a ReduceSum over them."""
    from sparsegraph.masks import make_mask

    W = (np.random.default_rng(3).standard_normal((64, 128)) *
         make_mask("balanced_block:32", (64, 128), 0.25, seed=0, name="w").numpy()).astype(np.float32)
    m = _graph([helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
               [numpy_helper.from_array(W, "w")], [6, 128])
    one = sg.onnx.lower(m, "ort-block")
    assert sg.onnx.read_lowering(one)["w"]["layout"] == "blocks"
    ops = [n.op_type for n in one.graph]
    assert ops.count("Gather") == 1 and ops.count("MatMul") == 1 and "ReduceSum" not in ops
    gather = next(n for n in one.graph if n.op_type == "Gather")
    assert gather.attributes["axis"].value == 0 and list(gather.outputs[0].shape) == [2, 6, 32]
    two = sg.onnx.lower(m, "ort-block", block=16, layout="blocks")  # 16-blocks: 2 per column
    assert sg.onnx.read_lowering(two)["w"]["blocks_per_column"] == 2
    assert "ReduceSum" in [n.op_type for n in two.graph]
    x = np.random.default_rng(4).standard_normal((6, 128)).astype(np.float32)
    for model in (one, two):
        np.testing.assert_allclose(sg.onnx.Session(model)(x), x @ W.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(sg.SparsegraphError, match="unknown ort-block layout 'diagonal'; choose from auto, rows, "
                                                  "blocks, column"):
        sg.onnx.lower(m, "ort-block", layout="diagonal")


def _mlp(between, d=64, hidden=160, x_shape=(3, 7, 64), seed=0):
    """x -> MatMul(W1) + b1 -> `between` nodes (reading "h", writing "a") -> MatMul(W2) + b2, both
    weights balanced block-16 (hidden = 160: 10 blocks), as exported linears are."""
    from sparsegraph.masks import make_mask

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((hidden, d)) * make_mask("balanced_block:16", (hidden, d), 0.25, seed=0, name="w1").numpy()
    w2 = rng.standard_normal((d, hidden)) * make_mask("balanced_block:16", (d, hidden), 0.2, seed=0, name="w2").numpy()
    inits = [numpy_helper.from_array(w1.T.astype(np.float32), "w1"), numpy_helper.from_array(w2.T.astype(np.float32), "w2"),
             _w("b1", (hidden,), 1), _w("b2", (d,), 2), numpy_helper.from_array(np.float32(0.5), "half")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]), *between,
             helper.make_node("MatMul", ["a", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["y"])]
    return _graph(nodes, inits, list(x_shape), opset=20)


@pytest.mark.parametrize("between, handed", [
    ([helper.make_node("Gelu", ["h"], ["g"]), helper.make_node("Mul", ["g", "half"], ["a"])], True),
    ([helper.make_node("Relu", ["h"], ["a"])], True),
    ([helper.make_node("Sub", ["half", "h"], ["a"])], True),  # the constant first: operand order kept
    ([helper.make_node("Softmax", ["h"], ["a"], axis=-1)], False),  # mixes features: stays in row layout
    ([helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Add", ["r", "h"], ["a"])], False)])  # h read twice
def test_block_major_output_handed_to_the_next_layer(between, handed):
    """A layer fed by another lowered layer through elementwise ops (bias, GELU, a scale) reads its
    block-major output directly: no Transpose between the two MatMuls; the result is unchanged."""
    m = _mlp(between)
    lowered = sg.onnx.lower(m, "ort-block")
    choices = sg.onnx.read_lowering(lowered)
    assert choices["w2"].get("input_from") == ("w1" if handed else None)
    assert choices["w1"]["layout"] == "blocks" and choices["w2"]["blocks_per_column"] == 2
    assert choices["w2"]["layout"] == ("blocks" if handed else "rows")
    ops = [n.op_type for n in lowered.graph]
    # w1 (one block per column: blocks) transposes x in and yb out, w2 (rows) its gathered blocks and yb;
    # handed over, only w1's input and w2's output Transposes are left
    assert ops.count("Transpose") == (2 if handed else 4), ops
    x = np.random.default_rng(5).standard_normal((3, 7, 64)).astype(np.float32)
    np.testing.assert_allclose(sg.onnx.Session(lowered)(x), sg.onnx.Session(m)(x), rtol=1e-4, atol=1e-4)


def test_no_hand_over_with_a_symbolic_batch_or_a_fixed_layout():
    """The hand-over needs static leading sizes and the automatic layout choice."""
    between = [helper.make_node("Relu", ["h"], ["a"])]
    for model, kw in ((_mlp(between, x_shape=("B", 7, 64)), {}), (_mlp(between), {"layout": "rows"})):
        lowered = sg.onnx.lower(model, "ort-block", **kw)
        assert not any("input_from" in c for c in sg.onnx.read_lowering(lowered).values())
        x = np.random.default_rng(6).standard_normal((3, 7, 64)).astype(np.float32)
        np.testing.assert_allclose(sg.onnx.Session(lowered)(x), sg.onnx.Session(model)(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["ort-block", "ort-sparse"])
def test_single_row_needs_no_transpose(target):
    """With one static row (batch 1, GEMV) the transposes of x and y are Reshapes (no copies)."""
    from sparsegraph.masks import make_mask

    W = (np.random.default_rng(3).standard_normal((64, 96)) *
         make_mask("balanced_block:16", (64, 96), 0.25, seed=0, name="w").numpy()).astype(np.float32)
    m = _graph([helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
               [numpy_helper.from_array(W, "w")], [1, 96])
    lowered = sg.onnx.lower(m, target)
    ops = [n.op_type for n in lowered.graph]
    assert "Transpose" not in ops and ops.count("Reshape") >= 2
    x = np.random.default_rng(4).standard_normal((1, 96)).astype(np.float32)
    np.testing.assert_allclose(sg.onnx.Session(lowered)(x), x @ W.T, rtol=1e-4, atol=1e-4)


def test_ort_sparse_with_a_symbolic_batch_is_analysed():
    """SparseToDenseMatMul is outside ONNX's shape inference; capture gives it a MatMul's shapes."""
    from sparsegraph.masks import make_mask

    W = (np.random.default_rng(3).standard_normal((64, 96)) *
         make_mask("balanced_block:16", (64, 96), 0.25, seed=0, name="w").numpy()).astype(np.float32)
    m = _graph([helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
               [numpy_helper.from_array(W, "w")], ["B", 96])
    lowered = sg.onnx.lower(m, "ort-sparse")
    assert "SparseToDenseMatMul" in [n.op_type for n in lowered.graph]
    report = sg.analyze(lowered)
    assert report.graph.shape(report.graph.outputs[0])[-1] == 64
    x = np.random.default_rng(4).standard_normal((5, 96)).astype(np.float32)
    np.testing.assert_allclose(sg.onnx.Session(lowered)(x), x @ W.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(sg.SparsegraphError, match=r"max_density must be in \(0, 1\], got 1.5"):
        sg.onnx.lower(m, "ort-block", max_density=1.5)


def test_pack_blocks_layout():
    """Wp[n] stacks the nonzero blocks of block-column n in idx order."""
    W = np.arange(16 * 8, dtype=np.float64).reshape(16, 8) * (np.kron(np.array([[1, 0], [0, 1], [1, 1], [0, 0]]),
                                                                     np.ones((4, 4))))
    idx, r = block_layout(W, 4)
    assert r == 2 and idx.tolist() == [[0, 2], [1, 2]]
    Wp = pack_blocks(W, idx, 4)  # (Nb, r*b, b)
    np.testing.assert_array_equal(Wp[1, :4], W[4:8, 4:8])
    np.testing.assert_array_equal(Wp[1, 4:], W[8:12, 4:8])


def test_dense_weights_are_left_alone():
    m = _graph([helper.make_node("MatMul", ["x", "w"], ["y"])], [_w("w", (64, 64))], [2, 64])
    lowered = BlockSparseMatMulPass()(sg.onnx.load(m).clone()).model
    assert [n.op_type for n in lowered.graph] == ["MatMul"]


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def test_cli_rewrite_and_lower_onnx(dense_exports, capsys):
    spec, _, path, folder = dense_exports["gpt-mini"]
    out, low = folder / "cli_wide.onnx", folder / "cli_wide_block.onnx"
    assert main(["rewrite", str(path), "--sparsity", "0.9", "--mask", "balanced_block:32", "-o", str(out)]) == 0
    assert "saved to" in capsys.readouterr().out
    assert main(["lower", str(out), "--target", "ort-block", "-o", str(low)]) == 0
    text = capsys.readouterr().out
    assert "ort-block" in text and "h.0.mlp.c_fc.weight" in text
    dense = folder / "cli_wide_dense.onnx"
    assert main(["lower", str(out), "--target", "fold", "--dense-initializers", "-o", str(dense)]) == 0
    for p in (out, low, dense):
        check_written(p)
    def sparse_constants(p):
        return {n.output[0] for n in onnx.load(str(p)).graph.node if n.op_type == "Constant"
                and n.attribute[0].name == "sparse_value"}
    assert "h.0.mlp.c_fc.weight" in sparse_constants(out)  # 90% sparse: stored sparse
    assert not sparse_constants(dense)  # every weight a dense initializer
    assert "h.0.mlp.c_fc.weight" in {t.name for t in onnx.load(str(dense)).graph.initializer}
    x = spec.example_inputs[0].numpy()
    assert rel_err(sg.onnx.Session(low)(x), sg.onnx.Session(out)(x)) <= 1e-4
    assert rel_err(sg.onnx.Session(dense)(x), sg.onnx.Session(out)(x)) <= 1e-4
    assert sg.analyze(str(low)).plan == sg.onnx.read_plan(out).to_dict()


def test_sparse_weights_are_written_so_the_full_check_passes(tmp_path):
    """ONNX's full check cannot type a sparse initializer read by MatMul (ONNX Runtime runs the model).
    sg.onnx reads such a file and writes the weight as a Constant(sparse_value), which passes
    `check_model(path, full_check=True)` as written, runs in ONNX Runtime and reads back the same."""
    W = np.zeros((16, 12), np.float32)
    W[0, 1], W[5, 7], W[15, 11] = 2.0, -1.0, 0.5
    idx = np.flatnonzero(W).astype(np.int64)
    sp = helper.make_sparse_tensor(numpy_helper.from_array(W.reshape(-1)[idx], "w"),
                                   numpy_helper.from_array(idx, "w_idx"), [16, 12])
    m = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
                                            sparse_initializer=[sp]),
                          opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    with pytest.raises(Exception, match="wrong rank"):
        onnx.checker.check_model(m, full_check=True)
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    np.testing.assert_allclose(sg.onnx.Session(m)(x), x @ W)
    path = sg.onnx.save(sg.onnx.load(m), tmp_path / "sparse.onnx")
    check_written(path)
    written = onnx.load(path)
    assert [n.op_type for n in written.graph.node] == ["Constant", "MatMul"]
    assert written.graph.node[0].attribute[0].name == "sparse_value"
    np.testing.assert_allclose(sg.onnx.Session(path)(x), x @ W)
    np.testing.assert_array_equal(sg.onnx.load(path).graph.initializers["w"].const_value.numpy(), W)
    dense = sg.onnx.save(sg.onnx.load(m), tmp_path / "dense.onnx", sparse_initializers=False)
    onnx.checker.check_model(dense, full_check=True)
    assert [t.name for t in onnx.load(dense).graph.initializer] == ["w"]


# ---------------------------------------------------------------------------------------------
# bad input: one clear line, nothing written
# ---------------------------------------------------------------------------------------------
def _conv_model(weight_is_input: bool, opset: int = 17):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    inputs = [x] + ([helper.make_tensor_value_info("w2", TensorProto.FLOAT, [8, 8, 3, 3])] if weight_is_input else [])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["a"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w3"], ["y"], pads=[1, 1, 1, 1], name="conv3")]
    inits = [_w("w1", (8, 4, 3, 3)), _w("w3", (4, 8, 3, 3), 2)] + ([] if weight_is_input else [_w("w2", (8, 8, 3, 3), 1)])
    g = helper.make_graph(nodes, "convs", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_bad_onnx_inputs(tmp_path, capsys):
    good = _conv_model(False)
    assert sg.onnx.sparsify(good, "sparse_wide", 0.5).graph.initializers["w2"].const_value.shape[0] > 8
    data = good.SerializeToString()
    corrupt, truncated = tmp_path / "corrupt.onnx", tmp_path / "truncated.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    truncated.write_bytes(data[:len(data) // 2])
    old_opset, weight_input = tmp_path / "opset11.onnx", tmp_path / "weight_input.onnx"
    onnx.save(_conv_model(False, opset=11), old_opset)
    onnx.save(_conv_model(True), weight_input)
    cases = [(corrupt, "not a valid ONNX model"), (truncated, "truncated or corrupt"),
             (old_opset, "opset 11 is not supported"), (weight_input, "conv2.*graph input, not an initializer")]
    for src, match in cases:
        out = tmp_path / f"out_{src.stem}.onnx"
        calls = [lambda: sg.onnx.sparsify(str(src), "sparse_wide", 0.5, output=out)]
        if src != weight_input:  # lowering leaves a Conv with a run-time weight alone: nothing wrong there
            calls.append(lambda: sg.onnx.lower(str(src), "ort-block", output=out))
        for call in calls:
            with pytest.raises(sg.SparsegraphError, match=match) as info:
                call()
            assert "\n" not in str(info.value)
            assert not out.exists()
        for command in ("rewrite",) + (("lower",) if src != weight_input else ()):
            assert main([command, str(src), "-o", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "error:" in err and not out.exists()
            assert src.name in err or src == weight_input  # the message names the file
    assert list(p.name for p in tmp_path.iterdir() if p.name.startswith(".sparsegraph-")) == []


def test_unknown_target_and_wrong_output(dense_exports, tmp_path, capsys):
    _, _, path, _ = dense_exports["gpt-mini"]
    with pytest.raises(sg.SparsegraphError, match="unknown lowering target"):
        sg.onnx.lower(path, "tensorrt")
    for block in (0, -8, 2.5, True):
        with pytest.raises(sg.SparsegraphError, match=f"block must be a positive integer, got {block!r}"):
            sg.onnx.lower(path, "ort-block", block=block)
    assert main(["rewrite", str(path), "-o", str(tmp_path / "x.sgm")]) == 2
    assert "ending in .onnx" in capsys.readouterr().err
    assert main(["lower", "gpt-mini", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "sparsegraph export gpt-mini" in capsys.readouterr().err
