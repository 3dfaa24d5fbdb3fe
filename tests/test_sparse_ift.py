"""Sparse-IFT rewrites: iso-FLOP totals, exactness, real models, plans, save/load, bad input."""
import copy
import math
import os
import stat

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import sparsegraph as sg
from sparsegraph.models import builtin
from sparsegraph.models.gpt import loss_fn
from sparsegraph.passes.emit_torch import embed_dense
from sparsegraph.passes.sparse_ift import PlanError, make_plan

from .conftest import hf_model

FAMILIES = ["sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped"]


@pytest.fixture(scope="module")
def gpt():
    spec = builtin("gpt-mini", n_layer=2)
    return spec, sg.capture(spec.model, spec.example_inputs)


@pytest.fixture(scope="module")
def resnet():
    spec = builtin("resnet-mini")
    return spec, sg.capture(spec.model, spec.example_inputs)


def _sgd_lowers_loss(model, inputs, loss):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        value = loss(model(*inputs))
        value.backward()
        opt.step()
        losses.append(value.item())
    return losses[-1] < losses[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.5, 0.75, pytest.param(0.9, marks=pytest.mark.slow)])
def test_iso_flops_shapes_and_training(family, sparsity, gpt, resnet):
    for (spec, g), make_loss in ((gpt, lambda x: (lambda y: loss_fn(y, x[0]))),
                                 (resnet, lambda x: (lambda y: F.cross_entropy(y, torch.tensor([1, 3]))))):
        dense = sg.analyze(g)
        model = sg.sparsify(spec.model, spec.example_inputs, family, sparsity, graph=g)
        measured = sg.analyze(model, spec.example_inputs)  # re-captured: counts the masks, not the plan
        ratio = measured.sparse_flops / dense.dense_flops
        assert abs(ratio - 1) < 1e-3, (family, sparsity, ratio)  # every family: densities searched after rounding
        if family == "sparse_wide":
            assert measured.dense_flops > 1.5 * dense.dense_flops  # the model really is wider
        assert abs(model.plan.totals["sparse_flops"] - measured.sparse_flops) <= 1e-6 * measured.sparse_flops
        x = spec.example_inputs
        assert model(*x).shape == spec.model(*x).shape
        assert _sgd_lowers_loss(model, x, make_loss(x))
        masks = {n: b for n, b in model.named_buffers() if n.endswith("_mask")}
        assert masks and all(abs(b.count_nonzero().item() / b.numel() - w.density) < 1e-12
                             for w in model.plan.sparse_weights for n, b in masks.items() if n == w.name + "_mask")


