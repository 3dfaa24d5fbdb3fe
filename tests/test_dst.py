"""Dynamic sparse training: RigL / SET / GMP / Static against hand-computed references, and under DDP."""
from __future__ import annotations

import copy
import io
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph.masks import make_mask
from sparsegraph.plan import SparsityPlan, WeightPlan, attach_plan


# ---------------------------------------------------------------------------------------------
# hand-built sparsegraph-style models: parameters with `<name>_mask` buffers and a plan
# ---------------------------------------------------------------------------------------------
def hand_plan(layers: dict[str, tuple[tuple[int, ...], str, float, int]]) -> SparsityPlan:
    """layers: name -> (shape, mask kind, density, out_axis)."""
    weights = []
    for name, (shape, kind, density, out_axis) in layers.items():
        in_axes = [a for a in range(len(shape)) if a != out_axis]
        fan_in = math.prod(shape[a] for a in in_axes)
        weights.append(WeightPlan(
            name=name, source=name, layer=name.rsplit(".", 1)[0], op="mm", family="sparse_wide", part="weight",
            role="hidden", kind="linear" if len(shape) == 2 else "conv", shape=list(shape), orig_shape=list(shape),
            out_axis=out_axis, in_axes=in_axes, fan_in=fan_in, orig_fan_in=fan_in, fan_out=shape[out_axis],
            orig_fan_out=shape[out_axis], density=density, mask=kind, seed=0, dense_flops=2 * math.prod(shape),
            sparse_flops=round(2 * math.prod(shape) * density)))
    totals = {"original_dense_flops": 1, "dense_flops": 1, "sparse_flops": 1, "other_flops": 0, "params": 1,
              "nonzero_params": 1, "original_params": 1}
    return SparsityPlan(model="hand", transform="sparse_wide", sparsity=0.5, sparsity_used=0.5, mask="uniform",
                        seed=0, options={}, groups=[], weights=weights, patches=[], totals=totals)


class LinearProbe(nn.Module):
    """loss = Σ (weight ⊙ mask ⊙ G): the dense gradient of the effective weight is exactly G."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, kind: str = "uniform"):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.register_buffer("weight_mask", mask.clone())
        self.register_buffer("G", grad.clone())
        attach_plan(self, hand_plan({"weight": (tuple(weight.shape), kind, float(mask.mean()), 0)}))

    def forward(self) -> torch.Tensor:
        return (self.weight * self.weight_mask * self.G).sum()


class MaskedMLP(nn.Module):
    """Two masked hidden layers with BatchNorm, like `sg.sparsify` output (weight * mask in forward)."""

    def __init__(self, d_in: int = 12, hidden: int = 32, d_out: int = 4, kind: str = "uniform",
                 density: float = 0.25, seed: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, d_out)
        layers = {}
        for name in ("fc1", "fc2"):
            w = getattr(self, name).weight
            getattr(self, name).register_buffer(
                "weight_mask", make_mask(kind, tuple(w.shape), density, seed=seed, name=f"{name}.weight"))
            layers[f"{name}.weight"] = (tuple(w.shape), kind, density, 0)
        attach_plan(self, hand_plan(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_in) -> (B, d_out)
        x = F.relu(self.bn1(F.linear(x, self.fc1.weight * self.fc1.weight_mask)))
        x = F.relu(self.bn2(F.linear(x, self.fc2.weight * self.fc2.weight_mask)))
        return self.head(x)


def distinct(shape, seed: int) -> torch.Tensor:
    """Values with distinct magnitudes (no ties), random signs."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    mags = (torch.randperm(n, generator=g).to(torch.float64) + 1) / n
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return (mags * signs).reshape(shape)


