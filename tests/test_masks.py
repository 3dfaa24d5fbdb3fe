"""Masks: exact counts, structure checked element by element, reproducibility, ERK, bad input."""
import math

import pytest
import torch

from sparsegraph.graph import SparsegraphError
from sparsegraph.masks import (MaskKind, as_matrix, erk_densities, layer_seed, make_mask, mask_density,
                               parse_mask)

ALL_KINDS = ("uniform", "erk", "nm:2:4", "block:4", "balanced_block:4")


def density_for(kind: str, density: float = 0.3) -> float:
    return parse_mask(kind).density_fixed or density


def reference_view(mask: torch.Tensor) -> torch.Tensor:
    """The (out, fan-in) matrix of a weight with out_axis=0: PyTorch's weight.reshape(out, -1)."""
    return mask.reshape(mask.shape[0], -1)


def blocks(mat: torch.Tensor, b: int):
    """Yield (block_row, block_col, tile) over the B x B tiling, ragged at the right/bottom edges."""
    for i in range(0, mat.shape[0], b):
        for j in range(0, mat.shape[1], b):
            yield i // b, j // b, mat[i:i + b, j:j + b]


# ---------------------------------------------------------------------------------------------
# parsing and seeds
# ---------------------------------------------------------------------------------------------
def test_parse_mask_fields():
    assert parse_mask("uniform") == MaskKind("uniform")
    nm = parse_mask("nm:2:4")
    assert (nm.name, nm.n, nm.m, nm.block, nm.density_fixed) == ("nm", 2, 4, None, 0.5)
    assert parse_mask(" NM:1:8 ").density_fixed == 0.125
    blk = parse_mask("block:32")
    assert (blk.name, blk.block, blk.density_fixed) == ("block", 32, None)
    bal = parse_mask("balanced_block:16")
    assert (bal.name, bal.block) == ("balanced_block", 16)
    assert parse_mask("erk").density_fixed is None
    for spec in ("uniform", "erk", "nm:2:4", "block:32", "balanced_block:16"):
        assert str(parse_mask(spec)) == spec
        assert parse_mask(parse_mask(spec)) == parse_mask(spec)


@pytest.mark.parametrize("bad, message", [
    ("foo", "unknown mask kind 'foo'"),
    ("nm:5:4", "'nm:5:4'.*1 <= N <= M"),
    ("nm:0:4", "'nm:0:4'"),
    ("nm:2", "unknown mask kind 'nm:2'"),
    ("block:0", "'block:0'.*positive"),
    ("balanced_block:-2", "'balanced_block:-2'.*positive"),
    ("block:x", "unknown mask kind 'block:x'"),
    ("", "unknown mask kind ''"),
])
def test_parse_mask_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_mask(bad)


def test_layer_seed_is_pinned():
    # Saved plans rebuild their masks from (seed, layer name): the derivation must never change
    # (and must not depend on Python's per-process hash randomisation).
    assert layer_seed(0, "h.0.mlp.c_fc.weight") == layer_seed(0, "h.0.mlp.c_fc.weight")
    assert layer_seed(0, "h.0.mlp.c_fc.weight") == 8204980835171653055
    assert layer_seed(0, "a") != layer_seed(0, "b") != layer_seed(1, "b")
    assert 0 <= layer_seed(-5, "x") < 2**63


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_reproducible_from_seed_and_name(kind):
    shape, d = (32, 16, 3, 3), density_for(kind)
    a = make_mask(kind, shape, d, seed=3, name="layer1.conv.weight")
    assert torch.equal(a, make_mask(kind, shape, d, seed=3, name="layer1.conv.weight"))
    assert not torch.equal(a, make_mask(kind, shape, d, seed=3, name="layer2.conv.weight"))
    assert not torch.equal(a, make_mask(kind, shape, d, seed=4, name="layer1.conv.weight"))
    assert a.dtype == torch.float32 and a.shape == shape
    assert set(a.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_density_one_is_all_ones(kind):
    assert torch.equal(make_mask(kind, (12, 10, 3), 1.0, seed=0, name="w"), torch.ones(12, 10, 3))


# ---------------------------------------------------------------------------------------------
# exact counts and structure
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uniform", "erk"])
@pytest.mark.parametrize("shape", [(64, 32), (10, 7), (16, 8, 3, 3), (5, 3, 2, 2), (1, 1), (7,)])
@pytest.mark.parametrize("density", [1e-4, 0.1, 0.37, 0.5, 0.9])
def test_uniform_exact_count(kind, shape, density):
    in_axes = () if len(shape) == 1 else (1,)
    mask = make_mask(kind, shape, density, seed=0, name="w", in_axes=in_axes)
    numel = math.prod(shape)
    assert int(mask.sum()) == max(1, round(density * numel))
    assert mask_density(mask) == max(1, round(density * numel)) / numel


@pytest.mark.parametrize("shape, b", [((64, 64), 16), ((40, 50), 16), ((16, 6, 3, 3), 8),
                                      ((9, 5, 3, 3), 4), ((3, 100), 32)])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.75])
