"""The units a dynamic-sparsity method turns on and off, chosen from a weight's mask kind.

  uniform / erk       single weights, one pool (the whole layer)
  nm:N:M              single weights; each group of M consecutive fan-in entries is a pool, so
                      regrowing in the pool a weight was dropped from keeps N:M
  block:B             B x B blocks of the (out, fan-in) matrix view, one pool
  balanced_block:B    B x B blocks; each block-row is a pool (keeps the same count in every row)

A unit's score is the mean of |x| over its entries (ragged edge blocks are compared fairly).
The matrix view is the one `sparsegraph.masks.make_mask` used to lay the mask out.
"""
from __future__ import annotations

import math

import torch

from ..masks import MaskKind, _from_matrix, _view_axes, as_matrix, parse_mask


class Units:
    """Per-layer map between element tensors of the weight's shape and a flat vector of units."""

    def __init__(self, shape, out_axis: int | None, in_axes, mask_kind: str | MaskKind):
        self.shape = tuple(int(s) for s in shape)
        self.kind = parse_mask(mask_kind)
        out_axis = 0 if out_axis is None else out_axis
        in_axes = tuple(in_axes) if in_axes else tuple(a for a in range(len(self.shape)) if a != out_axis)
        self.out_axis, self.in_axes = out_axis, in_axes
        self.perm = _view_axes(self.shape, out_axis, in_axes)
        self.rows = self.shape[self.perm[0]]
        self.cols = math.prod(self.shape[a] for a in self.perm[1:])
        self.block = self.kind.block
        if self.block:
            self.brows, self.bcols = math.ceil(self.rows / self.block), math.ceil(self.cols / self.block)
            self.size = block_sizes(self.rows, self.cols, self.block)  # (units,) entries per block
        else:
            self.size = None
        self.pools = self._pools()  # (units,) int64 pool id, or None for a single pool

    # -- geometry -----------------------------------------------------------------------------
    @property
    def granularity(self) -> str:
        return f"block {self.block}x{self.block}" if self.block else "element"

    @property
    def count(self) -> int:
        return self.brows * self.bcols if self.block else self.rows * self.cols

    def _pools(self) -> torch.Tensor | None:
        if self.kind.name == "balanced_block":  # a block-row per pool
            return torch.arange(self.brows).repeat_interleave(self.bcols)
        if self.kind.name == "nm":  # a group of M consecutive fan-in entries per pool (ragged tail: its own)
            groups = math.ceil(self.cols / self.kind.m)
            col_group = torch.arange(self.cols) // self.kind.m  # (cols,)
            return (torch.arange(self.rows)[:, None] * groups + col_group[None, :]).reshape(-1)
        return None

    def _matrix(self, t: torch.Tensor) -> torch.Tensor:
        return as_matrix(t, self.out_axis, self.in_axes)  # (rows, cols)

    def _block_sum(self, mat: torch.Tensor) -> torch.Tensor:
        b = self.block
        padded = mat.new_zeros(self.brows * b, self.bcols * b)
        padded[:self.rows, :self.cols] = mat
        return padded.reshape(self.brows, b, self.bcols, b).sum(dim=(1, 3)).reshape(-1)  # (units,)

    # -- element tensor <-> units -------------------------------------------------------------
    def score(self, t: torch.Tensor) -> torch.Tensor:
        """(units,) mean |t| over each unit's entries (float32, or float64 for float64 input)."""
        mat = self._matrix(t.detach()).abs().to(torch.promote_types(t.dtype, torch.float32))
        if not self.block:
            return mat.reshape(-1)
        return self._block_sum(mat) / self.size.to(mat)

    def active(self, mask: torch.Tensor) -> torch.Tensor:
        """(units,) bool: units with any nonzero mask entry."""
        return self.score(mask) > 0

    def expand(self, units: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """An element 0/1 tensor of the weight's shape (dtype/device of `like`) from (units,) bool."""
        u = units.to(device=like.device, dtype=like.dtype)
        if self.block:
            grid = u.reshape(self.brows, self.bcols)
            mat = grid.repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)[:self.rows, :self.cols]
        else:
            mat = u.reshape(self.rows, self.cols)
        return _from_matrix(mat, self.shape, self.perm)

    def elements(self, units: torch.Tensor) -> int:
        """Number of weight entries covered by the selected units."""
        if self.block:
            return int(self.size.to(units.device)[units].sum())
        return int(units.sum())


def block_sizes(rows: int, cols: int, block: int) -> torch.Tensor:
    """(ceil(rows/b) * ceil(cols/b),) float32: entries of each b x b block of a (rows, cols) matrix,
    row-major; blocks at ragged edges hold fewer than b².

    >>> block_sizes(5, 3, 2).tolist()
    [4.0, 2.0, 4.0, 2.0, 2.0, 1.0]
    """
    r = (rows - torch.arange(0, rows, block)).clamp(max=block)  # (brows,) rows inside each block-row
    c = (cols - torch.arange(0, cols, block)).clamp(max=block)  # (bcols,)
    return (r[:, None] * c[None, :]).reshape(-1).float()


def top_per_pool(score: torch.Tensor, k: int | torch.Tensor, pools: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) bool: the k highest scores (k per pool when `pools` is given: k is then a (P,) tensor).

    Ties go to the lower index (stable sorts), so every process picks the same units.
    """
    n = score.numel()
    order = torch.sort(score, descending=True, stable=True).indices  # (n,)
    chosen = torch.zeros(n, dtype=torch.bool, device=score.device)
    if pools is None:
        chosen[order[:int(k)]] = True
        return chosen
    pools, k = pools.to(score.device), k.to(score.device)
    pool_of = pools[order]
    by_pool = torch.sort(pool_of, stable=True).indices  # grouped by pool, score order kept inside
    idx, pool_sorted = order[by_pool], pool_of[by_pool]
    counts = torch.bincount(pool_sorted, minlength=int(k.numel()))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=score.device) - starts[pool_sorted]  # position inside its pool
    chosen[idx[rank < k[pool_sorted]]] = True
    return chosen