def train_steps(model, opt, dst, steps: int, batch: int = 16, seed: int = 0, after_step=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(batch, 12, generator=g)
        y = torch.randint(0, 4, (batch,), generator=g)
        before = {lay.name: lay.mask.clone() for lay in dst.layers}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        dst.step()
        if after_step is not None:
            after_step(before)


# ---------------------------------------------------------------------------------------------
# RigL against an independent reference
# ---------------------------------------------------------------------------------------------
def test_cosine_drop_fraction_hand_values():
    # α_t = α/2 (1 + cos(π t / T_end)), α = 0.3, T_end = 0.75 · 1000 = 750
    assert sg.dst.drop_fraction_at(0.3, 100, 750) == pytest.approx(0.2870318186, abs=1e-9)
    assert sg.dst.drop_fraction_at(0.3, 200, 750) == pytest.approx(0.2503695910, abs=1e-9)
    assert sg.dst.drop_fraction_at(0.3, 375, 750) == pytest.approx(0.15, abs=1e-12)
    assert sg.dst.drop_fraction_at(0.3, 700, 750) == pytest.approx(0.0032778599, abs=1e-9)
    assert sg.dst.drop_fraction_at(0.3, 100, 750, "constant") == 0.3
    assert sg.dst.drop_fraction_at(0.3, 375, 750, "linear") == pytest.approx(0.15)


def test_rigl_drops_smallest_weights_and_grows_largest_dense_gradients():
    shape = (8, 16)
    w0 = distinct(shape, 1).float()
    G = distinct(shape, 2).float()
    mask = make_mask("uniform", shape, 0.25, seed=3, name="probe")  # 32 of 128 active
    model = LinearProbe(w0, mask, G)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rigl = sg.dst.RigL(model, opt, total_steps=1000, update_interval=100)
    expected_k = {100: 9, 200: 8}  # floor(0.28703 * 32), floor(0.25037 * 32)
    checked = 0
    for t in range(1, 1001):
        opt.zero_grad()
        model().backward()
        opt.step()
        w = model.weight.detach().clone()
        old = model.weight_mask.clone()
        rigl.step()
        new = model.weight_mask
        if t in expected_k:
            # independent reference: RigL Algorithm 1 with plain Python sorting
            flat_w, flat_g, flat_old = w.flatten().tolist(), G.flatten().tolist(), old.flatten().tolist()
            G = distinct(shape, t)  # a new gradient field for the next period (else regrowth repeats itself)
            model.G.copy_(G)
            active = [i for i in range(128) if flat_old[i] == 1]
            k = expected_k[t]
            dropped = set(sorted(active, key=lambda i: abs(flat_w[i]))[:k])
            kept = set(active) - dropped
            candidates = [i for i in range(128) if i not in kept]
            grown = set(sorted(candidates, key=lambda i: -abs(flat_g[i]))[:k])
            ref = torch.zeros(128)
            ref[sorted(kept | grown)] = 1.0
            assert torch.equal(new.flatten(), ref)
            assert (new != old).any()
            rec = sg.plan_of(model).history[-1]
            assert rec["step"] == t and rec["layers"]["weight"]["dropped"] == k == rec["layers"]["weight"]["grown"]
            # regrown weights start at zero; kept weights keep their values
            assert torch.all(model.weight.flatten()[sorted(grown)] == 0)
            assert torch.equal(model.weight.flatten()[sorted(kept - grown)], w.flatten()[sorted(kept - grown)])
            checked += 1
        assert int(new.sum()) == 32
        assert torch.all(model.weight[new == 0] == 0)
    assert checked == 2
    steps = [h["step"] for h in sg.plan_of(model).history]
    assert steps == [100, 200, 300, 400, 500, 600, 700]  # none at or after T_end = 750
    assert sg.plan_of(model).history[0]["drop_fraction"] == pytest.approx(0.2870318186)


def test_dense_gradient_captured_on_update_iterations_only():
    torch.manual_seed(0)
    model = MaskedMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = sg.dst.RigL(model, opt, total_steps=40, update_interval=5)
    seen = []  # per forward: were the masks all ones (dense-gradient pass)?
    model.register_forward_hook(lambda m, a, o: seen.append(bool((m.fc1.weight_mask == 1).all())))

    def masked_grads(opt_, args, kwargs):  # runs after RigL's pre-hook: the optimizer's view
        for lay in rigl.layers:
            assert torch.all(lay.param.grad[lay.mask == 0] == 0)
            assert (lay.mask == 1).float().mean() < 0.5  # real masks restored

    opt.register_step_pre_hook(masked_grads)
    train_steps(model, opt, rigl, 40)
    dense_iters = [i + 1 for i, d in enumerate(seen) if d]
    assert dense_iters == [5, 10, 15, 20, 25]  # updates while t < 30
    assert [h["step"] for h in sg.plan_of(model).history] == dense_iters
    with torch.no_grad():  # evaluation never arms the dense pass
        model.eval()
        model(torch.randn(4, 12))
    assert not seen[-1]


def test_capture_pending_before_gradient_clipping():
    torch.manual_seed(0)
    model = MaskedMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rigl = sg.dst.RigL(model, opt, total_steps=20, update_interval=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sg.dst.capture_pending(model)  # on update iterations: dense gradient stashed, gradients masked now
        for lay in rigl.layers:
            assert torch.all(lay.param.grad[lay.mask == 0] == 0)
            assert lay.mask.mean() < 0.5
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        rigl.step()
    assert [h["step"] for h in sg.plan_of(model).history] == [2, 4, 6, 8]


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
], ids=["sgd-momentum", "adam", "adamw-amsgrad"])
def test_regrown_weights_have_zero_optimizer_state(make_opt):
    torch.manual_seed(0)
    model = MaskedMLP()
    opt = make_opt(model.parameters())
    rigl = sg.dst.RigL(model, opt, total_steps=60, update_interval=6, drop_fraction=0.5)
    counts = {lay.name: int(lay.mask.sum()) for lay in rigl.layers}
    grown_total = 0

    def check(before):
        nonlocal grown_total
        for lay in rigl.layers:
            assert int(lay.mask.sum()) == counts[lay.name]
            assert torch.all(lay.param[lay.mask == 0] == 0)
            state = [v for v in opt.state[lay.param].values() if torch.is_tensor(v) and v.shape == lay.param.shape]
            assert state, "the optimizer keeps per-weight state"
            grown = (lay.mask == 1) & (before[lay.name] == 0)
            grown_total += int(grown.sum())
            for v in state:
                assert torch.all(v[lay.mask == 0] == 0)
                assert torch.all(v[grown] == 0)
            assert torch.all(lay.param[grown] == 0)

    train_steps(model, opt, rigl, 60, after_step=check)
    assert grown_total > 0