@pytest.mark.parametrize("family", ["sparse_wide", "sparse_parallel", "sparse_doped"])
def test_sparsity_zero_is_the_original_model(family, gpt, resnet):
    for spec, g in (gpt, resnet):
        model = sg.sparsify(spec.model, spec.example_inputs, family, 0.0, graph=g)
        original = dict(spec.model.state_dict())
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("sparsegraph_plan")}
        assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in original.items()}
        missing, unexpected = model.load_state_dict(original, strict=False)
        assert missing == ["sparsegraph_plan._extra_state"] and unexpected == []
        model.eval(), spec.model.eval()
        x = spec.example_inputs
        torch.testing.assert_close(model(*x), spec.model(*x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["builtin", "torchvision"])
def test_widening_emitter_is_exact(source):
    if source == "builtin":
        spec = builtin("resnet18")
        dense, x = spec.model, spec.example_inputs
    else:
        dense, x = torchvision.models.resnet18(num_classes=10), (torch.randn(2, 3, 64, 64),)
    dense.eval()
    for m in dense.modules():  # non-trivial BN statistics, so a wrong embedding would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    wide = sg.sparsify(dense, x, "sparse_wide", 0.75)
    embed_dense(wide, dense.state_dict()).eval()
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in dense.parameters())
    torch.testing.assert_close(wide(*x), dense(*x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sparsity, width", [(0.5, 90), (0.75, 128), (0.9, 202)])
def test_torchvision_resnet18_widths_match_reference(sparsity, width):
    model = torchvision.models.resnet18()
    g = sg.capture(model, (torch.randn(2, 3, 64, 64),))
    plan = make_plan(g, "sparse_wide", sparsity)
    assert plan.weight("layer1.0.conv1.weight").shape[:2] == [width, width]
    assert plan.weight("layer2.0.conv1.weight").shape[0] == {90: 181, 128: 256, 202: 404}[width]
    assert plan.weight("conv1.weight").shape == [width, 3, 7, 7] and plan.weight("conv1.weight").density == 1
    assert plan.weight("fc.weight").shape == [1000, {90: 724, 128: 1024, 202: 1619}[width]]
    assert abs(plan.flops_ratio - 1) < 1e-3
    assert plan.sparsity_used > sparsity  # the dense stem and head grew too, so hidden layers pay


@pytest.mark.parametrize("sparsity, d_model, d_attn", [(0.5, 1092, 1092), pytest.param(0.75, 1536, 1536, marks=pytest.mark.slow)])
def test_hf_gpt2_widths_heads_kept(sparsity, d_model, d_attn):
    model = hf_model("gpt2")
    g = sg.capture(model, (torch.randint(0, 1000, (2, 32)),))
    plan = make_plan(g, "sparse_wide", sparsity)
    c_attn = plan.weight("transformer.h.0.attn.c_attn.weight")  # Conv1D: (in, out)
    assert c_attn.shape == [d_model, 3 * d_attn]
    assert plan.weight("transformer.h.0.mlp.c_fc.weight").shape == [d_model, {0.5: 4344, 0.75: 6144}[sparsity]]
    # d_model and the attention width are one number in GPT-2's code, so they get one new size:
    # 12 heads of 91 = 1092, the Sparse-IFT paper's GPT-3 Small width at 50%
    head_dim = [p for p in plan.patches if p["key"] == "size" and p["old"] == 64]
    assert head_dim and {p["new"] for p in head_dim} == {d_attn // 12}  # 12 heads kept, head_dim grows
    scales = [p for p in plan.patches if p["key"] == "scale"]
    assert len(scales) == 12 and math.isclose(scales[0]["new"], (d_attn // 12) ** -0.5)
    assert abs(plan.flops_ratio - 1) < 1e-3


def test_hf_gpt2_wide_runs_and_trains():
    model = hf_model("gpt2", n_layer=2, vocab_size=512)  # a small vocabulary: the dense head does not dominate
    ids = torch.randint(0, 512, (2, 16))
    wide = sg.sparsify(model, (ids,), "sparse_wide", 0.5)
    assert type(wide) is type(model) and wide.config.n_embd == 1092 and wide.config.n_inner == 4344
    assert wide(ids).logits.shape == (2, 16, model.config.vocab_size)
    assert _sgd_lowers_loss(wide, (ids,), lambda y: loss_fn(y.logits, ids))
    assert wide.plan.weight("transformer.h.0.attn.c_attn.weight").shape == [1092, 3 * 1092]
    attn = wide.transformer.h[0].attn
    assert (attn.embed_dim, attn.head_dim, attn.num_heads) == (1092, 91, 12)  # 12 heads kept
    graph = sg.sparsify(model, (ids,), "sparse_wide", 0.5, output="graph")
    sdpa = [n for n in graph.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == 2 and sdpa[0].args[0].op == "call_function"


def test_builtin_gpt_wide():
    spec = builtin("gpt-mini")
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75)
    assert wide.plan.weight("h.0.attn.c_attn.weight").shape == [768, 256]  # 4 heads of 64 (were 32)
    assert wide.plan.weight("wte.weight").shape == [256, 256]  # tied embedding/head stays dense, widened
    assert wide.plan.weight("wte.weight").density == 1
    assert abs(wide.plan.flops_ratio - 1) < 1e-3


def _two_of_four(m):
    full = m[:, : m.shape[1] // 4 * 4]
    return (full.reshape(m.shape[0], -1, 4).sum(-1) == 2).all()


def _balanced16(m):
    rows, cols = -(-m.shape[0] // 16) * 16, -(-m.shape[1] // 16) * 16
    padded = torch.zeros(rows, cols)
    padded[: m.shape[0], : m.shape[1]] = m
    blocks = padded.reshape(rows // 16, 16, cols // 16, 16).amax((1, 3))
    return len(set(blocks.sum(-1).tolist())) == 1


def test_masks_kinds_through_sparsify(gpt):
    spec, g = gpt
    for mask, check in (("nm:2:4", _two_of_four), ("balanced_block:16", _balanced16), ("erk", lambda m: True)):
        sparsity = 0.5 if mask.startswith("nm") else 0.75
        model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", sparsity, mask=mask, graph=g)
        measured, target = sg.analyze(model, spec.example_inputs).sparse_flops, sg.analyze(g).dense_flops
        assert abs(measured / target - 1) <= 1e-3, (mask, measured / target)  # the same tolerance for every kind
        for w in model.plan.sparse_weights:
            assert check(dict(model.named_buffers())[w.name + "_mask"]), (mask, w.name)
    erk = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, mask="erk", graph=g).plan
    dens = {w.name: w.density for w in erk.sparse_weights}
    assert dens["h.0.attn.c_proj.weight"] > dens["h.0.mlp.c_fc.weight"]  # ERK: smaller layers denser


def test_options_filter_stem_head_budget(resnet):
    spec, g = resnet
    only_first_stage = sg.sparsify(spec.model, spec.example_inputs, "sparse_parallel", 0.5, graph=g,
                                   filter=lambda mod, fqn: fqn.startswith("layers.0"))
    assert {w.layer for w in only_first_stage.plan.sparse_weights} == {"layers.0.0.conv1", "layers.0.0.conv2"}
    seen = []
    sg.sparsify(spec.model, spec.example_inputs, "sparse_parallel", 0.5, graph=g,
                filter=lambda mod, fqn: seen.append((type(mod), fqn)) or True)
    assert (nn.Conv2d, "layers.0.0.conv1") in seen  # the filter sees the original module
    with_ends = make_plan(g, "sparse_wide", 0.75, opts=_opts(include_stem=True, include_head=True))
    assert with_ends.weight("conv1.weight").sparse and with_ends.weight("fc.weight").sparse
    half = make_plan(g, "sparse_wide", 0.75, opts=_opts(budget_ratio=0.5))
    assert abs(half.flops_ratio - 0.5) < 1e-3


def _opts(**kw):
    from sparsegraph.passes.sparse_ift import Options
    return Options(**kw)


def test_parallel_branches_have_their_own_batchnorm(resnet):
    spec, g = resnet
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_parallel", 0.75, graph=g)
    bns = [n for n, m in model.named_modules() if n.startswith("layers.0.0.bn1")]
    assert sorted(bns) == ["layers.0.0.bn1", "layers.0.0.bn1.branch1", "layers.0.0.bn1.branch2",
                           "layers.0.0.bn1.branch3"]
    assert all(isinstance(model.get_submodule(n), nn.BatchNorm2d) for n in bns)
    assert not any("sum to one sparse matrix" in n for n in model.plan.notes)  # every conv has its BN
    # the copies are in the plan like every other parameter (SμPar gives each its multipliers)
    names = {w.name for w in model.plan.weights}
    assert {n for n, _ in model.named_parameters()} == names
    assert model.plan.totals["params"] == sum(p.numel() for p in model.parameters())
    bn = model.plan.weight("layers.0.0.bn1.branch3.weight")
    assert (bn.role, bn.source, bn.shape) == ("norm", "layers.0.0.bn1.weight", [16])
    one = builtin("gpt-mini", n_layer=1)
    lin = sg.sparsify(one.model, one.example_inputs, "sparse_parallel", 0.5)
    assert any("sum to one sparse matrix" in n for n in lin.plan.notes)  # linear layers: said, not hidden


def test_factorized_with_bn_between(resnet):
    spec, g = resnet
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_factorized", 0.75, graph=g, factorized_bn=True)
    assert "layers.0.0.conv1.uv_bn" in dict(model.named_modules())
    u, v = model.plan.weight("layers.0.0.conv1.u.weight"), model.plan.weight("layers.0.0.conv1.v.weight")
    # k x k conv f_in -> d, then 1x1 d -> f_out; d = ceil(9*16*16 / ((9*16 + 16) * 0.25)) = 58
    assert u.shape == [58, 16, 3, 3] and v.shape == [16, 58, 1, 1]
    doped = make_plan(g, "sparse_doped", 0.75)
    # d = floor(0.75 * 9*16*16 / (9*16 + 16)) = 10
    assert doped.weight("layers.0.0.conv1.u.weight").shape == [10, 16, 3, 3]


def test_plan_json_round_trip(gpt):
    spec, g = gpt
    plan = make_plan(g, "sparse_wide", 0.75)
    again = sg.SparsityPlan.from_json(plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()
    with pytest.raises(ValueError, match="schema version 99"):
        sg.SparsityPlan.from_dict({**plan.to_dict(), "version": 99})


def test_save_load_round_trip(tmp_path, resnet):
    spec, g = resnet
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_doped", 0.75, graph=g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    path = tmp_path / "m.sgm"
    sg.save(model, path)
    back = sg.load(path)
    assert back.plan == model.plan
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and (torch.equal(v1, v2) if isinstance(v1, torch.Tensor) else v1 == v2)
    model.eval(), back.eval()
    torch.testing.assert_close(back(*spec.example_inputs), model(*spec.example_inputs))
    assert [p.name for p in tmp_path.iterdir()] == ["m.sgm"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # the usual permissions, not mkstemp's 0600
    (tmp_path / "junk.sgm").write_bytes(b"not a model")
    with pytest.raises(sg.SparsegraphError, match="junk.sgm is not a readable sparsegraph model"):
        sg.load(tmp_path / "junk.sgm")


def test_saved_masks_take_a_bit_per_element(tmp_path, gpt):
    spec, g = gpt
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, graph=g)
    masks = {n: b for n, b in model.named_buffers() if n.endswith("_mask")}
    tensor_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    mask_bytes = sum(m.numel() * m.element_size() for m in masks.values())
    sg.save(model, tmp_path / "m.sgm")
    # the masks' 32 bits an element become 1: the file is the rest plus 1/32 of them (and a little metadata)
    assert os.path.getsize(tmp_path / "m.sgm") < tensor_bytes - mask_bytes * (1 - 1 / 32) + 200_000
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n in masks)  # the model is untouched
    loaded = dict(sg.load(tmp_path / "m.sgm").named_buffers())
    for name, mask in masks.items():
        assert loaded[name].dtype == mask.dtype and torch.equal(loaded[name], mask)


def test_same_seed_same_model(gpt):
    spec, g = gpt
    a = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, seed=3, graph=g)
    b = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, seed=3, graph=g)
    c = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, seed=4, graph=g)
    tensors = [[v for v in m.state_dict().values() if isinstance(v, torch.Tensor)] for m in (a, b, c)]
    assert all(torch.equal(v, w) for v, w in zip(tensors[0], tensors[1]))
    assert not all(torch.equal(v, z) for v, z in zip(tensors[0], tensors[2]))


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\), got -0.1"),
    ({"sparsity": False}, r"sparsity must be in \[0, 1\), got False"),  # a bool is not a sparsity of 0
    ({"sparsity": "0.5"}, r"sparsity must be in \[0, 1\), got '0.5'"),
    ({"seed": True}, "seed must be an integer, got True"),
    ({"transform": "sparse_tall"}, "unknown transform 'sparse_tall'"),
    ({"filter": lambda m, n: False}, "no layer to sparsify .the filter selects nothing"),
    ({"mask": "nm:2:4", "sparsity": 0.75}, "mask nm:2:4 has density 0.5, but sparsity 0.75"),
    ({"mask": "bogus"}, "bogus"),
])
def test_bad_input(kwargs, message, gpt):
    spec, g = gpt
    args = {"transform": "sparse_wide", "sparsity": 0.5} | kwargs
    with pytest.raises(sg.SparsegraphError, match=message):
        sg.sparsify(spec.model, spec.example_inputs, graph=g, **args)


def test_no_widenable_group_is_an_error():
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(PlanError, match="no widenable dimension group"):
        sg.sparsify(model, (torch.randn(2, 8),), "sparse_wide", 0.5)
    with pytest.raises(PlanError, match="no layer to sparsify"):
        sg.sparsify(model, (torch.randn(2, 8),), "sparse_parallel", 0.5)  # its one layer is stem and head


def test_sparsify_leaves_the_original_alone(resnet):
    spec, g = resnet
    before = copy.deepcopy(spec.model.state_dict())
    sg.sparsify(spec.model, spec.example_inputs, "sparse_factorized", 0.5, graph=g)
    assert all(torch.equal(v, spec.model.state_dict()[k]) for k, v in before.items())


def test_plan_survives_state_dict_and_deepcopy(gpt):
    spec, g = gpt
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.5, graph=g)
    state = model.state_dict()
    assert "sparsegraph_plan._extra_state" in state
    twin = copy.deepcopy(model)
    assert sg.plan_of(twin) == model.plan and twin.plan is sg.plan_of(twin)
    twin.sparsegraph_plan.plan = None
    twin.load_state_dict(state)
    assert sg.plan_of(twin) == model.plan and twin.plan == model.plan


