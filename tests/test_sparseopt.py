"""SparseOpt: the per-neuron correction √(1 − s_i)/√(1 − s_avg) against hand-computed values."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparsegraph as sg
from sparsegraph.plan import attach_plan
from tests.test_dst import MaskedMLP, distinct, hand_plan, train_steps


class Probe(nn.Module):
    """loss = Σ weight ⊙ mask ⊙ G: the plain gradient is G ⊙ mask; `out_axis` names the neuron axis."""

    def __init__(self, mask: torch.Tensor, grad: torch.Tensor, out_axis: int = 0, kind: str = "uniform"):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(mask.shape))
        self.register_buffer("weight_mask", mask.clone())
        self.register_buffer("G", grad.clone())
        attach_plan(self, hand_plan({"weight": (tuple(mask.shape), kind, float(mask.mean()), out_axis)}))

    def forward(self) -> torch.Tensor:
        return (self.weight * self.weight_mask * self.G).sum()


def rows_mask(densities: list[float], fan_in: int) -> torch.Tensor:
    """(len(densities), fan_in): row i has the first round(d_i * fan_in) entries on."""
    m = torch.zeros(len(densities), fan_in)
    for i, d in enumerate(densities):
        m[i, :round(d * fan_in)] = 1
    return m


def corrected_grad(model: Probe) -> torch.Tensor:
    opt = sg.SparseOpt(torch.optim.SGD(model.parameters(), lr=1.0), model)
    opt.zero_grad()
    model().backward()
    opt.correct()
    return model.weight.grad.clone()


def test_rows_of_sparsity_half_and_ninety_percent():
    # s = {0.5, 0.9}: densities 0.5 and 0.1, s_avg = 0.7, factors √(0.5/0.3) and √(0.1/0.3)
    mask = rows_mask([0.5, 0.1], 10)
    G = torch.rand(2, 10) + 0.5
    got = corrected_grad(Probe(mask, G))
    want = G * mask * torch.tensor([[1.2909944487], [0.5773502692]])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_conv1d_layout_uses_out_axis_1():
    # Hugging Face Conv1D stores (in, out): the neuron is a column
    mask = rows_mask([0.5, 0.1], 10).T.contiguous()  # (in=10, out=2)
    G = torch.rand(10, 2) + 0.5
    got = corrected_grad(Probe(mask, G, out_axis=1))
    want = G * mask * torch.tensor([[1.2909944487, 0.5773502692]])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_conv_weight_fan_in_spans_kernel_positions():
    # (out=2, in=3, 2, 2): fan-in 12; row densities 6/12 and 3/12, avg 0.375 -> √(0.5/0.375), √(0.25/0.375)
    mask = rows_mask([0.5, 0.25], 12).reshape(2, 3, 2, 2)
    G = torch.rand(2, 3, 2, 2) + 0.5
    got = corrected_grad(Probe(mask, G))
    want = G * mask * torch.tensor([1.1547005384, 0.8164965809]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
], ids=["sgd", "adam", "adamw"])
@pytest.mark.parametrize("kind", ["dense", "nm:2:4", "balanced_block:4"])
def test_dense_and_uniformly_sparse_layers_are_unchanged(make_opt, kind):
    def run(wrap: bool):
        torch.manual_seed(0)
        model = MaskedMLP(d_in=16, kind="uniform" if kind == "dense" else kind,
                          density=0.5 if kind != "balanced_block:4" else 0.25)
        if kind == "dense":
            for lay in (model.fc1, model.fc2):
                lay.weight_mask.fill_(1.0)
        inner = make_opt(model.parameters())
        opt = sg.SparseOpt(inner, model) if wrap else inner
        if wrap:
            assert all(f is None for f in opt.factors().values())
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x, y = torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_sparseopt_changes_a_nonuniform_layer_and_delegates_to_the_wrapped_optimizer():
    torch.manual_seed(0)
    model = MaskedMLP()
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = sg.SparseOpt(inner, model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.defaults is inner.defaults
    assert any(f is not None for f in opt.factors().values())  # random uniform masks: rows differ
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    static = sg.dst.Static(model, opt, total_steps=4)
    for _ in range(4):
        x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        static.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert opt.state is inner.state and opt.state[model.fc1.weight]["exp_avg"].shape == (32, 12)
    sd = opt.state_dict()
    assert sd.keys() == inner.state_dict().keys()
    opt.zero_grad()
    assert model.fc1.weight.grad is None
    fresh_inner = torch.optim.Adam(model.parameters(), lr=1.0)
    fresh = sg.SparseOpt(fresh_inner, model)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh_inner.state[model.fc1.weight]["exp_avg"], inner.state[model.fc1.weight]["exp_avg"])

    x = torch.randn(4, 12)

    def closure():  # the gradients a closure computes are corrected too
        opt.zero_grad()
        out = (model(x) ** 2).mean()
        out.backward()
        return out

    wrapped = sg.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.0), model)
    assert torch.is_tensor(wrapped.step(closure))
    corrected = model.fc1.weight.grad.clone()
    closure()
    torch.testing.assert_close(corrected, model.fc1.weight.grad * opt.factors()["fc1.weight"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("order", ["rigl-on-sparseopt", "sparseopt-around-rigl-optimizer"])
def test_regrowth_uses_the_uncorrected_gradient_and_factors_follow_the_masks(order):
    # row 0 density 0.5 (factor 1.29), row 1 density 0.1 (factor 0.58); |G| row 1 > |G| row 0, so the
    # uncorrected gradient grows in row 1, the corrected one would grow in row 0
    mask = rows_mask([0.5, 0.1], 10)
    G = torch.cat([0.6 + 0.1 * distinct((1, 10), 1).abs(), 0.8 + 0.1 * distinct((1, 10), 2).abs()]).float()
    model = Probe(mask, G)
    inner = torch.optim.SGD(model.parameters(), lr=1e-3)
    if order == "rigl-on-sparseopt":
        opt = sg.SparseOpt(inner, model)
        rigl = sg.dst.RigL(model, opt, total_steps=20, update_interval=10, drop_fraction=0.5, schedule="constant")
    else:  # RigL hooks the inner optimizer; SparseOpt must still hand it the gradient before correcting
        rigl = sg.dst.RigL(model, inner, total_steps=20, update_interval=10, drop_fraction=0.5,
                           schedule="constant")
        opt = sg.SparseOpt(inner, model)
    before = opt.factors()["weight"].flatten().tolist()
    assert before == pytest.approx([1.2909944487, 0.5773502692])

    def optimizer_view(o, args, kwargs):  # registered after RigL's hook: what the update uses
        f = torch.tensor([[1.2909944487], [0.5773502692]])
        torch.testing.assert_close(model.weight.grad, G * mask * f, rtol=1e-6, atol=0)

    inner.register_step_pre_hook(optimizer_view)
    for t in range(1, 11):
        opt.zero_grad()
        model().backward()
        opt.step()
        w = model.weight.detach().clone()
        rigl.step()
    # reference: k = floor(0.5 * 6) = 3 smallest |w| among active dropped, 3 largest |G| outside the kept set
    active = [i for i in range(20) if mask.flatten()[i] == 1]
    dropped = sorted(active, key=lambda i: abs(w.flatten()[i].item()))[:3]
    kept = set(active) - set(dropped)
    grown = sorted((i for i in range(20) if i not in kept), key=lambda i: -G.flatten()[i].item())[:3]
    ref = torch.zeros(20)
    ref[sorted(kept | set(grown))] = 1
    assert torch.equal(model.weight_mask.flatten(), ref)
    assert all(i >= 10 for i in grown)  # the test has teeth: all in row 1
    after = opt.factors()["weight"].flatten()
    dens = model.weight_mask.mean(dim=1)
    torch.testing.assert_close(after, (dens / dens.mean()).sqrt())
    assert after.tolist() != pytest.approx(before)


def test_sparseopt_with_gmp_and_set_keeps_invariants():
    for cls in (sg.dst.GMP, sg.dst.SET):
        torch.manual_seed(0)
        model = MaskedMLP()
        opt = sg.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
        dst = cls(model, opt, total_steps=20, update_interval=4)

        def check(before):
            for name, f in opt.factors().items():
                mask = model.get_buffer(name + "_mask")
                want = sg.train.sparseopt.neuron_factors(mask, 0)
                assert (f is None) == (want is None) and (f is None or torch.equal(f, want))
                assert torch.all(model.get_parameter(name)[mask == 0] == 0)

        train_steps(model, opt, dst, 20, after_step=check)
        assert sg.plan_of(model).history


def test_bad_input():
    torch.manual_seed(0)
    model = MaskedMLP()
    with pytest.raises(sg.SparsegraphError, match="expected a torch.optim.Optimizer"):
        sg.SparseOpt(object(), model)
    dense = nn.Linear(3, 3)
    with pytest.raises(sg.SparsegraphError, match="SparseOpt: Linear has no sparsity plan"):
        sg.SparseOpt(torch.optim.SGD(dense.parameters(), lr=0.1), dense)
    opt = sg.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(sg.SparsegraphError, match="already a SparseOpt"):
        sg.SparseOpt(opt, model)