def test_static_keeps_masks_and_stops_resurrection():
    torch.manual_seed(0)
    model = MaskedMLP()
    for lay in (model.fc1, model.fc2):
        lay.weight_mask.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    static0 = sg.dst.Static(model, opt, total_steps=10)
    train_steps(model, opt, static0, 3)  # dense training: momentum everywhere
    static0.remove()
    for name in ("fc1", "fc2"):  # now prune: momentum at the pruned positions would move them again
        getattr(model, name).weight_mask.copy_(make_mask("uniform", (32, 12 if name == "fc1" else 32), 0.25,
                                                         seed=1, name=name))
    masks = {n: getattr(model, n).weight_mask.clone() for n in ("fc1", "fc2")}
    assert any(torch.any(opt.state[getattr(model, n).weight]["momentum_buffer"][masks[n] == 0] != 0)
               for n in ("fc1", "fc2"))
    static = sg.dst.Static(model, opt, total_steps=10)
    for n in ("fc1", "fc2"):  # pruned positions: weight and momentum zeroed
        assert torch.all(opt.state[getattr(model, n).weight]["momentum_buffer"][masks[n] == 0] == 0)
        assert torch.all(getattr(model, n).weight[masks[n] == 0] == 0)
    train_steps(model, opt, static, 10)
    for n in ("fc1", "fc2"):
        assert torch.equal(getattr(model, n).weight_mask, masks[n])
        assert torch.all(getattr(model, n).weight[masks[n] == 0] == 0)
    assert sg.plan_of(model).history == []