def test_block_structure_and_count(shape, b, density):
    mask = make_mask(f"block:{b}", shape, density, seed=1, name="w")
    mat = reference_view(mask)
    on = 0
    n_blocks = 0
    for _, _, tile in blocks(mat, b):
        n_blocks += 1
        assert tile.min() == tile.max(), "a block is partly on"
        on += int(tile[0, 0])
    assert n_blocks == math.ceil(mat.shape[0] / b) * math.ceil(mat.shape[1] / b)
    assert on == max(1, round(density * n_blocks))


@pytest.mark.parametrize("shape, b", [((64, 64), 16), ((40, 50), 16), ((16, 6, 3, 3), 8), ((12, 70), 8)])
@pytest.mark.parametrize("density", [0.01, 0.25, 0.6])
def test_balanced_block_structure(shape, b, density):
    mask = make_mask(f"balanced_block:{b}", shape, density, seed=2, name="w")
    mat = reference_view(mask)
    per_row: dict[int, int] = {}
    for i, _, tile in blocks(mat, b):
        assert tile.min() == tile.max(), "a block is partly on"
        per_row[i] = per_row.get(i, 0) + int(tile[0, 0])
    blocks_per_row = math.ceil(mat.shape[1] / b)
    assert len(per_row) == math.ceil(mat.shape[0] / b)
    assert set(per_row.values()) == {max(1, round(density * blocks_per_row))}


@pytest.mark.parametrize("spec", ["nm:2:4", "nm:1:4", "nm:3:8", "nm:4:4"])
@pytest.mark.parametrize("shape", [(8, 16), (6, 10), (4, 6, 3, 3), (5, 13)])
def test_nm_structure(spec, shape):
    k = parse_mask(spec)
    mask = make_mask(spec, shape, k.n / k.m, seed=0, name="w")
    mat = reference_view(mask)
    for row in mat:
        for start in range(0, len(row), k.m):
            group = row[start:start + k.m]
            want = k.n if len(group) == k.m else round(k.n / k.m * len(group))
            assert int(group.sum()) == want, (start, group)


def test_nm_follows_in_axes_order():
    # in_axes=(2, 3, 1): groups of M consecutive input channels at one kernel position (NHWC GEMM)
    mask = make_mask("nm:2:4", (8, 16, 3, 3), 0.5, seed=0, name="w", in_axes=(2, 3, 1))
    for o in range(8):
        for y in range(3):
            for x in range(3):
                channels = mask[o, :, y, x]
                for start in range(0, 16, 4):
                    assert int(channels[start:start + 4].sum()) == 2


def test_out_axis_for_transposed_layout():
    # an (in, out) weight (HF Conv1D, transposed conv): the matrix rows are axis 1
    mask = make_mask("balanced_block:4", (24, 8), 0.5, seed=0, name="w", out_axis=1, in_axes=(0,))
    per_row: dict[int, int] = {}
    for i, _, tile in blocks(mask.T, 4):
        assert tile.min() == tile.max()
        per_row[i] = per_row.get(i, 0) + int(tile[0, 0])
    assert per_row == {0: 3, 1: 3}  # 2 block-rows of outputs, 3 of 6 fan-in blocks each


