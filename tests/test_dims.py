"""Dimension groups on real models: GPT-2's residual stream, ResNet stages, heads, depthwise convs."""
import pytest
import torch
import torch.nn as nn
import torchvision

import sparsegraph as sg
from sparsegraph.dims import new_unit
from sparsegraph.models import builtin

from .conftest import hf_model


def groups_of(model, inputs):
    g = sg.capture(model, inputs)
    return g, sg.analyze_dims(g)


@pytest.fixture(scope="module")
def gpt2():
    model = hf_model("gpt2", n_layer=3)
    return groups_of(model, (torch.randint(0, 1000, (2, 16)),))


def test_gpt2_residual_stream_is_one_widenable_group(gpt2):
    g, dims = gpt2
    resid = dims.param_group("transformer.h.0.ln_1.weight", 0)
    assert resid.widenable and set(resid.sizes.values()) == {768}
    members = set(resid.params)
    for i in range(3):
        h = f"transformer.h.{i}"
        assert {(f"{h}.ln_1.weight", 0), (f"{h}.ln_2.weight", 0),
                (f"{h}.attn.c_attn.weight", 0),  # Conv1D: (in, out), read through addmm
                (f"{h}.attn.c_proj.weight", 1), (f"{h}.attn.c_proj.bias", 0),
                (f"{h}.mlp.c_fc.weight", 0), (f"{h}.mlp.c_proj.weight", 1)} <= members
    wte = next(n for n in ("transformer.wte.weight", "lm_head.weight") if n in g.params)  # tied: one name kept
    assert (wte, 1) in members and ("transformer.ln_f.weight", 0) in members
    vocab = dims.param_group(wte, 0)
    assert vocab.fixed and "vocabulary" in vocab.reasons


def test_gpt2_heads_kept_head_dim_grows(gpt2):
    g, dims = gpt2
    attn = dims.param_group("transformer.h.0.attn.c_attn.weight", 1)
    assert attn.widenable and attn.unit == 64 and set(attn.sizes.values()) >= {64, 768, 2304}
    assert attn is dims.param_group("transformer.h.0.attn.c_proj.weight", 0)
    assert new_unit(attn, 2 ** 0.5) == 91  # 12 heads x 91 = 1092 (GPT-3 Small reference at s=0.5)
    # the view constant spelling head_dim and the SDPA scale follow the group
    keys = {(p.key, p.fn) for p in attn.patches}
    assert ("size", "size") in keys and ("scale", "inv_sqrt") in keys
    heads = [grp for grp in dims if "head count" in grp.reasons]
    assert heads and all(set(grp.sizes.values()) == {12} for grp in heads)
    mlp = dims.param_group("transformer.h.0.mlp.c_fc.weight", 1)
    assert mlp.widenable and set(mlp.sizes.values()) == {3072}


def test_resnet18_groups_follow_stage_structure():
    g, dims = groups_of(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),))
    widenable = [grp for grp in dims.widenable]
    assert len(widenable) == 4 + 8  # one residual group per stage + one inner group per block
    for stage, width in zip(range(1, 5), (64, 128, 256, 512)):
        resid = dims.param_group(f"layer{stage}.0.bn2.weight", 0)
        assert set(resid.sizes.values()) == {width} and resid.widenable
        assert dims.param_group(f"layer{stage}.1.bn2.weight", 0) is resid
        assert dims.param_group(f"layer{stage}.1.conv1.weight", 1) is resid
        for block in (0, 1):
            inner = dims.param_group(f"layer{stage}.{block}.conv1.weight", 0)
            assert inner is not resid and inner is dims.param_group(f"layer{stage}.{block}.conv2.weight", 1)
    assert dims.param_group("conv1.weight", 0) is dims.param_group("layer1.0.bn2.weight", 0)  # stem feeds stage 1
    assert dims.param_group("conv1.weight", 1).fixed  # image channels
    assert dims.param_group("fc.weight", 0).fixed  # classes


def test_depthwise_and_grouped_convs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 32, 1)
            self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.gc = nn.Conv2d(32, 64, 3, padding=1, groups=4)
            self.head = nn.Conv2d(64, 5, 1)

        def forward(self, x):
            return self.head(self.gc(self.dw(self.a(x))))

    g, dims = groups_of(Net(), (torch.randn(2, 3, 8, 8),))
    c32 = dims.param_group("a.weight", 0)
    assert c32 is dims.param_group("dw.weight", 0) and c32 is dims.param_group("gc.weight", 1)
    assert [p.fn for p in c32.patches] == ["groups"]  # depthwise groups follow the channels
    c64 = dims.param_group("gc.weight", 0)
    assert c64.widenable
    for grp in (c32, c64):  # the grouped conv keeps its 4 groups: channels stay multiples of 4
        for k in (1.1, 1.3, 2 ** 0.5, 1.7, 3.3):
            unit = new_unit(grp, k)
            assert all(grp.scale(m) * unit % 4 == 0 for m in grp.members if grp.sizes[m] in (32, 64))
    assert dims.param_group("dw.weight", 1).fixed


def test_mobilenet_v2_depthwise_blocks_are_widenable():
    g, dims = groups_of(torchvision.models.mobilenet_v2(), (torch.randn(2, 3, 64, 64),))
    inner = dims.param_group("features.2.conv.0.0.weight", 0)  # expansion conv output = depthwise channels
    assert inner.widenable and inner is dims.param_group("features.2.conv.1.0.weight", 0)
    assert any(p.fn == "groups" for p in inner.patches)


def test_reshape_split_merge_and_flatten():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)
            self.fc = nn.Linear(16 * 6 * 6, 4)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))  # (N, 16*6*6): channels grow, spatial kept

    g, dims = groups_of(Net(), (torch.randn(2, 3, 8, 8),))
    grp = dims.param_group("conv.weight", 0)
    assert grp.widenable and grp is dims.param_group("fc.weight", 1)
    assert set(grp.sizes.values()) == {16, 576}


def test_unknown_op_is_reported_and_fixed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.flip(self.a(x), dims=[-1]))

    g, dims = groups_of(Net(), (torch.randn(2, 4),))
    assert [op.target for op in dims.unknown] == ["aten.flip.default"]
    grp = dims.param_group("a.weight", 0)
    assert grp.fixed and any("flip" in r for r in grp.reasons)


def test_builtin_gpt_groups():
    spec = builtin("gpt-mini")
    g, dims = groups_of(spec.model, spec.example_inputs)
    resid = dims.param_group("h.0.ln_1.weight", 0)
    assert resid.widenable and ("wte.weight", 1) in resid.params and ("wpe.weight", 1) in resid.params
    assert len(dims.widenable) == 1 + 2 * 4  # residual + attention and MLP per block