def test_set_grows_at_seeded_random_positions():
    def run():
        torch.manual_seed(0)
        model = MaskedMLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        s = sg.dst.SET(model, opt, total_steps=30, update_interval=5, schedule="constant")
        counts = {lay.name: int(lay.mask.sum()) for lay in s.layers}
        start = model.fc2.weight_mask.clone()
        train_steps(model, opt, s, 30)
        assert {lay.name: int(lay.mask.sum()) for lay in s.layers} == counts
        assert not torch.equal(model.fc2.weight_mask, start)
        return model.fc2.weight_mask.clone()

    assert torch.equal(run(), run())


# ---------------------------------------------------------------------------------------------
# GMP
# ---------------------------------------------------------------------------------------------
def test_gmp_follows_the_cubic_schedule():
    shape = (10, 100)
    w0 = distinct(shape, 5).float()
    mask = make_mask("uniform", shape, 0.1, seed=0, name="probe")  # final density 0.1: 100 of 1000
    model = LinearProbe(w0, mask, torch.zeros(shape))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gmp = sg.dst.GMP(model, opt, total_steps=800, update_interval=100)  # T_end 600, n = 6, Δt = 100
    assert int(model.weight_mask.sum()) == 1000  # dense start (s_0 = 0)
    # s_t = 0.9 + (0 - 0.9)(1 - t/600)^3, kept = round((1 - s_t) * 1000)
    expected = {100: 621, 200: 367, 400: 133, 500: 104, 600: 100, 700: 100, 800: 100}
    assert gmp.sparsity_at(100) == pytest.approx(0.3791666667)
    assert gmp.sparsity_at(400) == pytest.approx(0.8666666667)
    for t in range(1, 801):
        opt.zero_grad()
        model().backward()
        opt.step()
        gmp.step()
        if t in expected:
            n = expected[t]
            assert int(model.weight_mask.sum()) == n, t
            ref = torch.zeros(1000)  # the n largest |w| survive (weights never move: lr = 0)
            ref[w0.abs().flatten().argsort(descending=True)[:n]] = 1
            assert torch.equal(model.weight_mask.flatten(), ref)
            assert sg.plan_of(model).weight("weight").density == pytest.approx(n / 1000)
    assert [h["step"] for h in sg.plan_of(model).history] == [100, 200, 300, 400, 500, 600]


def test_gmp_balanced_blocks_prune_per_block_row():
    shape = (16, 32)
    kind = "balanced_block:4"
    model = LinearProbe(distinct(shape, 6).float(), make_mask(kind, shape, 0.25, seed=0, name="probe"),
                        torch.zeros(shape), kind=kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gmp = sg.dst.GMP(model, opt, total_steps=40, update_interval=10)
    for _ in range(40):
        model().backward()
        opt.step()
        gmp.step()
        grid = model.weight_mask.reshape(4, 4, 8, 4).amax(dim=(1, 3))  # (block-rows, block-cols)
        assert torch.equal(model.weight_mask, grid.repeat_interleave(4, 0).repeat_interleave(4, 1))
        assert len(set(grid.sum(1).tolist())) == 1  # balanced
    assert grid.sum(1).tolist() == [2.0] * 4  # round(0.25 * 8) blocks per block-row at the end


# ---------------------------------------------------------------------------------------------
# block-granular and N:M
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["block:4", "balanced_block:4"])
def test_block_rigl_keeps_whole_blocks_and_balance(kind):
    shape = (16, 32)
    G = distinct(shape, 8).float()
    model = LinearProbe(distinct(shape, 7).float(), make_mask(kind, shape, 0.25, seed=0, name="probe"), G, kind=kind)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rigl = sg.dst.RigL(model, opt, total_steps=100, update_interval=10, drop_fraction=0.5)
    assert rigl.layers[0].units.granularity == "block 4x4"
    start = model.weight_mask.clone()
    n_blocks = None
    for _ in range(100):
        opt.zero_grad()
        model().backward()
        opt.step()
        rigl.step()
        m = model.weight_mask
        grid = m.reshape(4, 4, 8, 4).amax(dim=(1, 3))  # (block-rows, block-cols)
        assert torch.equal(m, grid.repeat_interleave(4, 0).repeat_interleave(4, 1))  # whole blocks
        n_blocks = n_blocks or int(grid.sum())
        assert int(grid.sum()) == n_blocks == 8
        if kind.startswith("balanced"):
            assert grid.sum(1).tolist() == [2.0] * 4
        assert torch.all(model.weight[m == 0] == 0)
    assert not torch.equal(model.weight_mask, start)
    # the first update grew as many blocks as it dropped (which ones: the reference test below)
    first = sg.plan_of(model).history[0]
    assert first["layers"]["weight"]["dropped"] == first["layers"]["weight"]["grown"] > 0