def test_as_matrix_is_pytorch_fan_in_view():
    w = torch.arange(2 * 3 * 2 * 2.0).reshape(2, 3, 2, 2)
    assert torch.equal(as_matrix(w), w.reshape(2, -1))
    assert torch.equal(as_matrix(w, 0, (1, 2, 3)), w.reshape(2, -1))
    assert torch.equal(as_matrix(w, 0, (2, 3, 1)), w.permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(as_matrix(w, 1, (0,)), w.permute(1, 0, 2, 3).reshape(3, -1))


def test_nm_density_is_the_kinds():
    with pytest.raises(ValueError, match="nm:2:4 has density 0.5, got density 0.3"):
        make_mask("nm:2:4", (8, 8), 0.3, seed=0, name="fc.weight")
    assert mask_density(make_mask("nm:2:4", (8, 8), 0.5, seed=0, name="fc.weight")) == 0.5


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.1, float("nan"), True, "0.5"])
def test_bad_density(density):
    with pytest.raises(ValueError, match=r"fc\.weight: density must be in \(0, 1\]"):
        make_mask("uniform", (4, 4), density, seed=0, name="fc.weight")


def test_bad_kind_and_axes():
    with pytest.raises(ValueError, match="unknown mask kind 'foo'"):
        make_mask("foo", (4, 4), 0.5, seed=0, name="w")
    with pytest.raises(ValueError, match="'block:0'"):
        make_mask("block:0", (4, 4), 0.5, seed=0, name="w")
    with pytest.raises(ValueError, match="must be distinct"):
        make_mask("uniform", (4, 4), 0.5, seed=0, name="w", out_axis=1, in_axes=(1,))
    with pytest.raises(ValueError, match="out of range"):
        make_mask("uniform", (4, 4), 0.5, seed=0, name="w", in_axes=(2,))
    with pytest.raises(SparsegraphError):  # the CLI prints these as one line
        parse_mask("foo")


def test_mask_density():
    assert mask_density(torch.tensor([[1.0, 0.0], [0.0, 0.0]])) == 0.25
    assert mask_density(torch.ones(3, 3, dtype=torch.bool)) == 1.0
    assert mask_density(torch.zeros(0, 3)) == 0.0


# ---------------------------------------------------------------------------------------------
# ERK
# ---------------------------------------------------------------------------------------------
LAYERS = {"a": (4, 4), "b": (32, 16), "c": (14, 14, 2, 2)}  # 16 + 512 + 784 = 1312 parameters


def test_erk_hand_computed_with_a_capped_layer():
    # scale = Σ dims / Π dims; scale * numel = Σ dims:  a: 8/16, 8   b: 48/512, 48   c: 32/784, 32
    # density 0.25 -> target nnz = 0.25 * 1312 = 328
    # round 1: eps = 328 / (8 + 48 + 32) = 3.7273; a would get 0.5 * 3.7273 = 1.86 > 1 -> dense
    # round 2: eps = (328 - 16) / (48 + 32) = 3.9
    #          b = 3.9 * 48/512 = 0.365625 (187.2 nnz), c = 3.9 * 32/784 = 124.8/784 (124.8 nnz)
    #          16 + 187.2 + 124.8 = 328
    d = erk_densities(LAYERS, 0.25)
    assert list(d) == ["a", "b", "c"]
    assert d["a"] == 1.0
    assert d["b"] == pytest.approx(0.365625, rel=1e-12)
    assert d["c"] == pytest.approx(124.8 / 784, rel=1e-12)
    nnz = sum(d[n] * math.prod(s) for n, s in LAYERS.items())
    assert nnz == pytest.approx(0.25 * 1312, rel=1e-12)
    rounded = sum(round(d[n] * math.prod(s)) for n, s in LAYERS.items())
    assert abs(rounded - 328) <= len(LAYERS) / 2


def test_er_ignores_kernel_dims():
    # ER: scale = (out + in) / (out * in):  a: 8/16 (x16 = 8)  b: 48/512 (48)  c: 28/196 (x784 = 112)
    # eps = 328 / (8 + 48 + 112) = 328/168 = 1.95238; a = 0.97619 < 1, nothing is capped
    d = erk_densities(LAYERS, 0.25, erdos_renyi=True)
    eps = 328 / 168
    assert d == pytest.approx({"a": 0.5 * eps, "b": 48 / 512 * eps, "c": 28 / 196 * eps}, rel=1e-12)


