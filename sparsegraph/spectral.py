"""Spectral analysis of a mask's bipartite graph: the Ramanujan gap and the weighted spectral gap.

A layer is a bipartite graph G = (outputs ∪ inputs, E): one left node per output neuron, one right
node per fan-in input, one edge per nonzero mask entry.  For a conv weight (out, in, kh, kw) the
right nodes are (input channel, kernel position) pairs -- the (out, in*kh*kw) matrix view of
`masks.as_matrix`, i.e. the im2col GEMM the layer really computes.  That graph is simple (no
multi-edges), so the bounds for simple biregular graphs below apply as stated; it is also the view
of Hoang et al.'s reference code, which reshapes conv weights to (c_out, -1).

The adjacency matrix of G is [[0, B], [B^T, 0]] with B the (out x in) biadjacency matrix, so its
eigenvalues are ± the singular values σ_0 ≥ σ_1 ≥ ... of B.  μ_0 = σ_0 is the trivial eigenvalue
(±μ_0 both are, G being bipartite) and μ̂ = σ_1, counted with multiplicity: a graph made of two
identical components has μ̂ = μ_0, as it should (it does not expand at all).

Definitions (Hoang, Liu, Marculescu, Wang, "Revisiting Pruning at Initialization through the
Lens of Ramanujan Graph", ICLR 2023, section 3; after Pal et al., "A Study on the Ramanujan Graph
Property of Winning Lottery Tickets", ICML 2022):

  * a (d_L, d_R)-biregular bipartite graph is Ramanujan iff μ̂ ≤ √(d_L − 1) + √(d_R − 1);
  * for irregular graphs the degrees are replaced by the average degrees d̄_L, d̄_R, giving the
    Ramanujan gap  Δr = √(d̄_L − 1) + √(d̄_R − 1) − μ̂  (≥ 0: Ramanujan-like expander);
  * the weighted spectral gap  λ = μ_0 − μ̂  of the weighted biadjacency |W| (edge weight = |w|).

Zero-degree nodes (pruned-away neurons or inputs) are excluded from the average degrees, as in the
paper's reference code (they would only dilute d̄ and have no effect on the spectrum).

`spectral_gaps` builds B directly from the mask with scipy (a few ms for a 2048 x 2048 mask); the
same B is the networkx biadjacency of `bipartite_graph(...)` (tested), and `graph_gaps` computes
the gaps of any networkx bipartite graph.  Building the networkx graph of a large layer costs
seconds (about 2 s for 4·10^5 edges), which is why the mask path does not go through it.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
from networkx.algorithms import bipartite
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import svds

from .masks import as_matrix

__all__ = ["spectral_gaps", "biadjacency", "bipartite_graph", "graph_gaps", "mask_spectra"]

_DENSE_SVD_MAX = 1 << 16  # components up to this many cells (256 x 256) use a dense SVD


# ---------------------------------------------------------------------------------------------
# graphs
# ---------------------------------------------------------------------------------------------
def biadjacency(mask: torch.Tensor, weight: torch.Tensor | None = None, *, out_axis: int = 0,
                in_axes: tuple[int, ...] = (1,)) -> sp.csr_array:
    """The (out x fan-in) biadjacency matrix: 1 per mask nonzero, or |w| there when `weight` is given."""
    mask = torch.as_tensor(mask).detach()
    m = as_matrix(mask, out_axis, in_axes).cpu() != 0
    rows, cols = torch.nonzero(m, as_tuple=True)
    if weight is None:
        data = np.ones(rows.numel())
    else:
        weight = torch.as_tensor(weight).detach()
        if tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(f"weight shape {tuple(weight.shape)} differs from mask shape {tuple(mask.shape)}")
        data = as_matrix(weight, out_axis, in_axes).cpu()[rows, cols].double().abs().numpy()
    out = sp.csr_array((data, (rows.numpy(), cols.numpy())), shape=tuple(m.shape))
    out.eliminate_zeros()  # a masked-in weight that is exactly 0 carries no weight
    return out


def bipartite_graph(mask: torch.Tensor, weight: torch.Tensor | None = None, *, out_axis: int = 0,
                    in_axes: tuple[int, ...] = (1,)) -> nx.Graph:
    """The layer as a networkx bipartite graph.

    Nodes 0 .. rows-1 are the outputs (attribute bipartite=0), rows .. rows+cols-1 the fan-in
    inputs (bipartite=1); every edge carries 'weight' (1, or |w| when `weight` is given).
    """
    return bipartite.from_biadjacency_matrix(biadjacency(mask, weight, out_axis=out_axis, in_axes=in_axes))


def _graph_biadjacency(graph: nx.Graph, weight: str | None) -> sp.csr_array:
    sides = nx.get_node_attributes(graph, "bipartite")
    if len(sides) != graph.number_of_nodes():
        raise ValueError("every node of the graph needs a 'bipartite' attribute (0 = outputs, 1 = inputs)")
    left = [v for v in graph if sides[v] == 0]
    right = [v for v in graph if sides[v] != 0]
    return sp.csr_array(bipartite.biadjacency_matrix(graph, row_order=left, column_order=right,
                                                     weight=weight, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# spectra
# ---------------------------------------------------------------------------------------------
def _top2_connected(b: sp.csr_array) -> list[float]:
    """The two largest singular values of a matrix whose bipartite graph is connected."""
    rows, cols = b.shape
    if b.nnz == rows * cols:  # complete bipartite with equal weights w: exactly w·√(rows·cols), 0
        if np.all(b.data == b.data[0]):
            return [float(b.data[0]) * math.sqrt(rows * cols), 0.0]
    if min(rows, cols) <= 2 or rows * cols <= _DENSE_SVD_MAX:
        s = np.linalg.svd(b.toarray(), compute_uv=False)
    else:
        # ARPACK in single precision (twice as fast; ~1e-6 relative error, plenty for a gap) from
        # a fixed random start: a constant start vector is orthogonal to every non-trivial
        # singular vector of a biregular graph.  Connected, so σ_0 is simple.
        v0 = np.random.default_rng(0).standard_normal(min(rows, cols)).astype(np.float32)
        s = svds(b.astype(np.float32), k=2, v0=v0, return_singular_vectors=False)
    s = sorted((float(x) for x in s), reverse=True)
    return (s + [0.0, 0.0])[:2]


def _components(b: sp.csr_array) -> tuple[int, np.ndarray, np.ndarray]:
    """Connected components of the bipartite graph: (count, row labels, column labels)."""
    rows, cols = b.shape
    # the graph as an (rows+cols)-square matrix with only the out -> in edges; its weakly
    # connected components are the components of the undirected bipartite graph
    indptr = np.concatenate([b.indptr, np.full(cols, b.indptr[-1], dtype=b.indptr.dtype)])
    adj = sp.csr_array((b.data, b.indices + rows, indptr), shape=(rows + cols, rows + cols))
    n, label = connected_components(adj, directed=True, connection="weak")
    return n, label[:rows], label[rows:]


def _top2(b: sp.csr_array) -> tuple[float, float]:
    """σ_0 and σ_1 of a nonnegative biadjacency matrix, multiplicities included.

    Lanczos methods can miss a repeated top singular value, and σ_0 repeats exactly when several
    components are equally strong, so the spectrum is assembled from the connected components:
    each component's σ_0 is simple (Perron-Frobenius), and the top two of the union of every
    component's (σ_0, σ_1) are the top two of B.
    """
    if b.nnz == 0:
        return 0.0, 0.0
    n, row_label, col_label = _components(b)
    if n == 1:  # connected, no isolated nodes
        return tuple(_top2_connected(b))
    row_order, col_order = np.argsort(row_label, kind="stable"), np.argsort(col_label, kind="stable")
    rl, cl = row_label[row_order], col_label[col_order]
    sb = b[row_order][:, col_order].tocsr()  # components become diagonal blocks
    live = np.unique(row_label[np.diff(b.indptr) > 0])  # components with at least one edge
    values: list[float] = []
    for c in live:
        r0, r1 = np.searchsorted(rl, c), np.searchsorted(rl, c, side="right")
        c0, c1 = np.searchsorted(cl, c), np.searchsorted(cl, c, side="right")
        values += _top2_connected(sb[r0:r1, c0:c1])
    values.sort(reverse=True)
    return values[0], values[1]


def _gaps(b: sp.csr_array, w: sp.csr_array) -> dict[str, Any]:
    """Degrees, μ_0, μ̂, Δr and λ from the 0/1 biadjacency `b` and the weighted one `w`."""
    deg_out = np.diff(b.indptr)
    deg_in = np.bincount(b.indices, minlength=b.shape[1])
    live_out, live_in = deg_out[deg_out > 0], deg_in[deg_in > 0]
    d_left = float(live_out.mean()) if live_out.size else 0.0
    d_right = float(live_in.mean()) if live_in.size else 0.0
    mu0, mu = _top2(b)
    if b.nnz:
        # Hoang et al. 2023, section 3: Δr = √(d̄_L − 1) + √(d̄_R − 1) − μ̂ (d̄ ≥ 1 once isolated
        # nodes are excluded).
        ramanujan_gap = math.sqrt(d_left - 1) + math.sqrt(d_right - 1) - mu
    else:
        ramanujan_gap = float("nan")  # no edges: the bound is undefined
    w_mu0, w_mu = (mu0, mu) if w is b else _top2(w)
    return {
        "d_left": d_left, "d_right": d_right,  # mean degrees of the output / input sides
        "mu0": mu0, "mu": mu, "ramanujan_gap": ramanujan_gap,
        "weighted_mu0": w_mu0, "weighted_mu": w_mu,
        "weighted_gap": w_mu0 - w_mu,  # Hoang et al. 2023, section 3: λ = μ_0 − μ̂ of |W|
        "edges": int(b.nnz), "n_left": int(live_out.size), "n_right": int(live_in.size),
    }


def spectral_gaps(mask: torch.Tensor, weight: torch.Tensor | None = None, *, out_axis: int = 0,
                  in_axes: tuple[int, ...] = (1,)) -> dict[str, Any]:
    """Spectral gaps of a mask's bipartite graph (see the module docstring for the definitions).

    Returns d_left / d_right (mean degree of the non-isolated output / input nodes), mu0 and mu
    (μ_0 and the largest non-trivial eigenvalue μ̂), ramanujan_gap (Δr; NaN for a mask without
    nonzeros), weighted_mu0 / weighted_mu / weighted_gap (the same with |W| as edge weights; the
    mask itself when `weight` is None), edges, and n_left / n_right (non-isolated node counts).
    """
    b = biadjacency(mask, out_axis=out_axis, in_axes=in_axes)
    w = b if weight is None else biadjacency(mask, weight, out_axis=out_axis, in_axes=in_axes)
    return _gaps(b, w)


def graph_gaps(graph: nx.Graph, weight: str | None = "weight") -> dict[str, Any]:
    """`spectral_gaps` of a networkx bipartite graph (node attribute bipartite: 0 = outputs).

    Edge attribute `weight` gives the weighted gap (missing weights count as 1).
    """
    b = _graph_biadjacency(graph, None)
    w = _graph_biadjacency(graph, weight) if weight is not None else b
    w.eliminate_zeros()
    return _gaps(b, w)


# ---------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------
def _attr(root: Any, fqn: str) -> Any:
    obj = root
    for part in fqn.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def mask_spectra(g, layers: Iterable) -> list[dict[str, Any]]:
    """`spectral_gaps` of every masked layer (`weight * weight_mask` in the graph) of a captured
    PyTorch model, in layer order: one dict per layer with its `layer` and `weight` names.

    Masks are found through the graph's `mask_mul` ops; unmasked (dense) layers are skipped.
    ONNX graphs carry no mask buffers and give an empty list.
    """
    if g.frontend != "torch" or g.source is None:
        return []
    mask_of = {}
    for op in g:
        if op.op == "mask_mul":
            w, m = g.values[op.ref("weight")], g.values[op.ref("mask")]
            mask_of[w.param] = m.param
    out = []
    for layer in layers:
        mask = _attr(g.source, mask_of.get(layer.weight) or "")
        weight = _attr(g.source, layer.weight)
        if not isinstance(mask, torch.Tensor) or mask.is_meta:
            continue
        if not isinstance(weight, torch.Tensor) or weight.is_meta or weight.shape != mask.shape:
            weight = None
        gaps = spectral_gaps(mask, weight, out_axis=layer.out_axis, in_axes=tuple(layer.in_axes))
        out.append({"layer": layer.name, "weight": layer.weight, **gaps})
    return out
