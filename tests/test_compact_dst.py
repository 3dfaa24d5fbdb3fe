"""RigL / SET on compact (lowered) layers: in-place block updates against dense references."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph.backends import cost_model as cm
from sparsegraph.backends.cpu import pack, unpack
from sparsegraph.backends.sparse_linear import SparseWeight, layout_tensors
from sparsegraph.models import builtin
from sparsegraph.nn import LoweredLinear, SparseLayout
from sparsegraph.nn.lowered import INDEX
from sparsegraph.train.compact import CompactLayer
from sparsegraph.train.mask_units import Units

from .test_dst import hand_plan
from .test_lower import _sparse_wins

B = 16  # the mask's and the layout's block



@pytest.fixture(scope="module")
def pair():
    """(spec, masked-dense Sparse Wide gpt-mini under SμPar, its lowered copy): d 64 -> 128, balanced 16x16
    blocks."""
    spec = builtin("gpt-mini", n_layer=1, n_embd=64, n_head=2)
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, mask=f"balanced_block:{B}", seed=3,
                       verify_module=False)
    sg.supar.annotate(wide, "supar")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cm, "load", _sparse_wins)
        low = sg.lower(wide)
    assert {(rec["format"], rec["block"]) for rec in low.plan.lowering["layers"].values()} == {("bsr", B)}
    return spec, wide, low


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g)


def _loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _dense(lay: CompactLayer, t: torch.Tensor) -> torch.Tensor:
    """(n, k): block values `t` (nnzb, b, b) on the layer's current layout, unpacked."""
    m = lay.module
    return unpack(t, m.weight_crow, m.weight_col, lay.n, lay.k, lay.block)


def _blocks(lay: CompactLayer) -> torch.Tensor:
    """(R, C) bool: the stored blocks, read from the index buffers alone."""
    dense = unpack(torch.ones_like(lay.param), lay.module.weight_crow, lay.module.weight_col, lay.n, lay.k, B)
    return F.pad(dense, (0, lay.C * B - lay.k, 0, lay.R * B - lay.n)).reshape(lay.R, B, lay.C, B).amax((1, 3)) > 0


def _masked_twin(wide, low):
    """A copy of the masked model carrying the lowered model's weights: weight = unpacked values, mask =
    its blocks (the reference the lowered model must compute the same function as)."""
    twin = copy.deepcopy(wide)
    state = dict(low.named_parameters()) | dict(low.named_buffers())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name in state:
                p.copy_(state[name])
                continue
            crow, col, values = state[f"{name}_crow"], state[f"{name}_col"], state[f"{name}_values"]
            p.copy_(unpack(values, crow, col, *p.shape, B))
            twin.get_buffer(f"{name}_mask").copy_(unpack(torch.ones_like(values), crow, col, *p.shape, B))
    return twin


