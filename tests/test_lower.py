"""sg.lower: masked products become sparsegraph::sparse_linear where the cost model says so."""
import pytest
import torch
import torch.nn as nn

import sparsegraph as sg
from sparsegraph.backends import cost_model as cm
from sparsegraph.models import builtin
from sparsegraph.models.gpt import loss_fn
from sparsegraph.nn import LoweredConv2d, LoweredLinear, layer_kind
from sparsegraph.passes.lower import LoweringError, decide

from .onnx_checks import randomize_batch_norms

SPARSE_OP = torch.ops.sparsegraph.sparse_linear.default
CONV_OP = torch.ops.sparsegraph.sparse_conv2d.default


def _ops(gm, target):
    return [n for n in gm.graph.nodes if n.target is target]


@pytest.fixture(scope="module")
def gpt_wide():
    spec = builtin("gpt-mini", n_layer=2)
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:32", seed=1,
                        output="graph")
    return spec, model


def test_lowered_gpt_matches_and_uses_bsr(gpt_wide):
    spec, wide = gpt_wide
    low = sg.lower(wide)
    x = spec.example_inputs[0]
    with torch.no_grad():
        assert torch.allclose(low(x), wide(x), rtol=1e-4, atol=1e-5)
    layers = low.plan.lowering["layers"]
    assert set(layers) == {w.name for w in wide.plan.sparse_weights}
    for name, rec in layers.items():
        assert rec["format"] == "bsr" and rec["block"] == 32 and rec["balanced"], (name, rec)
        assert rec["predicted_speedup"] > 1 / cm.MARGIN and rec["reason"]
        assert rec["rows"] == x.numel()  # judged at the example input's B*T rows
    assert len(_ops(low, SPARSE_OP)) == len(layers)
    params = dict(low.named_parameters())
    assert "h.0.mlp.c_fc.weight" not in params and params["h.0.mlp.c_fc.weight_values"].dim() == 3
    assert not [b for b, _ in low.named_buffers() if b.endswith("_mask")]
    assert wide.plan.lowering == {}  # the input model is untouched
    # any batch size, any sequence length
    x2 = torch.randint(0, 256, (3, 17))
    with torch.no_grad():
        assert torch.allclose(low(x2), wide(x2), rtol=1e-4, atol=1e-5)


def test_lowered_gpt_trains_like_the_masked_model(gpt_wide):
    spec, wide = gpt_wide
    low = sg.lower(wide)
    x = spec.example_inputs[0]
    y = torch.randint(0, 256, x.shape, generator=torch.Generator().manual_seed(0))
    loss_fn(low(x), y).backward()
    wide.zero_grad()
    loss_fn(wide(x), y).backward()
    from sparsegraph.backends.cpu import pack
    for name in low.plan.lowering["layers"]:
        crow, col = (dict(low.named_buffers())[f"{name}_{k}"] for k in ("crow", "col"))
        want = pack(dict(wide.named_parameters())[name].grad, crow, col, 32)  # masked-dense grad, on the blocks
        got = dict(low.named_parameters())[f"{name}_values"].grad
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), name
    wide.zero_grad()


def test_uniform_masks_lower_to_csr_or_stay_dense():
    spec = builtin("gpt-mini", n_layer=1)
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, output="graph")
    low = sg.lower(wide)
    x = spec.example_inputs[0]
    with torch.no_grad():
        assert torch.allclose(low(x), wide(x), rtol=1e-4, atol=1e-5)
    assert "csr" in low.plan.lowering["formats"]  # at 90% the cost model takes CSR for some layers
    for rec in low.plan.lowering["layers"].values():
        assert rec["format"] in ("csr", "dense")  # an unstructured mask is never exactly block-structured
        if rec["format"] == "dense":
            assert rec["reason"].startswith("dense")


