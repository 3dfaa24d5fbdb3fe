"""Fold passes: folded models compute the unfolded function (eval) and have the dense architecture."""
import pytest
import torch
import torch.nn as nn

import sparsegraph as sg
from sparsegraph.models import builtin
from sparsegraph.nn import SparseFactorized


def _spec(name):
    return builtin("gpt-mini", n_layer=2) if name == "gpt-mini" else builtin(name)


_CACHE = {}


def _captured(name):
    """(spec, captured graph, parameter shapes of the folded dense original), once per model."""
    if name not in _CACHE:
        spec = _spec(name)
        dense = sg.fold(spec.model.eval(), spec.example_inputs)
        _CACHE[name] = (spec, sg.capture(spec.model, spec.example_inputs), _shapes(dense))
    return _CACHE[name]


def _randomise_norms(model):
    """Non-trivial BatchNorm statistics and affine terms, so folding them is really tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", ["resnet-mini", "gpt-mini"])
@pytest.mark.parametrize("transform", ["sparse_parallel", "sparse_factorized", "sparse_doped"])
def test_fold_matches_and_restores_dense_architecture(name, transform):
    spec, graph, dense_shapes = _captured(name)
    model = sg.sparsify(spec.model, spec.example_inputs, transform, 0.75, seed=3, graph=graph, output="graph").eval()
    _randomise_norms(model)
    folded = sg.fold(model)
    assert isinstance(folded, torch.fx.GraphModule)
    x = spec.example_inputs[0]
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5
    # the dense original, with its own BatchNorms folded, has exactly these parameters
    assert _shapes(folded) == dense_shapes
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert not [b for b, _ in folded.named_buffers() if b.endswith("_mask")]
    if name == "gpt-mini":  # no BatchNorm: the very parameters of the dense original
        assert _shapes(folded) == _shapes(spec.model)
    rules = set(folded.plan.lowering["fold"]["rules"])
    assert {"sparse_parallel": "sum", "sparse_factorized": "compose", "sparse_doped": "compose"}[transform] in rules
    assert model.plan.lowering == {}  # the input model and its plan are untouched


def test_sparse_wide_keeps_masks_through_batchnorm():
    spec, graph, _ = _captured("resnet-mini")
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, graph=graph, output="graph").eval()
    _randomise_norms(wide)
    folded = sg.fold(wide)
    x = spec.example_inputs[0]
    with torch.no_grad():
        assert _rel(folded(x), wide(x)) < 1e-5
    masks = {n for n, _ in folded.named_buffers() if n.endswith("_mask")}
    assert masks == {n for n, _ in wide.named_buffers() if n.endswith("_mask")}
    for name in masks:  # BatchNorm scales whole output rows: the sparsity pattern is unchanged
        assert torch.equal(dict(folded.named_buffers())[name], dict(wide.named_buffers())[name])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())


def test_factorized_with_nonlinearity_is_not_composed():
    spec, graph, _ = _captured("resnet-mini")
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_factorized", 0.75, factorized_bn=True,
                        graph=graph, output="graph").eval()
    _randomise_norms(model)
    folded = sg.fold(model)
    x = spec.example_inputs[0]
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5
    names = set(dict(folded.named_parameters()))
    assert "layers.0.0.conv1.u.weight" in names and "layers.0.0.conv1.v.weight" in names  # ReLU between U and V
    assert "compose" not in folded.plan.lowering["fold"]["rules"] or \
        all(f["into"] != "layers.0.0.conv1.weight" for f in folded.plan.lowering["fold"]["folds"] if f["rule"] == "compose")


def test_batchnorm_fold_by_hand():
    # Linear(1 -> 1): w = 2, b = 1; BN: mean 1, var 3, eps 1, gamma 4, beta 0.5
    # s = gamma / sqrt(var + eps) = 4 / 2 = 2  ->  w' = 4, b' = (b - mean) s + beta = 0.5
    model = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1, eps=1.0)).eval()
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[0].bias.fill_(1.0)
        model[1].running_mean.fill_(1.0)
        model[1].running_var.fill_(3.0)
        model[1].weight.fill_(4.0)
        model[1].bias.fill_(0.5)
    folded = sg.fold(model, (torch.randn(3, 1),))
    params = dict(folded.named_parameters())
    assert params["0.weight"].item() == pytest.approx(4.0)
    assert params["0.bias"].item() == pytest.approx(0.5)
    x = torch.tensor([[1.0], [-2.0]])
    assert torch.allclose(folded(x), torch.tensor([[4.5], [-7.5]]))


def test_without_plan_only_batchnorm_folds():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.Linear(5, 5)).eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, 5, 5)
    folded = sg.fold(model, (x,))
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5
    shapes = _shapes(folded)
    assert shapes["2.weight"] == (4, 8, 1, 1) and shapes["3.weight"] == (5, 5)  # consecutive products kept apart
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())


def test_fold_rejects_uncaptured_module_without_inputs():
    with pytest.raises(sg.SparsegraphError, match="example_inputs"):
        sg.fold(nn.Linear(2, 2))


@pytest.mark.parametrize("transform", ["sparse_parallel", "sparse_factorized", "sparse_doped"])
def test_hf_gpt2_conv1d_layers_fold(transform):
    """Hugging Face GPT-2 keeps W as (in, out) and computes addmm(b, x, W): the same folds apply."""
    from tests.conftest import hf_model

    model = hf_model("gpt2", n_layer=1, n_embd=128, n_head=4, vocab_size=100, n_positions=32)
    x = torch.randint(0, 100, (2, 16))
    sparse = sg.sparsify(model, (x,), transform, 0.75, output="graph").eval()
    folded = sg.fold(sparse)
    with torch.no_grad():
        a, b = (out.logits if hasattr(out, "logits") else out for out in (folded(x), sparse(x)))
        assert _rel(a, b) < 1e-5
    assert _shapes(folded) == _shapes(sg.fold(model, (x,)))


# ---------------------------------------------------------------------------------------------
# the module form: your own model back, its sparsegraph layers folded into plain layers
# ---------------------------------------------------------------------------------------------
FAMILIES = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
RULES = {"sparse_wide": set(), "sparse_parallel": {"sum"}, "sparse_factorized": {"compose"},
         "sparse_doped": {"compose", "sum"}}


def _tree(model):
    """Every module's path and class, and every state tensor's name and shape (the plan holder aside)."""
    return ({p: type(m) for p, m in model.named_modules() if not p.startswith("sparsegraph_plan")},
            {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("sparsegraph_plan")})


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _check_module_fold(dense, model, x, transform):
    """sg.fold on the module form of `dense`: the same function (eval), and the dense original's
    architecture (every module's class, every parameter and buffer) unless there is nothing to fold."""
    before = _tree(model)
    folded = sg.fold(model)
    with torch.no_grad():
        assert _rel(_logits(folded(x)), _logits(model(x))) < 1e-5
    assert type(folded) is type(dense) and not folded.training
    assert _tree(folded) == (before if transform == "sparse_wide" else _tree(dense))
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dense.modules())
    expected = RULES[transform] | ({"batchnorm"} if transform == "sparse_parallel" and has_bn else set())
    assert set(folded.plan.lowering["fold"]["rules"]) == expected
    assert _tree(model) == before and model.plan.lowering == {}  # the input model is untouched