def test_width_and_sparsity_as_independent_knobs(gpt):
    spec, g = gpt
    masked = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, width=1.0, graph=g)
    assert masked.plan.weight("h.0.mlp.c_fc.weight").shape == [512, 128]  # same width, masks only
    assert masked.plan.weight("h.0.mlp.c_fc.weight").density == 0.25
    wide_dense = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.0, width=2.0, graph=g)
    assert wide_dense.plan.weight("h.0.mlp.c_fc.weight").shape == [1024, 256]
    assert not wide_dense.plan.sparse_weights


def test_fresh_initialisation_follows_pytorch_defaults(resnet):
    spec, g = resnet
    for family in ("sparse_wide", "sparse_doped"):
        model = sg.sparsify(spec.model, spec.example_inputs, family, 0.75, graph=g)
        fc_w, fc_b = model.get_parameter("fc.weight"), model.get_parameter("fc.bias")
        bound = 1 / math.sqrt(fc_w.shape[1])  # nn.Linear: weight and bias U(+-1/sqrt(fan_in))
        assert fc_b.abs().max() <= bound and fc_b.abs().max() > bound / 2
        assert fc_w.abs().max() <= bound
        conv = model.get_parameter("layers.0.0.conv1.weight")
        assert conv.abs().max() <= 1 / math.sqrt(conv[0].numel())