def test_an_update_moves_blocks_state_and_index_like_a_dense_reference(pair):
    spec, wide, low = pair
    low = copy.deepcopy(low)
    opt = torch.optim.AdamW(low.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = _batch()
    _loss(low, x, y).backward()
    opt.step()  # AdamW's two moments exist now; the gradient is kept
    lay = sg.dst.SET(low, opt, total_steps=100).layers[1]
    assert isinstance(lay, CompactLayer) and isinstance(lay.module, LoweredLinear)
    p = lay.param
    tensors = {"values": p, "grad": p.grad, **{k: v for k, v in opt.state[p].items() if v.shape == p.shape}}
    before = {key: _dense(lay, t).clone() for key, t in tensors.items()}
    per_row = torch.diff(lay.module.weight_crow).clone()
    # in every block-row drop d random stored blocks and grow d: new ones, and in even rows the first
    # dropped block again (it restarts at zero too)
    active = lay.active().reshape(lay.R, lay.C)
    kept, new = active.clone(), active.clone()
    g = torch.Generator().manual_seed(1)
    for r in range(lay.R):
        on, off = active[r].nonzero().flatten(), (~active[r]).nonzero().flatten()
        d = max(1, len(on) // 2)
        drop = on[torch.randperm(len(on), generator=g)[:d]]
        again = r % 2 == 0
        grow = off[torch.randperm(len(off), generator=g)[:d - again]]
        kept[r, drop] = new[r, drop] = False
        new[r, grow] = True
        new[r, drop[0]] = again
    assert (new & ~active).any() and (new & active & ~kept).any()
    lay.apply_(new.reshape(-1), kept.reshape(-1), opt)
    keep = kept.repeat_interleave(B, 0).repeat_interleave(B, 1)[:lay.n, :lay.k].float()  # (n, k)
    for key, t in tensors.items():  # kept blocks carry their numbers, every other block is zero
        assert torch.equal(_dense(lay, t), before[key] * keep), key
    for key, want in zip(INDEX, layout_tensors(new)):
        assert torch.equal(lay.module._buffers[f"weight_{key}"], want), key
    assert torch.equal(_blocks(lay), new)  # the layout is the decision, and it stays balanced
    assert torch.equal(torch.diff(lay.module.weight_crow), per_row) and p.shape[0] == int(active.sum())
    assert opt.state[p]["exp_avg"] is tensors["exp_avg"] and lay.param is p  # rewritten in place
    with torch.no_grad():  # the model computes the function of its dense unpacked weights
        assert torch.allclose(low(x), _masked_twin(wide, low)(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must store"):
        lay.apply_(kept.reshape(-1), kept.reshape(-1), opt)


def test_ragged_blocks_are_scored_on_the_entries_inside_w():
    """W (40, 70) in 32x32 blocks: the last block-row and block-column are ragged. Weight and growth
    scores equal `Units.score` of the dense weight and of its dense gradient (autograd on F.linear),
    whatever lies in the padding of the stored blocks' gradient."""
    n, k, b = 40, 70, 32
    grid = torch.tensor([[True, False, True], [False, True, True]])  # (R, C): two blocks in each block-row
    mask = grid.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k].float()  # (n, k)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * mask
    sw = SparseWeight.from_dense(w, b, mask=mask)
    layer = LoweredLinear(torch.nn.Parameter(sw.values.clone()), {key: getattr(sw, key) for key in INDEX},
                          SparseLayout(n, k, b))
    plan = hand_plan({"fc.weight": ((n, k), f"balanced_block:{b}", float(mask.mean()), 0)}).weights[0]
    lay = CompactLayer("fc.weight", layer, plan)
    units = Units((n, k), 0, [1], f"balanced_block:{b}")
    assert torch.equal(lay.active(), grid.reshape(-1)) and torch.allclose(lay.weight_score(), units.score(w))
    x, target = torch.randn(5, 3, k, generator=g), torch.randn(5, 3, n, generator=g)
    lay.arm()
    ((layer(x) - target) ** 2).sum().backward()
    padding = torch.ones(2 * b, 3 * b)
    padding[:n, :k] = 0
    with torch.no_grad():  # a kernel may leave anything in the padding
        layer.weight_values.grad += pack(1e3 * padding, sw.crow, sw.col, b)
    W = w.clone().requires_grad_(True)
    ((F.linear(x, W) - target) ** 2).sum().backward()
    assert torch.allclose(lay.capture(), units.score(W.grad), rtol=1e-4, atol=1e-6)


def test_captured_growth_gradient_equals_the_dense_gradient(pair):
    """The SDDMM over candidate blocks (in chunks) gives RigL the dense gradient's block means."""
    spec, wide, low = pair
    low = copy.deepcopy(low)
    twin = _masked_twin(wide, low)
    x, y = _batch(2)
    rigl_c = sg.dst.RigL(low, torch.optim.SGD(low.parameters(), lr=0.1), total_steps=100)
    rigl_m = sg.dst.RigL(twin, torch.optim.SGD(twin.parameters(), lr=0.1), total_steps=100)
    for lay in rigl_c.layers + rigl_m.layers:
        lay.arm()
    _loss(low, x, y).backward()
    _loss(twin, x, y).backward()
    for c, m in zip(rigl_c.layers, rigl_m.layers):
        assert c.name == m.name and c.storage == "compact" and m.storage == "masked"
        assert int((~c.active()).sum()) > max(c.nnzb, c.C)  # more candidates than one chunk holds
        want = m.growth_score(m.capture())
        got = c.growth_score(c.capture())
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), c.name
        assert not c._pairs and c._handle is None  # disarmed: nothing kept


@pytest.mark.parametrize("method", ["SET", "RigL"])
def test_compact_updates_equal_masked_dense_updates(pair, method):
    spec, wide, low = pair
    masked, low = copy.deepcopy(wide), copy.deepcopy(low)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (masked, low)]
    dsts = [getattr(sg.dst, method)(m, o, total_steps=8, update_interval=2) for m, o in zip((masked, low), opts)]
    for step in range(4):
        x, y = _batch(step)
        for model, opt, dst in zip((masked, low), opts, dsts):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
            dst.step()
        for m, c in zip(*(d.layers for d in dsts)):
            assert torch.equal(c.active(), m.active().cpu()), (step, c.name)  # the same blocks
            crow, col = c.module.weight_crow, c.module.weight_col
            assert torch.allclose(c.param, pack(m.param, crow, col, B), atol=1e-6), (step, c.name)
            mom = opts[0].state[m.param]["momentum_buffer"]
            assert torch.allclose(opts[1].state[c.param]["momentum_buffer"], pack(mom, crow, col, B), atol=1e-6)
    history = [sg.plan_of(m).history for m in (masked, low)]
    assert [h["step"] for h in history[1]] == [2, 4] and history[0] == history[1]
    assert sum(rec["changed"] for h in history[1] for rec in h["layers"].values()) > 0


def test_training_with_compact_rigl_lowers_the_loss_and_keeps_its_structure(pair):
    spec, wide, low = pair
    low = copy.deepcopy(low)
    opt = torch.optim.AdamW(low.parameters(), lr=3e-3)
    rigl = sg.dst.RigL(low, opt, total_steps=12, update_interval=3)
    rows = {lay.name: torch.diff(lay.module.weight_crow).clone() for lay in rigl.layers}
    first = {lay.name: lay.active() for lay in rigl.layers}
    x, y = _batch(5)
    losses = []
    for _ in range(9):
        opt.zero_grad()
        loss = _loss(low, x, y)
        loss.backward()
        opt.step()
        rigl.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert [h["step"] for h in sg.plan_of(low).history] == [3, 6]  # before 0.75 * 12 steps
    assert any(not torch.equal(lay.active(), first[lay.name]) for lay in rigl.layers)
    for lay in rigl.layers:
        assert torch.equal(torch.diff(lay.module.weight_crow), rows[lay.name]), lay.name
    with torch.no_grad():
        assert torch.allclose(low(x), _masked_twin(wide, low)(x), rtol=1e-5, atol=1e-6)


def test_lowered_models_reload_with_their_moved_blocks(pair, tmp_path):
    spec, wide, low = pair
    low = copy.deepcopy(low)
    opt = torch.optim.SGD(low.parameters(), lr=0.1)
    dst = sg.dst.SET(low, opt, total_steps=4, update_interval=1, schedule="constant")
    x, y = _batch(7)
    for _ in range(2):
        opt.zero_grad()
        _loss(low, x, y).backward()
        opt.step()
        dst.step()
    sg.save(low, tmp_path / "low.sgm")
    back = sg.load(tmp_path / "low.sgm")
    assert isinstance(back.h[0].mlp.c_fc, LoweredLinear) and sg.plan_of(back).history == sg.plan_of(low).history
    mine, theirs = low.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for name, t in mine.items():
        assert torch.equal(t, theirs[name]) if isinstance(t, torch.Tensor) else t == theirs[name], name
    with torch.no_grad():
        assert torch.equal(back(x), low(x))


def test_supar_groups_and_init_see_lowered_weights(pair):
    spec, wide, low = pair
    wide, low = copy.deepcopy(wide), copy.deepcopy(low)
    lr = {n: g["lr"] for m in (wide, low) for g in sg.supar.param_groups(m, lr=1e-2) for n in g["names"]}
    name = "h.0.mlp.c_fc.weight"
    assert lr[name + "_values"] == lr[name] > 1e-2  # η / (m_d · m_ρ), m_d = 2 and m_ρ about 0.25
    sg.supar.init_(wide, seed=11)
    sg.supar.init_(low, seed=11)  # the same draws, kept on the stored blocks
    x, _ = _batch()
    with torch.no_grad():
        assert torch.allclose(low(x), wide(x), rtol=1e-5, atol=1e-6)


def test_what_compact_updates_refuse(pair):
    spec, wide, low = pair
    low = copy.deepcopy(low)
    opt = torch.optim.SGD(low.parameters(), lr=0.1)
    with pytest.raises(sg.dst.DSTError, match=r"GMP: h\.0\.attn\.c_attn\.weight is stored compactly .* lower it "
                                              "after pruning"):
        sg.dst.GMP(low, opt, total_steps=10)
    with pytest.raises(sg.SparsegraphError, match=r"SparseOpt: h\.0\.attn\.c_attn\.weight is stored compactly"):
        sg.SparseOpt(opt, low)
    sg.plan_of(low).weight("h.0.mlp.c_fc.weight").mask = "uniform"
    with pytest.raises(sg.dst.DSTError, match=r"h\.0\.mlp\.c_fc\.weight is lowered to BSR b=16 with a 'uniform' "
                                              r"mask; compact dynamic sparsity drops and grows whole blocks"):
        sg.dst.SET(low, opt, total_steps=10)


@pytest.mark.slow  # about 6 s: a whole `sparsegraph train` run
def test_sparsegraph_train_in_compact_storage(tmp_path):
    from sparsegraph.io import read
    from sparsegraph.train.trainer import CHECKPOINT, TrainConfig, train

    cfg = TrainConfig(model="gpt-mini", model_options={"n_layer": 1, "n_embd": 64, "n_head": 2}, sparsity=0.75,
                      mask=f"balanced_block:{B}", storage="compact", dst="rigl", parameterization="supar", steps=4,
                      batch_size=4, block_size=32, update_interval=2, eval_interval=4, checkpoint_interval=4,
                      eval_batches=1)
    metrics = train(cfg, str(tmp_path), progress=False)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and "val_loss" in metrics[-1]
    meta, state, extra = read(tmp_path / CHECKPOINT)
    lowered = [k for k in state if k.endswith(".weight_values")]
    assert lowered and meta["plan"]["history"][0]["step"] == 2  # RigL updated the stored blocks
    assert extra["config"]["storage"] == "compact"
    assert cfg.fingerprint() != TrainConfig(**{**extra["config"], "storage": "masked"}).fingerprint()
    with pytest.raises(sg.SparsegraphError, match="--storage compact does not shard with --fsdp"):
        TrainConfig(storage="compact", fsdp=True).validate()
    with pytest.raises(sg.SparsegraphError, match="unknown --storage 'dense'; choose masked or compact"):
        TrainConfig(storage="dense").validate()
