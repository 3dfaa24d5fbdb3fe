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


# ---------------------------------------------------------------------------------------------
# heads kept, rotary tables recomputed, the new op rules
# ---------------------------------------------------------------------------------------------
class _RopeAttention(nn.Module):
    """q, k, v projections split into heads, RoPE on q and k with a registered inv_freq table."""

    def __init__(self, d=32, heads=2, hd=16, base=10000.0, rope_table=True):
        super().__init__()
        self.heads, self.hd = heads, hd
        self.q, self.k, self.v = (nn.Linear(d, heads * hd, bias=False) for _ in range(3))
        self.o = nn.Linear(heads * hd, d, bias=False)
        inv = 1.0 / base ** (torch.arange(0, self.hd, 2).float() / self.hd)
        self.register_buffer("inv_freq", inv if rope_table else torch.rand(self.hd // 2), persistent=False)

    def rope(self, x, cos, sin):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x):  # (B, T, d)
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        freqs = torch.arange(T, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        q, k = self.rope(q, emb.cos(), emb.sin()), self.rope(k, emb.cos(), emb.sin())
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def test_rotary_table_is_recomputed_not_frozen():
    from sparsegraph import tables

    g, dims = groups_of(_RopeAttention(), (torch.randn(2, 5, 32),))
    hd = dims.param_group("q.weight", 0)
    assert hd.widenable and hd is dims.param_group("k.weight", 0)  # q and k head_dim tie through the table
    assert dims.tables == {"inv_freq": ("rope_inv_freq", {"base": pytest.approx(10000.0, rel=1e-6)})}
    assert dims.param_group("v.weight", 0).widenable
    # the formula, by hand: base^(-2i/d) for d = 8
    torch.testing.assert_close(tables.make("rope_inv_freq", {"base": 100.0}, (4,)),
                               torch.tensor([1.0, 100 ** -0.25, 100 ** -0.5, 100 ** -0.75]))
    assert tables.recognise(torch.tensor([1.0, 0.5, 0.3])) is None  # not one base: an ordinary buffer
    # a buffer that is no such table freezes the head dimension, and then nothing in q/k grows (heads kept)
    g, dims = groups_of(_RopeAttention(rope_table=False), (torch.randn(2, 5, 32),))
    assert dims.param_group("q.weight", 0).fixed and not dims.tables


def test_rotary_attention_sparse_wide_keeps_heads_and_matches_a_fresh_model():
    """Widened q, k, v with the table recomputed compute what a model built at the new head_dim computes."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    wide = sg.sparsify(_RopeAttention(), (x,), "sparse_wide", 0.0, width=2.0, include_stem=True, include_head=True)
    assert wide.plan.weight("q.weight").shape == [64, 32] and wide.plan.tables[0]["shape"] == [16]
    ref = _RopeAttention(d=32, heads=2, hd=32)  # 2 heads of 32 (the model's input and output stay 32 wide)
    ref.load_state_dict({k: v for k, v in wide.state_dict().items() if not k.startswith("sparsegraph")},
                        strict=False)
    torch.testing.assert_close(wide.get_buffer("inv_freq"), ref.inv_freq)
    torch.testing.assert_close(wide(x), ref(x), rtol=1e-5, atol=1e-5)


def test_index_and_baddbmm_rules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 4)

        def forward(self, x, idx):  # x (N, 8), idx (M,)
            h = self.a(x)[idx]  # rows gathered: the feature axis keeps its group
            s = torch.baddbmm(torch.zeros(1, 3, 3), h.view(1, 3, 12) * 1.0, h.view(1, 3, 12).transpose(1, 2),
                              alpha=12 ** -0.5)
            return self.b(h) + s.sum()

    g, dims = groups_of(Net(), (torch.randn(5, 8), torch.tensor([0, 2, 4])))
    grp = dims.param_group("a.weight", 0)
    assert grp.widenable and grp is dims.param_group("b.weight", 1)
    assert any(p.key == "alpha" and p.fn == "inv_sqrt" for p in grp.patches)
    assert not dims.unknown