def test_sparse_wide_resnet_convs_lower():
    spec = builtin("resnet-mini")
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:8",
                       output="graph").eval()
    g = torch.Generator().manual_seed(0)
    for m in wide.modules():  # non-trivial statistics so every conv matters to the output
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.1 + 0.05)
    low = sg.lower(wide, example_inputs=(torch.randn(16, 1, 16, 16),))
    convs = {k: v for k, v in low.plan.lowering["layers"].items() if v["kind"] == "conv"}
    assert convs and all(v["format"] in ("bsr", "csr", "dense") for v in convs.values())
    lowered = [k for k, v in convs.items() if v["format"] != "dense"]
    assert lowered, convs
    assert len(_ops(low, CONV_OP)) == len(lowered)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        a, b = low(x), wide(x)
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    # for inference, BatchNorm first folds into the masked convs (their masks kept), then the same lowering
    folded = sg.lower(sg.fold(wide, (x,)), example_inputs=(torch.randn(16, 1, 16, 16),))
    norms = lambda gm: [n for n in gm.graph.nodes if n.op == "call_module"  # noqa: E731
                        and "BatchNorm" in type(gm.get_submodule(n.target)).__name__]
    assert norms(wide) and not norms(folded)
    assert len(_ops(folded, CONV_OP)) == len(lowered)
    for name, rec in folded.plan.lowering["layers"].items():
        if rec["kind"] == "conv":
            assert rec["format"] == convs[name]["format"] and rec["density"] == convs[name]["density"], name
    with torch.no_grad():
        c = folded(x)
    assert ((c - b).norm() / b.norm()).item() < 1e-5


def test_target_dense_bakes_masks(gpt_wide):
    spec, wide = gpt_wide
    low = sg.lower(wide, target="dense")
    assert not _ops(low, SPARSE_OP)
    assert not [b for b, _ in low.named_buffers() if b.endswith("_mask")]
    assert all(r["format"] == "dense" for r in low.plan.lowering["layers"].values())
    x = spec.example_inputs[0]
    with torch.no_grad():
        assert torch.allclose(low(x), wide(x), rtol=1e-5, atol=1e-6)


def test_export_of_lowered_model(gpt_wide):
    spec, wide = gpt_wide
    low = sg.lower(wide)
    x = spec.example_inputs[0]
    ep = torch.export.export(low, (x,))
    assert any(n.target is SPARSE_OP for n in ep.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), low(x), rtol=1e-5, atol=1e-6)


def test_export_of_lowered_convs():
    spec = builtin("resnet-mini")
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:8",
                       output="graph").eval()
    low = sg.lower(wide, example_inputs=(torch.randn(16, 1, 16, 16),))
    x = spec.example_inputs[0]
    ep = torch.export.export(low, (x,))
    assert any(n.target is CONV_OP for n in ep.graph.nodes)
    assert torch.allclose(ep.module()(x), low(x), rtol=1e-5, atol=1e-6)


def test_factorized_graph_lowers_u_then_v(monkeypatch):
    """V reads U's output: both products lower, V's op reading U's op."""
    monkeypatch.setattr(cm, "load", _sparse_wins)
    spec = builtin("gpt-mini", n_layer=1)
    fact = sg.sparsify(spec.model, spec.example_inputs, "sparse_factorized", 0.75, mask="balanced_block:16",
                       output="graph")
    low = sg.lower(fact)
    ops = _ops(low, SPARSE_OP)
    assert len(ops) == len(fact.plan.sparse_weights) and any(n.args[0] in ops for n in ops)
    x = spec.example_inputs[0]
    with torch.no_grad():
        assert torch.allclose(low(x), fact(x), rtol=1e-4, atol=1e-5)


def test_decisions_follow_the_cost_model():
    model = cm.load()
    ones = torch.ones(768, 768)
    assert decide("w", "op", "linear", ones, (64, 1), "auto", torch.device("cpu"), model).reason == "mask is all ones"
    bm = torch.zeros(24, 24, dtype=torch.bool)
    for r in range(24):
        bm[r, torch.randperm(24)[:2]] = True
    mask = bm.repeat_interleave(32, 0).repeat_interleave(32, 1)
    c = decide("w", "op", "linear", mask, (64, 1), "auto", torch.device("cpu"), model)
    assert (c.format, c.block, c.balanced) == ("bsr", 32, True)
    assert c.predicted_speedup == pytest.approx(model.linear_dense(64, 768, 768) / model.linear_sparse(
        64, 768, 768, 48, 32), rel=1e-2)
    dense_ish = torch.rand(8, 8) < 0.9  # a tiny, nearly dense layer: the call overhead dominates
    assert decide("w", "op", "linear", dense_ish, (4, 1), "auto", torch.device("cpu"), model).format == "dense"
    tri = decide("w", "op", "linear", mask, (64, 1), "triton", torch.device("cpu"), model)
    assert (tri.format, tri.block) == ("triton", 32)


