"""Spectral gaps of masks: hand-checked graphs, random regular expanders, clustered masks, views."""
import math

import networkx as nx
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from sparsegraph.masks import make_mask
from sparsegraph.spectral import (biadjacency, bipartite_graph, graph_gaps, mask_spectra,
                                  spectral_gaps)


def regular_bipartite(n: int, d: int, seed: int) -> torch.Tensor:
    """An n x n 0/1 matrix with exactly d ones in every row and column: a union of d random
    perfect matchings, each drawn among the positions still free (a random-cost assignment that
    forbids the taken ones; the free positions form an (n-k)-regular bipartite graph, which always
    has a perfect matching)."""
    rng = np.random.default_rng(seed)
    m = np.zeros((n, n))
    for _ in range(d):
        rows, cols = linear_sum_assignment(rng.random((n, n)) + 1e6 * m)
        assert m[rows, cols].max() == 0
        m[rows, cols] = 1
    return torch.tensor(m, dtype=torch.float32)


def svd_top2(mask: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(mask.double().numpy(), compute_uv=False)[:2]


# ---------------------------------------------------------------------------------------------
# hand-checked graphs
# ---------------------------------------------------------------------------------------------
def test_complete_bipartite():
    # K_{3,5}: biadjacency = all-ones 3x5 = rank one, σ = (√15, 0, 0); outputs have degree 5,
    # inputs degree 3.  Δr = √4 + √2 - 0 = 3.41421;  λ = √15 - 0 = 3.87298
    r = spectral_gaps(torch.ones(3, 5))
    assert (r["d_left"], r["d_right"], r["edges"], r["n_left"], r["n_right"]) == (5.0, 3.0, 15, 3, 5)
    assert r["mu0"] == pytest.approx(math.sqrt(15))
    assert r["mu"] == pytest.approx(0.0, abs=1e-12)
    assert r["ramanujan_gap"] == pytest.approx(2 + math.sqrt(2))
    assert r["weighted_gap"] == pytest.approx(math.sqrt(15))
    assert spectral_gaps(torch.ones(3, 5, dtype=torch.bool)) == pytest.approx(r)


def test_cycle_c8():
    # the 8-cycle as a 4x4 biadjacency I + shift: singular values |1 + i^k| = 2, √2, 0, √2
    # d = 2 on both sides: Δr = 1 + 1 - √2 = 0.58579 (a cycle is Ramanujan)
    c = torch.zeros(4, 4)
    for i in range(4):
        c[i, i] = c[i, (i + 1) % 4] = 1
    r = spectral_gaps(c)
    assert (r["d_left"], r["d_right"]) == (2.0, 2.0)
    assert r["mu0"] == pytest.approx(2.0)
    assert r["mu"] == pytest.approx(math.sqrt(2))
    assert r["ramanujan_gap"] == pytest.approx(2 - math.sqrt(2))


def test_single_dense_block_is_complete_bipartite():
    # One dense 8x8 block in an empty 32x48 mask: isolated nodes are left out of the degree
    # averages, so this is K_{8,8}: d = 8, μ̂ = 0, Δr = 2√7 > 0.  (Its spectrum is rank one: a
    # lone dense block is a perfect, if tiny, expander; clustering shows up with two blocks.)
    m = torch.zeros(32, 48)
    m[4:12, 20:28] = 1
    r = spectral_gaps(m)
    assert (r["d_left"], r["d_right"], r["n_left"], r["n_right"]) == (8.0, 8.0, 8, 8)
    assert r["mu"] == pytest.approx(0.0, abs=1e-12)
    assert r["ramanujan_gap"] == pytest.approx(2 * math.sqrt(7))


def test_two_dense_blocks_have_negative_gap():
    # block diagonal diag(J_8, J_8): two components, σ = (8, 8, 0, ...), d = 8
    # μ̂ = 8 (multiplicity counts), Δr = 2√7 - 8 = -2.70850, λ = 8 - 8 = 0
    m = torch.zeros(16, 16)
    m[:8, :8] = m[8:, 8:] = 1
    r = spectral_gaps(m)
    assert r["mu0"] == pytest.approx(8.0) and r["mu"] == pytest.approx(8.0)
    assert r["ramanujan_gap"] == pytest.approx(2 * math.sqrt(7) - 8)
    assert r["ramanujan_gap"] < 0
    assert r["weighted_gap"] == pytest.approx(0.0, abs=1e-12)


def test_isolated_nodes_do_not_dilute_degrees():
    padded = torch.zeros(6, 9)
    padded[1:4, 2:7] = 1  # K_{3,5} plus 3 dead outputs and 4 dead inputs
    a, b = spectral_gaps(padded), spectral_gaps(torch.ones(3, 5))
    assert a == pytest.approx(b)


def test_empty_mask():
    r = spectral_gaps(torch.zeros(5, 7))
    assert r["edges"] == 0 and r["mu0"] == 0.0 and r["mu"] == 0.0 and r["weighted_gap"] == 0.0
    assert math.isnan(r["ramanujan_gap"])


def test_weighted_gap_uses_absolute_weights():
    # diag(3, 1) on an identity mask: σ = (3, 1), λ = 2 (the unweighted graph has λ = 1 - 1 = 0)
    r = spectral_gaps(torch.eye(2), torch.diag(torch.tensor([3.0, -1.0])))
    assert r["weighted_gap"] == pytest.approx(2.0)
    assert r["ramanujan_gap"] == pytest.approx(-1.0)  # two isolated edges: d = 1, μ̂ = 1
    # |W| = [[3, 4], [6, 8]] = (1, 2)^T (3, 4): rank one, σ_0 = √5 · 5, λ = 5√5
    r = spectral_gaps(torch.ones(2, 2), torch.tensor([[3.0, -4.0], [-6.0, 8.0]]))
    assert r["weighted_gap"] == pytest.approx(5 * math.sqrt(5))
    # weights outside the mask do not count
    r = spectral_gaps(torch.eye(2), torch.full((2, 2), 100.0))
    assert r["weighted_mu0"] == pytest.approx(100.0) and r["weighted_gap"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="weight shape"):
        spectral_gaps(torch.eye(2), torch.ones(3, 2))


# ---------------------------------------------------------------------------------------------
# random regular graphs are Ramanujan; clustered masks are not
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_random_regular_bipartite_is_ramanujan(seed):
    # 16-regular on 64 + 64 nodes: the non-trivial spectrum sits near 2√(d(1 - d/n)) = 6.93, well
    # inside the bound 2√15 = 7.75 (over 40 seeds the smallest gap seen was +0.74)
    m = regular_bipartite(64, 16, seed)
    assert (m.sum(0) == 16).all() and (m.sum(1) == 16).all()
    r = spectral_gaps(m)
    assert (r["d_left"], r["d_right"]) == (16.0, 16.0)
    assert r["mu0"] == pytest.approx(16.0)
    assert r["ramanujan_gap"] >= 0


def test_block_sparse_mask_is_not_ramanujan_but_uniform_is():
    # same shape and density: random positions expand, whole 16x16 blocks cluster
    uniform = spectral_gaps(make_mask("uniform", (256, 256), 0.25, seed=0, name="w"))
    blocked = spectral_gaps(make_mask("block:16", (256, 256), 0.25, seed=0, name="w"))
    assert uniform["ramanujan_gap"] > 0
    assert blocked["ramanujan_gap"] < 0


# ---------------------------------------------------------------------------------------------
# numerics: ARPACK and component paths against a dense SVD
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, shape, density", [
    ("uniform", (600, 700), 0.03),  # one component, sparse eigen-solver
    ("block:16", (512, 512), 0.05),  # many components, several equally strong
    ("balanced_block:8", (300, 400), 0.02),
    ("block:8", (400, 400), 0.004),  # isolated 8x8 blocks: σ_0 = σ_1 = 8 exactly
    ("nm:1:8", (400, 320), 0.125),
])
def test_top_singular_values_match_dense_svd(kind, shape, density):
    m = make_mask(kind, shape, density, seed=7, name="w")
    r = spectral_gaps(m)
    assert [r["mu0"], r["mu"]] == pytest.approx(svd_top2(m), rel=1e-5)
    w = torch.randn(shape)
    rw = spectral_gaps(m, w)
    assert [rw["weighted_mu0"], rw["weighted_mu"]] == pytest.approx(svd_top2(w.abs() * m), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# views: conv weights, axes, networkx
# ---------------------------------------------------------------------------------------------
def test_conv_uses_the_unrolled_matrix_view():
    m = make_mask("uniform", (16, 8, 3, 3), 0.2, seed=0, name="conv")
    w = torch.randn(16, 8, 3, 3)
    flat = spectral_gaps(m.reshape(16, -1), w.reshape(16, -1))
    assert flat["n_left"] + flat["n_right"] <= 16 + 72
    assert spectral_gaps(m, w) == pytest.approx(flat)
    # ordering the fan-in differently permutes columns only: same graph
    assert spectral_gaps(m, w, in_axes=(2, 3, 1)) == pytest.approx(flat)
    # the same weight stored (in, out, kh, kw), as a transposed conv stores it
    assert spectral_gaps(m.transpose(0, 1), w.transpose(0, 1), out_axis=1, in_axes=(0,)) == pytest.approx(flat)


def test_networkx_graph_matches_the_direct_path():
    m = make_mask("uniform", (40, 30), 0.2, seed=0, name="w")
    w = torch.randn(40, 30)
    g = bipartite_graph(m, w)
    assert g.number_of_nodes() == 70 and g.number_of_edges() == int(m.sum())
    assert nx.is_bipartite(g)
    assert {v for v, side in g.nodes(data="bipartite") if side == 0} == set(range(40))
    b = nx.bipartite.biadjacency_matrix(g, row_order=range(40), column_order=range(40, 70))
    assert np.allclose(b.toarray(), (w.abs() * m).double().numpy())
    assert np.array_equal(biadjacency(m).toarray(), m.double().numpy())
    assert graph_gaps(g) == pytest.approx(spectral_gaps(m, w))
    assert graph_gaps(g, weight=None) == pytest.approx(spectral_gaps(m))


def test_mask_spectra_on_a_captured_model():
    from sparsegraph.capture import capture
    from sparsegraph.layers import find_layers

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)
            self.fc1.register_buffer("weight_mask", make_mask("nm:1:4", (64, 32), 0.25, seed=0, name="fc1.weight"))

        def forward(self, x):
            return self.fc2(torch.nn.functional.linear(x, self.fc1.weight * self.fc1.weight_mask).relu())

    net = Net()
    g = capture(net, (torch.randn(2, 32),))
    rows = mask_spectra(g, find_layers(g))
    assert [r["layer"] for r in rows] == ["fc1"]  # fc2 has no mask
    assert rows[0]["weight"] == "fc1.weight"
    assert {k: v for k, v in rows[0].items() if k not in ("layer", "weight")} == pytest.approx(
        spectral_gaps(net.fc1.weight_mask, net.fc1.weight))