@pytest.mark.parametrize("kind", ["block:4", "balanced_block:4"])
def test_block_rigl_grows_the_blocks_an_independent_reference_picks(kind):
    """The first update, recomputed with plain Python over the 4x8 grid of 4x4 blocks: drop the k
    active blocks of smallest mean |w|, grow the k blocks of largest mean |dense gradient| outside
    the kept set (balanced: in the block-row each dropped block came from). Which blocks, not counts."""
    shape, b = (16, 32), 4
    G = distinct(shape, 8).float()
    model = LinearProbe(distinct(shape, 7).float(), make_mask(kind, shape, 0.25, seed=0, name="probe"), G, kind=kind)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rigl = sg.dst.RigL(model, opt, total_steps=100, update_interval=10, drop_fraction=0.5)
    for _ in range(10):
        opt.zero_grad()
        model().backward()
        opt.step()
        w, old = model.weight.detach().clone(), model.weight_mask.clone()
        rigl.step()
    blocks = [(r, c) for r in range(shape[0] // b) for c in range(shape[1] // b)]

    def mean_abs(t, blk):
        r, c = blk
        return sum(abs(float(v)) for v in t[r * b:(r + 1) * b, c * b:(c + 1) * b].flatten()) / (b * b)

    active = [blk for blk in blocks if mean_abs(old, blk) > 0]
    alpha = 0.5 / 2 * (1 + math.cos(math.pi * 10 / 75))  # cosine schedule at t = 10, T_end = 0.75 * 100
    k = int(alpha * len(active))
    assert (len(active), k) == (8, 3)
    dropped = sorted(active, key=lambda blk: mean_abs(w, blk))[:k]
    kept = [blk for blk in active if blk not in dropped]
    candidates = sorted((blk for blk in blocks if blk not in kept), key=lambda blk: -mean_abs(G, blk))
    if kind.startswith("balanced"):  # as many grown in each block-row as were dropped from it
        grown = []
        for row in sorted({r for r, _ in dropped}):
            n = sum(r == row for r, _ in dropped)
            grown += [blk for blk in candidates if blk[0] == row][:n]
    else:
        grown = candidates[:k]
    new_grid = model.weight_mask.reshape(4, b, 8, b).amax(dim=(1, 3))
    assert sorted((r, c) for r, c in blocks if new_grid[r, c] == 1) == sorted(kept + grown)
    assert set(grown) - set(dropped)  # the update really moved blocks
    for r, c in set(grown) - set(kept):  # regrown blocks start at zero
        assert torch.all(model.weight[r * b:(r + 1) * b, c * b:(c + 1) * b] == 0)


def test_nm_rigl_keeps_n_of_m():
    shape = (8, 16)
    kind = "nm:2:4"
    model = LinearProbe(distinct(shape, 9).float(), make_mask(kind, shape, 0.5, seed=0, name="probe"),
                        distinct(shape, 10).float(), kind=kind)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rigl = sg.dst.RigL(model, opt, total_steps=100, update_interval=10, drop_fraction=0.5)
    start = model.weight_mask.clone()
    for _ in range(100):
        opt.zero_grad()
        model().backward()
        opt.step()
        rigl.step()
        assert torch.all(model.weight_mask.reshape(8, 4, 4).sum(-1) == 2)
    assert not torch.equal(model.weight_mask, start)


# ---------------------------------------------------------------------------------------------
# a real rewritten model, checkpoints, bad input
# ---------------------------------------------------------------------------------------------
def test_rigl_on_a_sparsified_conv_net_with_sparseopt():
    from sparsegraph.models import builtin

    spec = builtin("resnet-mini")
    model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, width=1.0)
    opt = sg.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
    rigl = sg.dst.RigL(model, opt, total_steps=12, update_interval=3)
    counts = {lay.name: int(lay.mask.sum()) for lay in rigl.layers}
    starts = {lay.name: lay.mask.clone() for lay in rigl.layers}
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        x, y = torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rigl.step()
        for lay in rigl.layers:
            assert int(lay.mask.sum()) == counts[lay.name]
            assert torch.all(lay.param[lay.mask == 0] == 0)
    assert any(not torch.equal(lay.mask, starts[lay.name]) for lay in rigl.layers)
    assert [h["step"] for h in sg.plan_of(model).history] == [3, 6]
    # masks and history travel in the state_dict; the schedule resumes from its counter
    state = model.state_dict()
    again = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, width=1.0)
    again.load_state_dict(state)
    assert len(sg.plan_of(again).history) == 2
    for lay in rigl.layers:
        assert torch.equal(again.get_buffer(lay.name + "_mask"), lay.mask)
    copy.deepcopy(model)(spec.example_inputs[0])  # the hooks do not stop copies (they come out inert)
    buf = io.BytesIO()
    torch.save(model, buf)
    opt2 = torch.optim.SGD(again.parameters(), lr=0.05)
    resumed = sg.dst.RigL(again, opt2, total_steps=12, update_interval=3)
    resumed.load_state_dict(rigl.state_dict())
    assert resumed.t == 12


