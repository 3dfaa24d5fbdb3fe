"""The module form: sg.sparsify hands back the user's own model, checked against the plan and the graph.

References: the model's own class, `FlopCounterMode` on the emitted module (PyTorch's counter, not
ours), the graph form run on the same weights, and the plan's shapes.
"""
import json
import zipfile

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._pytree import tree_leaves

import sparsegraph as sg
from sparsegraph.models import builtin
from sparsegraph.nn import Masked, SparseFactorized, SparseParallel

from .conftest import hf_model

FAMILIES = ["sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped"]


def _tokens(vocab=100, shape=(2, 24)):
    return (torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0)),)


MODELS = {  # name: () -> (dense model, example inputs)
    "gpt-mini": lambda: (builtin("gpt-mini", n_layer=1).model, builtin("gpt-mini", n_layer=1).example_inputs),
    "resnet-mini": lambda: (builtin("resnet-mini").model, builtin("resnet-mini").example_inputs),
    "resnet18": lambda: (torchvision.models.resnet18(num_classes=10), (torch.randn(2, 3, 32, 32),)),
    "mobilenet_v3": lambda: (torchvision.models.mobilenet_v3_small(num_classes=10), (torch.randn(2, 3, 32, 32),)),
    "gpt2": lambda: (hf_model("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32), _tokens()),
    "llama": lambda: (hf_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                               max_position_embeddings=32), _tokens()),
    "bert": lambda: (hf_model("bert", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, vocab_size=100, max_position_embeddings=32), _tokens()),
}


def _flops(model, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*inputs)
    return fc.get_total_flops()


def _outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        return [t for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]


SLOW = {"resnet18", "mobilenet_v3", "llama"}  # `pytest -m slow`: resnet-mini covers BatchNorm; test_hf and
# test_architectures cover Llama in the module form


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_same_class_shapes_flops_and_outputs_of_the_graph(name, family):
    dense, inputs = MODELS[name]()
    dense.eval()
    model = sg.sparsify(dense, inputs, family, 0.75)
    plan = sg.plan_of(model)
    assert type(model) is type(dense) and model is not dense
    assert model.plan is plan and plan.transform == family
    params = dict(model.named_parameters(remove_duplicate=False))
    for w in plan.weights:
        assert list(params[w.name].shape) == w.shape, w.name
        if w.sparse:  # the mask sits beside its weight, with the planned density
            mask = model.get_buffer(w.name + "_mask")
            assert abs(mask.count_nonzero().item() / mask.numel() - w.density) < 1e-12
    assert abs(plan.flops_ratio - 1) < 1e-3  # iso-FLOP within 0.1%, every family
    graph = sg.sparsify(dense, inputs, family, 0.75, output="graph")
    assert isinstance(graph, torch.fx.GraphModule) and graph.plan.to_dict() == plan.to_dict()
    assert _flops(model, inputs) == _flops(graph, inputs)  # PyTorch's own count: both forms cost the same
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for key, t in list(graph.named_parameters(remove_duplicate=False)) + list(graph.named_buffers()):
            t.copy_(state[key])
    for a, b in zip(_outputs(model, inputs), _outputs(graph, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _trains(model, inputs)


def _trains(model, inputs) -> None:
    """A backward pass reaches every planned weight, and no gradient falls on a masked entry."""
    model.train()
    tree_leaves(model(*inputs))[0].float().pow(2).mean().backward()
    plan = sg.plan_of(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for w in plan.weights:
        if w.kind in ("linear", "conv"):
            assert params[w.name].grad is not None, w.name
        if w.sparse:
            grad, mask = params[w.name].grad, model.get_buffer(w.name + "_mask")
            assert grad.abs().sum() > 0 and torch.all(grad[mask == 0] == 0), w.name


def test_what_each_family_swaps_in():
    spec = builtin("resnet-mini")
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75)
    conv = wide.layers[0][0].conv1
    assert isinstance(conv, nn.Conv2d) and isinstance(conv, Masked) and conv.in_channels == conv.weight.shape[1]
    assert wide.layers[0][0].bn1.num_features == conv.out_channels > 16  # the BatchNorm follows the new width
    assert sorted(k for k in conv.state_dict()) == ["weight", "weight_mask"]  # original key, plus the mask
    par = sg.sparsify(spec.model, spec.example_inputs, "sparse_parallel", 0.75)
    conv = par.layers[0][0].conv1
    assert isinstance(conv, nn.Conv2d) and isinstance(conv, SparseParallel)
    assert [n for n, _ in conv.named_children()] == ["branch1", "branch2", "branch3"]
    assert [n for n, _ in par.layers[0][0].bn1.named_children()] == ["branch1", "branch2", "branch3"]
    fac = sg.sparsify(spec.model, spec.example_inputs, "sparse_factorized", 0.75, factorized_bn=True)
    assert isinstance(fac.layers[0][0].conv1, SparseFactorized)
    assert sorted(n for n, _ in fac.layers[0][0].conv1.named_children()) == ["u", "uv_bn", "v"]
    gpt = builtin("gpt-mini", n_layer=1)
    doped = sg.sparsify(gpt.model, gpt.example_inputs, "sparse_doped", 0.75)
    fc = doped.h[0].mlp.c_fc
    assert isinstance(fc, nn.Linear) and fc.in_features == 128 and fc.u.out_features == fc.v.in_features


def test_sizes_in_python_follow_the_widening():
    """The numbers the model's own code reads: configs and module attributes."""
    spec = builtin("gpt-mini", n_layer=1)
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75)
    assert wide.cfg.n_embd == 256 and spec.model.cfg.n_embd == 128  # a copy: the original is untouched
    assert wide.ln_f.normalized_shape == (256,) and wide.wte.embedding_dim == 256
    assert wide.h[0].mlp.c_fc.out_features == 1024
    llama, ids = MODELS["llama"]()
    wide = sg.sparsify(llama, ids, "sparse_parallel", 0.75)
    assert wide.config.hidden_size == 64  # local families keep every size


def test_inplace_rewrites_the_given_model():
    spec = builtin("gpt-mini", n_layer=1)
    model = spec.model
    out = sg.sparsify(model, spec.example_inputs, "sparse_doped", 0.5, inplace=True)
    assert out is model and sg.plan_of(model) is not None


def test_hf_module_form_keeps_its_interface():
    """labels, attention_mask and the config: what an fx.GraphModule could not keep."""
    model, (ids,) = MODELS["gpt2"]()
    wide = sg.sparsify(model, (ids,), "sparse_wide", 0.75)
    assert wide.config.n_embd == 128 and wide.transformer.h[0].attn.head_dim == 32  # 4 heads kept
    out = wide(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
    assert out.loss.ndim == 0 and out.logits.shape == (2, 24, 100)
    out.loss.backward()
    layer = wide.transformer.h[0].mlp.c_fc
    assert layer.weight.grad is not None and torch.all(layer.weight.grad[layer.weight_mask == 0] == 0)


def test_module_form_through_supar_and_dst():
    spec = builtin("gpt-mini", n_layer=1)
    x = spec.example_inputs[0]
    for family in FAMILIES:
        model = sg.sparsify(spec.model, spec.example_inputs, family, 0.75)
        sg.supar.annotate(model, "supar", alpha_in=2.0)
        sg.supar.init_(model)
        opt = torch.optim.AdamW(sg.supar.param_groups(model, 1e-3, 0.1))
        rigl = sg.dst.RigL(model, opt, total_steps=4, update_interval=1)
        for _ in range(3):
            opt.zero_grad()
            model(x).logsumexp(-1).mean().backward()
            opt.step()
            rigl.step()
        assert sg.plan_of(model).history, family  # RigL updated the module form's masks
        for w in model.plan.sparse_weights:
            weight, mask = model.get_parameter(w.name), model.get_buffer(w.name + "_mask")
            assert int(mask.sum()) == round(w.density * mask.numel()), (family, w.name)


@pytest.mark.parametrize("family", ["sparse_wide", "sparse_parallel"])
def test_save_load_round_trip_has_no_pickle(tmp_path, family):
    spec = builtin("resnet-mini")
    model = sg.sparsify(spec.model, spec.example_inputs, family, 0.75, mask="balanced_block:4").eval()
    sg.supar.annotate(model, "supar", alpha_in=2.0)
    path = tmp_path / "m.sgm"
    sg.save(model, path)
    assert not zipfile.is_zipfile(path)  # not a torch (pickle) archive: safetensors
    with open(path, "rb") as f:  # safetensors: 8-byte header length, then a JSON header, then raw tensors
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert "sparsegraph" in header["__metadata__"] and all(v.get("dtype") for k, v in header.items()
                                                            if k != "__metadata__")
    back = sg.load(path).eval()
    assert type(back) is type(model)
    x = spec.example_inputs[0]
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    assert sg.plan_of(back).to_dict() == model.plan.to_dict()
    for (n, a), (m, b) in zip(back.state_dict().items(), model.state_dict().items()):
        assert n == m and (a == b if isinstance(a, str) else torch.equal(a, b)), n


def test_load_refuses_damage_and_pickles(tmp_path):
    spec = builtin("gpt-mini", n_layer=1)
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75)
    path = tmp_path / "m.sgm"
    sg.save(model, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle of the tensors
    bad = tmp_path / "bad.sgm"
    bad.write_bytes(bytes(data))
    with pytest.raises(sg.SparsegraphError, match="damaged: its checksum"):
        sg.load(bad)
    old = tmp_path / "old.sgm"
    torch.save({"format": "sparsegraph-model", "module": nn.Linear(2, 2)}, old)  # a pickle, as before
    with pytest.raises(sg.SparsegraphError, match="pickle-based.*not loaded"):
        sg.load(old)
    with pytest.raises(sg.SparsegraphError, match="has no sparsegraph plan"):
        sg.save(nn.Linear(2, 2), tmp_path / "x.sgm")
    assert not (tmp_path / "x.sgm").exists()


def test_own_class_needs_its_dense_model_to_load(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    x = (torch.randn(3, 8),)
    model = sg.sparsify(Net(), x, "sparse_wide", 0.5)
    sg.save(model, tmp_path / "n.sgm")
    with pytest.raises(sg.SparsegraphError, match="sg.load\\(path, model="):
        sg.load(tmp_path / "n.sgm")
    back = sg.load(tmp_path / "n.sgm", model=Net())
    torch.testing.assert_close(back(*x), model(*x), rtol=0, atol=0)


def test_verification_names_the_problem_and_the_graph_form():
    class SplitByInput(nn.Module):  # its code spells the attention width as the input's width
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = self.qkv(x).split(x.shape[-1], -1)
            return self.out(q * k + v)

    x = (torch.randn(2, 16),)
    with pytest.raises(sg.SparsegraphError, match='output="graph"'):
        sg.sparsify(SplitByInput(), x, "sparse_wide", 0.0, width=2.0, include_stem=True, include_head=True)
    graph = sg.sparsify(SplitByInput(), x, "sparse_wide", 0.0, width=2.0, include_stem=True, include_head=True,
                        output="graph")
    assert graph(*x).shape == (2, 16)


def test_a_sequential_root_keeps_running_its_children():
    """The plan rides along as a child module; a root nn.Sequential runs it too, as a pass-through."""
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = (torch.randn(3, 8),)
    for family in FAMILIES:
        out = sg.sparsify(model, x, family, 0.5)
        assert isinstance(out, nn.Sequential) and out(*x).shape == (3, 4) and sg.plan_of(out).transform == family


def test_a_model_in_training_mode_is_rewritten_with_its_dropout():
    """A fresh Hugging Face model trains (dropout 0.1, inside attention too). The module form keeps every
    dropout; the graph form keeps the dropout modules and says it drops SDPA's dropout_p, which a
    train-mode capture records as a constant (it would otherwise drop attention in eval as well)."""
    dense = hf_model("gpt2", n_layer=1, n_embd=64, n_head=4, vocab_size=128, n_positions=32).train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"attention dropout .*dropout_p=0.1"):
        m = sg.sparsify(dense, (ids,), "sparse_wide", 0.75)
    assert m.training and type(m) is type(dense)
    assert not torch.equal(m(ids).logits, m(ids).logits)  # dropout active
    m.eval()
    torch.testing.assert_close(m(ids).logits, m(ids).logits, rtol=0, atol=0)
    g = sg.sparsify(dense, (ids,), "sparse_wide", 0.75, output="graph")
    sdpa = [n for n in g.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert sdpa and all(n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0) == 0.0 for n in sdpa)
    assert any(isinstance(mod, nn.Dropout) and mod.p == 0.1 for mod in g.modules())