def test_sparse_parallel_at_sixty_percent_has_three_branches_of_a_third(gpt):
    """s = 0.6: ceil(1 / 0.4) = 3 branches; at density 0.4 they would cost 1.2x, so each gets 1/3."""
    spec, g = gpt
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_parallel", 0.6, graph=g)
    plan = model.plan
    fc = [w for w in plan.weights if w.source == "h.0.mlp.c_fc.weight"]
    assert [w.name for w in fc] == ["h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.branch1.weight", "h.0.mlp.c_fc.branch2.weight"]
    for w in fc:
        assert w.density == pytest.approx(1 / 3, abs=1 / math.prod(w.shape))  # exact nonzero counts
        mask = model.get_buffer(w.name + "_mask")
        assert int(mask.sum()) == round(w.density * mask.numel())
    assert abs(plan.flops_ratio - 1) < 1e-3
    assert abs(sg.analyze(model, spec.example_inputs).sparse_flops / sg.analyze(g).dense_flops - 1) < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mask", ["uniform", "block:16", "nm:2:4", "balanced_block:16"])
def test_iso_flops_every_family_every_mask(family, mask, gpt):
    """Within 0.1% of the original's FLOPs, or a note naming the layers whose mask grid is too coarse."""
    spec, g = gpt
    sparsity = 0.5 if mask.startswith("nm") else 0.75
    plan = sg.sparsify(spec.model, spec.example_inputs, family, sparsity, mask=mask, graph=g).plan
    off = abs(plan.flops_ratio - 1) > 1e-3
    if mask in ("uniform", "block:16", "nm:2:4"):
        assert not off, (family, mask, plan.flops_ratio)
    else:
        assert not off or any(n.startswith("iso-FLOP") and "the finest step, h." in n for n in plan.notes), plan.notes


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sparse_wide_block_masks_have_whole_blocks_and_hit_the_budget(arch):
    """balanced_block:32 used to land at 0.948x (GPT-2) and 0.974x (Llama): ragged edge blocks."""
    # sizes where the old planner missed: 0.927x (GPT-2, d 96) and 1.066x (Llama, d 256, planned densities)
    kw = dict(n_embd=96, n_layer=2, n_head=4, vocab_size=256) if arch == "gpt2" else dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1024)
    model = hf_model(arch, **kw)
    ids = torch.randint(0, 256, (2, 16))
    wide = sg.sparsify(model, (ids,), "sparse_wide", 0.75, mask="balanced_block:32")
    plan = wide.plan
    assert abs(plan.flops_ratio - 1) < 1e-3, plan.flops_ratio
    for w in plan.sparse_weights:
        for axis in (w.out_axis, *w.in_axes):
            assert w.shape[axis] % 32 == 0, (w.name, w.shape)  # every widened side in whole blocks
        assert _balanced(wide.get_buffer(w.name + "_mask"), w, 32)