def test_bad_input_is_one_clear_error():
    torch.manual_seed(0)
    model = MaskedMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (0, -5, 1.5, None):
        with pytest.raises(sg.SparsegraphError, match="total_steps must be a positive integer"):
            sg.dst.RigL(model, opt, total_steps=bad)
    for bad in (0, 0.0, 1, 1.2, -0.1):
        with pytest.raises(ValueError, match=r"drop_fraction must be in \(0, 1\)"):
            sg.dst.RigL(model, opt, total_steps=100, drop_fraction=bad)
    with pytest.raises(sg.SparsegraphError, match="update_interval"):
        sg.dst.SET(model, opt, total_steps=100, update_interval=0)
    with pytest.raises(sg.SparsegraphError, match="unknown schedule 'cos'"):
        sg.dst.RigL(model, opt, total_steps=100, schedule="cos")
    with pytest.raises(sg.SparsegraphError, match="end_fraction"):
        sg.dst.RigL(model, opt, total_steps=100, end_fraction=1.5)
    dense = nn.Sequential(nn.Linear(4, 4))
    for cls in (sg.dst.RigL, sg.dst.SET, sg.dst.GMP, sg.dst.Static):
        with pytest.raises(sg.SparsegraphError, match="no sparsity plan.*sg.sparsify"):
            cls(dense, torch.optim.SGD(dense.parameters(), lr=0.1), total_steps=10)
    other = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(sg.SparsegraphError, match="does not update sparse weight.*fc1.weight"):
        sg.dst.RigL(model, other, total_steps=10)
    nm = LinearProbe(torch.randn(4, 8), make_mask("nm:2:4", (4, 8), 0.5, seed=0, name="p"), torch.zeros(4, 8),
                     kind="nm:2:4")
    with pytest.raises(sg.SparsegraphError, match="GMP: weight has an nm:2:4 mask"):
        sg.dst.GMP(nm, torch.optim.SGD(nm.parameters(), lr=0.1), total_steps=10)
    with pytest.raises(sg.SparsegraphError, match="initial_sparsity"):
        sg.dst.GMP(model, opt, total_steps=10, initial_sparsity=1.0)
    # a step without a preceding forward/backward at an update step: a clear error, not a silent guess
    rigl = sg.dst.RigL(model, opt, total_steps=100, update_interval=1)
    with pytest.raises(sg.SparsegraphError, match="no dense gradient for the mask update at step 1"):
        rigl.step()


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 ranks, gloo, CPU
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for method, sparseopt in (("RigL", True), ("SET", False)):
            torch.manual_seed(0)  # same init (DDP would broadcast rank 0's anyway)
            model = MaskedMLP()
            start = {n: getattr(model, n).weight_mask.clone() for n in ("fc1", "fc2")}
            ddp = DDP(model, broadcast_buffers=False)  # masks are NOT synced by DDP: decisions must agree
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            if sparseopt:
                opt = sg.SparseOpt(opt, ddp)
            dst = getattr(sg.dst, method)(ddp, opt, total_steps=12, update_interval=2)
            torch.manual_seed(1000 + rank)  # ranks' global RNGs differ (dropout, augmentation...)
            g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
            for _ in range(12):
                x, y = torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)
                opt.zero_grad()
                F.cross_entropy(ddp(x), y).backward()
                opt.step()
                dst.step()
            torch.save({"masks": {n: getattr(model, n).weight_mask for n in ("fc1", "fc2")},
                        "start": start, "state": model.state_dict(),
                        "history": sg.plan_of(model).history}, os.path.join(out_dir, f"{method}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_make_identical_mask_decisions():
    """RigL (+ SparseOpt) and SET on 2 gloo ranks with different data and no buffer broadcast."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        runs = {m: [torch.load(os.path.join(out, f"{m}{r}.pt"), weights_only=False) for r in (0, 1)]
                for m in ("RigL", "SET")}
    for method, (r0, r1) in runs.items():
        assert [h["step"] for h in r0["history"]] == [2, 4, 6, 8], method  # >= 3 updates (T_end = 9)
        assert r0["history"] == r1["history"]
        for n in ("fc1", "fc2"):
            assert torch.equal(r0["masks"][n], r1["masks"][n]), (method, n)
            assert int(r0["masks"][n].sum()) == int(r0["start"][n].sum())
        assert any(not torch.equal(r0["masks"][n], r0["start"][n]) for n in ("fc1", "fc2")), method
        for key, value in r0["state"].items():
            if torch.is_tensor(value) and value.is_floating_point() and "running" not in key:
                assert torch.equal(value, r1["state"][key]), (method, key)


def test_a_weight_dropped_and_regrown_in_one_update_starts_at_zero():
    """RigL drops the smallest |w| and grows at the largest |dense gradient| outside the kept set, so a
    weight it drops can be grown right back: it must restart from zero, with zero optimizer state."""
    shape = (4, 8)
    w0 = distinct(shape, 1).float() + 0.1 * torch.sign(distinct(shape, 1).float())  # |w| >= 0.1
    mask = make_mask("uniform", shape, 0.25, seed=3, name="probe")  # 8 of 32 active
    active = mask.flatten().nonzero().flatten().tolist()
    p = min(active, key=lambda i: abs(float(w0.flatten()[i])))  # the first weight RigL drops
    G = 0.01 * distinct(shape, 2).float()
    G.view(-1)[p] = 10.0  # ... and by far the largest gradient anywhere: regrown at once
    model = LinearProbe(w0, mask, G)
    opt = torch.optim.Adam(model.parameters(), lr=0.0)  # weights stay put; Adam's moments do not
    rigl = sg.dst.RigL(model, opt, total_steps=100, update_interval=10)
    for _ in range(10):
        opt.zero_grad()
        model().backward()
        opt.step()
        rigl.step()
    layer = sg.plan_of(model).history[-1]["layers"]["weight"]
    assert layer["dropped"] >= 1 and layer["changed"] < layer["grown"]  # a regrown weight was active before
    assert model.weight_mask.view(-1)[p] == 1  # dropped, then grown back
    assert model.weight.detach().view(-1)[p] == 0  # from zero, not from its old value
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[model.weight][key].view(-1)[p] == 0
    kept = [i for i in active if i != p and model.weight_mask.view(-1)[i] == 1]
    assert kept and all(model.weight.detach().view(-1)[i] == w0.view(-1)[i] for i in kept)  # the others keep theirs
