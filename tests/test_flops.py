"""FLOPs agree with PyTorch's own FlopCounterMode on real models; roles; reports."""
import json

import pytest
import torch
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import sparsegraph as sg
from sparsegraph.models import builtin

from .conftest import hf_model


def flop_counter(model, inputs) -> int:
    # CPU attention kernels are invisible to FlopCounterMode; the math backend shows its matmuls
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(*inputs)
    return fc.get_total_flops()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_flops_match_flop_counter(name):
    model = torchvision.models.get_model(name, weights=None).eval()
    x = (torch.randn(1, 3, 224, 224),)
    report = sg.analyze(model, x)
    assert report.dense_flops == flop_counter(model, x)
    if name == "resnet18":
        assert round(report.dense_flops / 1e9, 2) == 3.63  # 1.81 G multiply-accumulates, as published


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_hf_flops_match_flop_counter(arch):
    model = hf_model(arch, num_hidden_layers=2)
    ids = (torch.randint(0, 1000, (2, 32)),)
    report = sg.analyze(model, ids)
    assert report.dense_flops == flop_counter(model, ids)
    assert report.other_flops > 0  # attention products are counted, outside the weight layers


def test_builtin_flops_and_roles():
    spec = builtin("resnet18")
    report = sg.analyze(spec.model, spec.example_inputs)
    assert report.dense_flops == flop_counter(spec.model, spec.example_inputs)
    roles = {r.name: r.role for r in report.layers}
    assert roles["conv1"] == "stem" and roles["fc"] == "head" and roles["layers.0.0.conv1"] == "hidden"
    assert roles["bn1"] == "norm"
    assert report.params == sum(p.numel() for p in spec.model.parameters())
    gpt = builtin("gpt-mini")
    rep = sg.analyze(gpt.model, gpt.example_inputs)
    kinds = {(r.name, r.kind): r.role for r in rep.layers}
    assert kinds[("wte", "embedding")] == "embedding"
    assert [r.role for r in rep.layers if r.weight == "wte.weight" and r.kind == "linear"] == ["head"]
    assert not any(r.role == "stem" for r in rep.layers)  # the embedding is the transformer's stem


def test_sparse_flops_follow_masks():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 16))
            self.register_buffer("weight_mask", (torch.arange(128).reshape(8, 16) % 4 == 0).float())

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight * self.weight_mask)

    report = sg.analyze(Masked(), (torch.randn(3, 16),))
    (row,) = report.layers
    assert row.density == 0.25 and row.dense_flops == 2 * 3 * 16 * 8
    assert row.sparse_flops == row.dense_flops // 4 == report.sparse_flops
    assert report.nonzero_params == 32


def test_report_table_and_json():
    spec = builtin("gpt-mini", n_layer=1)
    report = sg.analyze(spec.model, spec.example_inputs)
    text = str(report)
    assert "h.0.attn.c_attn" in text and "dense FLOPs" in text
    data = json.loads(report.to_json())
    assert data["dense_flops"] == report.dense_flops
    assert {l["role"] for l in data["layers"]} == {"embedding", "norm", "hidden", "head"}


def test_grouped_mm_and_baddbmm_formulas_by_hand():
    from sparsegraph.flops import grouped_mm_flop

    # 10 rows of width 6 routed to 3 experts of (6 -> 4): every row meets one 6 x 4 matrix
    assert grouped_mm_flop((10, 6), (3, 6, 4)) == 2 * 10 * 6 * 4
    assert grouped_mm_flop((3, 5, 6), (3, 6, 4)) == 2 * 3 * 5 * 6 * 4  # batched form

    class Scores(torch.nn.Module):
        def forward(self, bias, q, k):
            return torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.5)

    x = (torch.randn(4, 1, 7), torch.randn(4, 7, 8), torch.randn(4, 7, 8))
    report = sg.analyze(Scores(), x)
    assert report.dense_flops == 2 * 4 * 7 * 8 * 7 == flop_counter(Scores(), x)


def test_flop_counter_counts_moe_experts():
    """PyTorch counts transformers' grouped matmul as 0; sg.flops.flop_counter counts it as the loop it replaces."""
    from transformers.integrations import moe  # noqa: F401 - registers transformers::grouped_mm_fallback

    from sparsegraph.flops import flop_counter as sg_counter

    x, w = torch.randn(10, 6), torch.randn(3, 6, 4)
    offs = torch.tensor([3, 7, 10], dtype=torch.int32)
    with FlopCounterMode(display=False) as plain:
        y = torch.ops.transformers.grouped_mm_fallback(x, w, offs)
    with sg_counter() as ours:
        torch.ops.transformers.grouped_mm_fallback(x, w, offs)
    assert plain.get_total_flops() == 0 and ours.get_total_flops() == 2 * 10 * 6 * 4
    torch.testing.assert_close(y[3:7], x[3:7] @ w[1])
