"""torch.compile(model, backend="sparsegraph"): lowered graphs, eager-equal outputs and gradients."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import sparsegraph as sg
from sparsegraph.backends import compile as sgc
from sparsegraph.models import builtin
from sparsegraph.models.gpt import loss_fn

from .onnx_checks import randomize_batch_norms
from .test_lower import _sparse_wins

SPARSE = "sparsegraph.sparse_linear"


def _count(graph_module, name):
    return sum(1 for n in graph_module.graph.nodes if name in str(n.target))


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    sgc.LOG.clear()
    yield
    torch._dynamo.reset()


def test_backend_is_registered_by_entry_point():
    assert "sparsegraph" in torch._dynamo.list_backends()


def test_gpt_sparse_wide_matches_eager_with_gradients():
    spec = builtin("gpt-mini", n_layer=2)  # at s = 0.9 attention is wider than the residual stream: graph form only
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:32", seed=2,
                       output="graph")
    fast = torch.compile(wide, backend="sparsegraph")
    x = spec.example_inputs[0]
    y = torch.randint(0, 256, x.shape, generator=torch.Generator().manual_seed(0))
    loss_fn(fast(x), y).backward()
    compiled = _grads(wide)
    wide.zero_grad()
    loss_fn(wide(x), y).backward()
    eager = _grads(wide)
    assert compiled.keys() == eager.keys()
    for k in eager:
        assert torch.allclose(compiled[k], eager[k], rtol=1e-4, atol=1e-6), k
    with torch.no_grad():
        assert torch.allclose(fast(x), wide(x), rtol=1e-4, atol=1e-5)
    entry = next(e for e in sgc.LOG if e["compiled"])
    n_sparse = len(wide.plan.sparse_weights)
    assert entry["lowering"]["formats"] == {"bsr": n_sparse}
    fw, bw = entry["compiled"][:2]  # AOT forward and backward graphs, as Inductor received them
    assert _count(fw, SPARSE + ".default") == n_sparse
    assert _count(bw, "sparse_linear_grad_input") == n_sparse and _count(bw, "sparse_linear_grad_values") == n_sparse


def test_resnet_sparse_wide_matches_eager_with_gradients():
    """The module form (your ResNet, MaskedConv2d layers) through Inductor, in training mode."""
    spec = builtin("resnet-mini")
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:8", seed=2)
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.arange(8) % 10
    eager_model = copy.deepcopy(wide)  # BatchNorm running statistics update in train mode: keep twins
    fast = torch.compile(wide, backend="sparsegraph")
    nn.functional.cross_entropy(fast(x), target).backward()
    nn.functional.cross_entropy(eager_model(x), target).backward()
    compiled, eager = _grads(wide), _grads(eager_model)
    for k in eager:
        assert torch.allclose(compiled[k], eager[k], rtol=1e-3, atol=1e-5), k
    entry = next(e for e in sgc.LOG if e["compiled"])
    convs = [r for r in entry["lowering"]["layers"].values() if r["kind"] == "conv" and r["format"] != "dense"]
    assert convs
    fw, bw = entry["compiled"][:2]
    assert _count(fw, "sparsegraph.sparse_conv2d.default") == len(convs)
    assert _count(bw, "sparse_conv2d_grad_input") >= len(convs) - 1  # the first conv's input needs no gradient
    assert _count(bw, "sparse_conv2d_grad_values") == len(convs)
    wide.eval()
    eager_model.eval()
    with torch.no_grad():
        assert torch.allclose(fast(x), eager_model(x), rtol=1e-4, atol=1e-5)


class _Masked(nn.Module):
    def __init__(self, mask_value=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(512, 512)
        bm = torch.rand(32, 32, generator=g) < 0.1
        mask = bm.repeat_interleave(16, 0).repeat_interleave(16, 1).float()
        if mask_value is not None:
            mask = mask * mask_value
        self.register_buffer("fc_mask", mask)

    def forward(self, x):
        return torch.relu(nn.functional.linear(x, self.fc.weight * self.fc_mask, self.fc.bias))


def test_unlowerable_graph_falls_back_with_one_warning():
    model = _Masked(mask_value=0.5)  # weight * 0.5-valued "mask": not a sparsity pattern
    fast = torch.compile(model, backend="sparsegraph")
    x = torch.randn(4, 512)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fast(x)
        out2 = fast(x)
    msgs = [str(r.message) for r in rec if "sparsegraph backend" in str(r.message)]
    assert len(msgs) == 1 and "other than 0 and 1" in msgs[0] and "fc_mask" in msgs[0], msgs
    assert torch.allclose(out, model(x)) and torch.allclose(out2, out)


def test_changed_masks_are_relowered():
    model = _Masked()
    fast = torch.compile(model, backend=sgc.make_backend("cpu", compiler=lambda gm, inputs, record: gm))
    x = torch.randn(64, 512)
    assert torch.allclose(fast(x), model(x), atol=1e-5)
    assert sgc.LOG[-1]["lowering"]["formats"] == {"bsr": 1}
    compiled = len(sgc.LOG)
    with torch.no_grad():  # a dynamic-sparse-training update, in place: another 10% block pattern
        model.fc_mask.copy_(torch.roll(model.fc_mask, 16, 1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = fast(x)
    assert any("masks changed" in str(r.message) for r in rec)
    assert len(sgc.LOG) == compiled + 1 and sgc.LOG[-1]["lowering"]["formats"] == {"bsr": 1}  # re-lowered, sparse
    assert torch.allclose(y, model(x), atol=1e-5)
    assert torch.allclose(fast(x), model(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the module form, every family: Dynamo hands the backend each layer's weight * mask
# ---------------------------------------------------------------------------------------------
FAMILIES = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
EAGER = sgc.make_backend("auto", compiler=lambda gm, inputs, record: gm)  # lowered, then run without Inductor


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _check_compiled(model, inputs, backend=EAGER):
    """torch.compile(model) (eval mode) against a copy run eagerly: outputs, every parameter's
    gradient, and every sparse weight lowered in the graphs the backend received."""
    eager = copy.deepcopy(model)
    fast = torch.compile(model, backend=backend)
    a, b = _logits(fast(*inputs)), _logits(eager(*inputs))
    assert torch.allclose(a.detach(), b.detach(), rtol=1e-4, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    compiled, want = _grads(model), _grads(eager)
    assert compiled.keys() == want.keys()
    for k in want:
        assert torch.allclose(compiled[k], want[k], rtol=1e-4, atol=1e-6), k
    records = [r for e in sgc.LOG for r in e["lowering"]["layers"].values()]  # each compilation's choices
    assert all(r["format"] != "dense" for r in records), records
    assert {r["weight"] for r in records} == {w.name for w in sg.plan_of(model).sparse_weights}


@pytest.mark.parametrize("name", ["gpt-mini", "resnet-mini"])
@pytest.mark.parametrize("transform", FAMILIES)
def test_module_form_families_match_eager(monkeypatch, name, transform):
    from sparsegraph.backends import cost_model

    monkeypatch.setattr(cost_model, "load", _sparse_wins)
    spec = builtin("gpt-mini", n_layer=1) if name == "gpt-mini" else builtin("resnet-mini")
    mask = "balanced_block:16" if name == "gpt-mini" else "balanced_block:8"
    model = sg.sparsify(spec.model, spec.example_inputs, transform, 0.75, mask=mask, seed=1).eval()
    randomize_batch_norms(model)
    _check_compiled(model, spec.example_inputs)


def test_module_form_torchvision_resnet18(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    from sparsegraph.backends import cost_model

    monkeypatch.setattr(cost_model, "load", _sparse_wins)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = sg.sparsify(torchvision.models.resnet18(num_classes=10), (x,), "sparse_doped", 0.75,
                        mask="balanced_block:16").eval()
    randomize_batch_norms(model)
    _check_compiled(model, (x,))


def test_module_form_hf_gpt2(monkeypatch):
    from sparsegraph.backends import cost_model
    from tests.conftest import hf_model

    monkeypatch.setattr(cost_model, "load", _sparse_wins)
    dense = hf_model("gpt2", n_layer=1, n_embd=128, n_head=4, vocab_size=100, n_positions=32)
    x = torch.randint(0, 100, (2, 16))
    _check_compiled(sg.sparsify(dense, (x,), "sparse_parallel", 0.75, mask="balanced_block:16").eval(), (x,))