def test_masks_must_be_binary():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.register_buffer("fc_mask", torch.full((8, 8), 0.5))

        def forward(self, x):
            return nn.functional.linear(x, self.fc.weight * self.fc_mask, self.fc.bias)

    with pytest.raises(LoweringError, match="other than 0 and 1"):
        sg.lower(M(), example_inputs=(torch.randn(2, 8),))


def test_unknown_target(gpt_wide):
    with pytest.raises(LoweringError, match="target"):
        sg.lower(gpt_wide[1], target="gpu")


def test_hf_gpt2_addmm_layers_lower():
    from tests.conftest import hf_model

    model = hf_model("gpt2", n_layer=1, n_embd=256, n_head=4, vocab_size=100, n_positions=64)
    x = torch.randint(0, 100, (4, 32))
    wide = sg.sparsify(model, (x,), "sparse_wide", 0.75, mask="balanced_block:32", output="graph")
    low = sg.lower(wide)
    assert set(low.plan.lowering["formats"]) == {"bsr"}
    with torch.no_grad():
        a, b = low(x), wide(x)
    a, b = (t.logits if hasattr(t, "logits") else t[0] if isinstance(t, (tuple, list)) else t for t in (a, b))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the module form: your own model back, masked layers swapped for sparsegraph.nn.lowered modules
# ---------------------------------------------------------------------------------------------
FAMILIES = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")


def _sparse_wins():
    """A cost model under which every sparse format beats dense, so every masked layer is lowered."""
    fast = 1e18
    return cm.CostModel(c_sparse=0.0, flops_sparse={"10": {"1": {"1": fast}}}, flops_cols={"10": {"1": fast}})


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_lowered(model, low, inputs):
    """`low` = sg.lower(model) on the module form (eval): your class, every sparse weight lowered (the
    dense weight and mask gone), the same function, the masked model's gradients on the stored blocks,
    and after one SGD step on both, still the same function."""
    from sparsegraph.backends.cpu import pack

    assert type(low) is type(model)
    layers = low.plan.lowering["layers"]
    assert set(layers) == {w.name for w in model.plan.sparse_weights}
    assert all(rec["format"] != "dense" for rec in layers.values()), layers
    state = low.state_dict()
    assert not [k for k in state if k.endswith("_mask")]
    assert all(f"{name}_values" in state and name not in state for name in layers)
    with torch.no_grad():
        assert _rel(_logits(low(*inputs)), _logits(model(*inputs))) < 1e-5
    model.zero_grad()
    _logits(low(*inputs)).square().mean().backward()
    _logits(model(*inputs)).square().mean().backward()
    masked, lowered = dict(model.named_parameters()), dict(low.named_parameters())
    for name, rec in layers.items():
        grad = masked[name].grad
        holder = model.get_submodule(name.rpartition(".")[0])
        matrix = grad.t() if layer_kind(holder) == "conv1d_hf" else grad.reshape(grad.shape[0], -1)
        want = pack(matrix, state[f"{name}_crow"], state[f"{name}_col"], rec["block"])
        assert torch.allclose(lowered[f"{name}_values"].grad, want, rtol=1e-4, atol=1e-6), name
    for m in (model, low):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    with torch.no_grad():
        assert _rel(_logits(low(*inputs)), _logits(model(*inputs))) < 1e-5
    model.zero_grad()


@pytest.mark.parametrize("name", ["gpt-mini", "resnet-mini"])
@pytest.mark.parametrize("transform", FAMILIES)
def test_module_form_lowers_every_family(monkeypatch, name, transform):
    monkeypatch.setattr(cm, "load", _sparse_wins)
    spec = builtin("gpt-mini", n_layer=1) if name == "gpt-mini" else builtin("resnet-mini")
    mask = "balanced_block:16" if name == "gpt-mini" else "balanced_block:8"
    model = sg.sparsify(spec.model, spec.example_inputs, transform, 0.75, mask=mask, seed=1).eval()
    randomize_batch_norms(model)
    low = sg.lower(model)
    kinds = {type(m) for m in low.modules()}
    assert (LoweredConv2d if name == "resnet-mini" else LoweredLinear) in kinds or transform == "sparse_doped"
    _check_lowered(model, low, spec.example_inputs)