def test_erk_edge_cases():
    assert erk_densities(LAYERS, 1.0) == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert erk_densities({"only": (64, 32, 3, 3)}, 0.1) == {"only": pytest.approx(0.1)}
    # several caps: at 0.5, a and b both exceed 1 in round one; c takes the rest
    d = erk_densities({"a": (4, 2), "b": (8, 8), "c": (16, 8, 3, 3)}, 0.5)
    assert d == pytest.approx({"a": 1.0, "b": 1.0, "c": (612 - 8 - 64) / 1152})
    with pytest.raises(ValueError, match="bias: ERK needs a weight of rank >= 2"):
        erk_densities({"bias": (16,)}, 0.5)
    with pytest.raises(ValueError, match="density must be in"):
        erk_densities(LAYERS, 0.0)


# ---------------------------------------------------------------------------------------------
# widths that are not a multiple of the block; stacks of expert matrices
# ---------------------------------------------------------------------------------------------
def test_balanced_block_grid_on_ragged_widths_by_hand():
    from sparsegraph.masks import density_steps, planned_density

    # (40, 50), B = 16: a 3 x 4 block grid whose last row is 8 high and last column 2 wide
    assert density_steps("balanced_block:16", (40, 50)) == 4  # blocks per block-row: ceil(50 / 16)
    assert density_steps("block:16", (40, 50)) == 12  # ceil(40 / 16) * ceil(50 / 16)
    assert density_steps("uniform", (40, 50)) == 2000 and density_steps("nm:2:4", (40, 50)) is None
    assert planned_density("balanced_block:16", (40, 50), 0.3) == 0.25  # round(0.3 * 4) = 1 block of 4
    assert planned_density("balanced_block:16", (40, 50), 0.6) == 0.5  # round(2.4) = 2 of 4
    assert planned_density("block:16", (40, 50), 0.3) == 4 / 12  # round(3.6) = 4 of 12
    for density in (0.25, 0.5, 0.75):
        mask = make_mask("balanced_block:16", (40, 50), density, seed=5, name="w")
        per_row = [sum(int(t[0, 0]) for i2, _, t in blocks(mask, 16) if i2 == i) for i in range(3)]
        assert per_row == [round(density * 4)] * 3  # the ragged column is a block like any other
        # the true density counts the ragged blocks at their size: 16·16, 16·2, 8·16, 8·2 elements
        sizes = {(i, j): t.numel() for i, j, t in blocks(mask, 16)}
        on = sum(sizes[(i, j)] for i, j, t in blocks(mask, 16) if t[0, 0] == 1)
        assert int(mask.sum()) == on


def test_sparsify_reports_the_true_density_of_ragged_block_masks():
    import sparsegraph as sg

    class MLP(torch.nn.Module):  # hidden width 40: not a multiple of 16
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = torch.nn.Linear(24, 40), torch.nn.Linear(40, 40), torch.nn.Linear(40, 8)

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    model = sg.sparsify(MLP(), (torch.randn(4, 24),), "sparse_parallel", 0.5, mask="balanced_block:16")
    for w in model.plan.sparse_weights:
        mask = model.get_buffer(w.name + "_mask")
        assert w.density == float(mask.sum()) / mask.numel()  # measured, not the planned c / steps
        per_row = [sum(int(t[0, 0]) for i2, _, t in blocks(mask, 16) if i2 == i) for i in range(3)]
        assert len(set(per_row)) == 1


def test_expert_stacks_are_masked_one_matrix_at_a_time():
    from sparsegraph.masks import planned_density

    mask = make_mask("uniform", (4, 12, 10), 0.25, seed=0, name="experts", out_axis=1, in_axes=(2,), batch_axes=(0,))
    assert mask.flatten(1).sum(1).tolist() == [30.0] * 4  # round(0.25 * 120) in every expert
    for e in range(4):  # each is the mask of its own name, `experts[e]`
        assert torch.equal(mask[e], make_mask("uniform", (12, 10), 0.25, seed=0, name=f"experts[{e}]"))
    nm = make_mask("nm:2:4", (3, 8, 12), 0.5, seed=0, name="x", out_axis=1, in_axes=(2,), batch_axes=(0,))
    assert (nm.reshape(3, 8, 3, 4).sum(-1) == 2).all()
    assert planned_density("balanced_block:4", (3, 8, 10), 0.5, 1, (2,), (0,)) == 2 / 3  # per expert: ceil(10/4)