def _balanced(mask, w, b):
    m = mask if w.out_axis == 0 else mask.t()
    blocks = m.reshape(m.shape[0] // b, b, m.shape[1] // b, b).amax((1, 3))
    return len(set(blocks.sum(-1).tolist())) == 1 and (blocks.sum() / blocks.numel()).item() == pytest.approx(w.density)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_weight_shared_across_depth_is_rewritten_at_every_use(family):
    """ALBERT applies one layer at every depth: its weight is planned once, for every op that reads it."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.layer, self.out = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 5)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            for _ in range(3):
                h = h + torch.relu(self.layer(h))
            return self.out(h)

    torch.manual_seed(0)
    model, x = Shared(), (torch.randn(4, 12),)
    from sparsegraph.checks import check_rewrite

    row = check_rewrite(model, x, family, 0.75)
    assert row["ok"], (row["error"], row.get("traceback"))
    plan = row["plan"]
    parts = [w for w in plan.sparse_weights if w.source == "layer.weight"]
    assert parts and all(w.dense_flops % 3 == 0 for w in parts)  # three uses counted
    one_use = 2 * 4 * 32 * 32
    if family == "sparse_parallel":
        assert [w.dense_flops for w in parts] == [3 * one_use] * 4
    out = sg.sparsify(model, x, family, 0.75, output="graph")
    n_products = sum(1 for n in out.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    assert n_products == 2 + 3 * {"sparse_wide": 1, "sparse_parallel": 4, "sparse_factorized": 2, "sparse_doped": 3}[family]


@pytest.mark.parametrize("family", ["sparse_parallel", "sparse_factorized", "sparse_doped"])
def test_a_layer_the_mask_grid_cannot_thin_stays_dense(family):
    """balanced_block:16 on an 8-wide layer: one block per block-row, density 1 or nothing. Made sparse it
    would cost four times its FLOPs (Parallel); it stays dense, and the plan says why."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.narrow, self.wide, self.out = (nn.Linear(16, 8), nn.Linear(8, 64), nn.Linear(64, 64),
                                                          nn.Linear(64, 4))

        def forward(self, x):
            return self.out(torch.relu(self.wide(torch.relu(self.narrow(torch.relu(self.inp(x)))))))

    plan = sg.sparsify(Net(), (torch.randn(4, 16),), family, 0.75, mask="balanced_block:16").plan
    assert any(n.startswith("narrow: kept dense") for n in plan.notes), plan.notes
    assert plan.weight("narrow.weight").family == "dense" and not plan.weight("narrow.weight").sparse
    assert any(w.source == "wide.weight" for w in plan.sparse_weights)
    assert abs(plan.flops_ratio - 1) < 1e-3  # the 64-wide layer's grid (4 blocks a row) reaches its density