@pytest.fixture(scope="module")
def gpt_wide_module():
    # s = 0.75: d_model 128 -> 256 (at 0.9 the plan widens attention to 408 but the residual stream to
    # 404, which only the graph form can express)
    spec = builtin("gpt-mini", n_layer=2)
    return spec, sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, mask="balanced_block:32", seed=1)


def test_module_form_lowered_gpt_runs_anywhere(monkeypatch, gpt_wide_module):
    monkeypatch.setattr(cm, "load", _sparse_wins)
    spec, wide = gpt_wide_module
    low = sg.lower(wide)
    assert type(low) is type(wide) and isinstance(low.h[0].mlp.c_fc, LoweredLinear)
    assert isinstance(wide.h[0].mlp.c_fc, nn.Linear) and wide.plan.lowering == {}  # the input is untouched
    x = spec.example_inputs[0]
    for rec in low.plan.lowering["layers"].values():  # judged at the example's B*T rows
        assert (rec["format"], rec["block"], rec["rows"]) == ("bsr", 32, x.numel())
    x2 = torch.randint(0, 256, (3, 17))  # any batch size, any sequence length
    with torch.no_grad():
        assert torch.allclose(low(x2), wide(x2), rtol=1e-4, atol=1e-5)
    ep = torch.export.export(low, (x,))
    assert len(_ops(ep, SPARSE_OP)) == len(low.plan.lowering["layers"])
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), low(x), rtol=1e-5, atol=1e-6)


def test_module_form_target_dense_bakes_masks(gpt_wide_module):
    spec, wide = gpt_wide_module
    low = sg.lower(wide, target="dense")
    assert type(low.h[0].mlp.c_fc) is nn.Linear and not [b for b, _ in low.named_buffers() if b.endswith("_mask")]
    assert all(r["format"] == "dense" for r in low.plan.lowering["layers"].values())
    x = spec.example_inputs[0]
    with torch.no_grad():
        assert torch.allclose(low(x), wide(x), rtol=1e-5, atol=1e-6)


def test_module_form_keeps_weights_read_by_another_forward(monkeypatch):
    """nn.MultiheadAttention reads its own in_proj_weight and out_proj.weight: they stay masked."""
    monkeypatch.setattr(cm, "load", _sparse_wins)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.fc, self.out = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 8)
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.attn(h, h, h, need_weights=False)[0]  # (B, T, 64)
            return self.out(torch.relu(self.fc(h)))

    x = torch.randn(2, 5, 16)
    model = sg.sparsify(Net(), (x,), "sparse_wide", 0.75, mask="balanced_block:16", width=1.0)
    low = sg.lower(model)
    layers = low.plan.lowering["layers"]
    assert layers["fc.weight"]["format"] == "bsr" and isinstance(low.fc, LoweredLinear)
    for name in ("attn.in_proj_weight", "attn.out_proj.weight"):
        assert layers[name]["format"] == "dense", layers[name]
        assert layers[name]["reason"].startswith("kept masked: MaskedMultiheadAttention's own forward"), layers[name]
    with torch.no_grad():
        assert _rel(low(x), model(x)) < 1e-5


def test_module_form_torchvision_resnet18_lowers(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(cm, "load", _sparse_wins)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = sg.sparsify(torchvision.models.resnet18(num_classes=10), (x,), "sparse_wide", 0.75,
                        mask="balanced_block:16").eval()
    randomize_batch_norms(model)
    low = sg.lower(model)
    assert isinstance(low.layer1[0].conv1, LoweredConv2d)
    _check_lowered(model, low, (x,))


@pytest.mark.parametrize("transform", FAMILIES[1:])  # Sparse Wide on GPT-2's module form: tests/test_sparse_ift
def test_module_form_hf_gpt2_lowers(monkeypatch, transform):
    from tests.conftest import hf_model

    monkeypatch.setattr(cm, "load", _sparse_wins)
    dense = hf_model("gpt2", n_layer=1, n_embd=128, n_head=4, vocab_size=100, n_positions=32)
    x = torch.randint(0, 100, (2, 16))
    model = sg.sparsify(dense, (x,), transform, 0.75, mask="balanced_block:16").eval()
    _check_lowered(model, sg.lower(model), (x,))