@pytest.mark.parametrize("name", ["resnet-mini", "gpt-mini"])
@pytest.mark.parametrize("transform", FAMILIES)
def test_module_form_folds_to_the_dense_architecture(name, transform):
    spec, graph, _ = _captured(name)
    model = sg.sparsify(spec.model, spec.example_inputs, transform, 0.75, seed=3, graph=graph).eval()
    _randomise_norms(model)  # per-branch BatchNorms too
    _check_module_fold(spec.model, model, spec.example_inputs[0], transform)


def test_module_form_keeps_factorized_with_nonlinearity():
    spec, graph, _ = _captured("resnet-mini")
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_factorized", 0.75, factorized_bn=True,
                        graph=graph).eval()
    _randomise_norms(model)
    folded = sg.fold(model)
    x = spec.example_inputs[0]
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5
    assert _tree(folded) == _tree(model)  # BN + ReLU between U and V: every factorized layer kept
    assert isinstance(folded.layers[0][0].conv1, SparseFactorized)
    assert folded.plan.lowering["fold"]["rules"] == []


def test_module_form_folds_before_lowering():
    spec = builtin("gpt-mini", n_layer=1)
    par = sg.sparsify(spec.model, spec.example_inputs, "sparse_parallel", 0.75, mask="balanced_block:16")
    low = sg.lower(par, target="triton")  # every branch lowered (decided without running a kernel)
    with pytest.raises(sg.SparsegraphError, match="already lowered"):
        sg.fold(low)


@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, x, sg.capture(model, (x,))


@pytest.mark.parametrize("transform", FAMILIES[1:])
def test_module_form_torchvision_resnet18_folds(resnet18, transform):
    dense, x, graph = resnet18
    model = sg.sparsify(dense, (x,), transform, 0.75, graph=graph).eval()
    _randomise_norms(model)
    _check_module_fold(dense, model, x, transform)


@pytest.mark.parametrize("transform", FAMILIES[1:])
def test_module_form_hf_gpt2_folds(transform):
    from tests.conftest import hf_model

    dense = hf_model("gpt2", n_layer=1, n_embd=128, n_head=4, vocab_size=100, n_positions=32)
    x = torch.randint(0, 100, (2, 16))
    model = sg.sparsify(dense, (x,), transform, 0.75).eval()
    _check_module_fold(dense, model, x, transform)
