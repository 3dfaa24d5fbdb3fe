"""Sparsity masks: pure functions of (kind, shape, density, seed, layer name) -> a 0/1 tensor.

Kinds (DESIGN.md section 3; `parse_mask` reads their spelling):

  uniform            exactly round(density * numel) ones (at least one) at random positions
  erk                per-layer densities from `erk_densities`; inside a layer the mask is uniform
  nm:N:M             N ones in every group of M consecutive fan-in elements (e.g. 2:4)
  block:B            B x B blocks of the matrix view, whole blocks on or off, round(density * blocks) on
  balanced_block:B   as block, with the same number of nonzero blocks in every block-row

The matrix view.  A weight is a matrix of (rows = `out_axis`) x (columns = `in_axes`, flattened in
the order given, last fastest).  Axes that are neither are kernel positions and join the fan-in
after `in_axes`, so the default `in_axes=(1,)` views a conv weight (out, in, kh, kw) as
(out, in*kh*kw) -- `weight.reshape(out, -1)`, PyTorch's own fan-in.  N:M groups, blocks and block-rows
are taken on that view; pass e.g. `in_axes=(2, 3, 1)` for N:M along the channels of an NHWC
implicit GEMM.

Reproducibility.  Every mask is drawn from a `torch.Generator` seeded with `layer_seed(seed, name)`
(a BLAKE2 hash, identical in every process and on every platform), so the same plan gives the same
masks on every rank and after a reload, and two layers never share a random stream.
"""
from __future__ import annotations

import hashlib
import math
import operator
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from .graph import SparsegraphError

__all__ = ["MaskError", "MaskKind", "parse_mask", "layer_seed", "make_mask", "erk_densities",
           "mask_density", "as_matrix", "KINDS", "planned_density", "density_steps"]

KINDS = ("uniform", "erk", "nm:N:M", "block:B", "balanced_block:B")


class MaskError(SparsegraphError, ValueError):
    """A bad mask kind, density, shape or axis; one line naming the offending value."""


# ---------------------------------------------------------------------------------------------
# kinds
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskKind:
    """A parsed mask kind: `name` is uniform | erk | nm | block | balanced_block."""

    name: str
    n: int | None = None  # N of N:M
    m: int | None = None  # M of N:M
    block: int | None = None  # B of block:B / balanced_block:B

    @property
    def density_fixed(self) -> float | None:
        """The density the kind itself dictates (N/M for N:M), else None."""
        return self.n / self.m if self.name == "nm" else None

    def __str__(self) -> str:
        if self.name == "nm":
            return f"nm:{self.n}:{self.m}"
        if self.block is not None:
            return f"{self.name}:{self.block}"
        return self.name


_NM = re.compile(r"nm:(\d+):(\d+)")
_BLOCK = re.compile(r"(block|balanced_block):(-?\d+)")


def parse_mask(kind: str) -> MaskKind:
    """'uniform' | 'erk' | 'nm:N:M' (1 <= N <= M) | 'block:B' | 'balanced_block:B' (B >= 1)."""
    if isinstance(kind, MaskKind):
        return kind
    if not isinstance(kind, str):
        raise MaskError(f"mask kind must be a string such as 'uniform' or 'nm:2:4', got {kind!r}")
    s = kind.strip().lower()
    if s in ("uniform", "erk"):
        return MaskKind(s)
    if (hit := _NM.fullmatch(s)) is not None:
        n, m = int(hit[1]), int(hit[2])
        if not 1 <= n <= m:
            raise MaskError(f"mask kind {kind!r}: N:M needs 1 <= N <= M, got N={n}, M={m}")
        return MaskKind("nm", n=n, m=m)
    if (hit := _BLOCK.fullmatch(s)) is not None:
        b = int(hit[2])
        if b < 1:
            raise MaskError(f"mask kind {kind!r}: the block size must be a positive integer, got {b}")
        return MaskKind(hit[1], block=b)
    raise MaskError(f"unknown mask kind {kind!r}: expected one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------
# seeds and the matrix view
# ---------------------------------------------------------------------------------------------
def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from (seed, layer name); stable across processes and platforms."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _view_axes(shape: tuple[int, ...], out_axis: int, in_axes: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation (out_axis, *in_axes, *other axes) that makes the weight a (rows, cols) matrix."""
    nd = len(shape)

    def norm(a: int) -> int:
        try:
            a = operator.index(a)
        except TypeError:
            raise MaskError(f"axis {a!r} is not an integer (weight of shape {tuple(shape)})") from None
        if not -nd <= a < nd:
            raise MaskError(f"axis {a} is out of range for a weight of shape {tuple(shape)}")
        return a % nd

    out, ins = norm(out_axis), tuple(norm(a) for a in in_axes)
    if out in ins or len(set(ins)) != len(ins):
        raise MaskError(f"out_axis={out_axis} and in_axes={tuple(in_axes)} must be distinct axes "
                        f"of a weight of shape {tuple(shape)}")
    rest = tuple(a for a in range(nd) if a != out and a not in ins)
    return (out, *ins, *rest)


def as_matrix(t: torch.Tensor, out_axis: int = 0, in_axes: tuple[int, ...] = (1,)) -> torch.Tensor:
    """The (out, fan-in) matrix view of a weight or mask (a copy only when a permute needs it)."""
    perm = _view_axes(tuple(t.shape), out_axis, tuple(in_axes))
    rows = t.shape[perm[0]]
    return t.permute(perm).reshape(rows, math.prod(t.shape[a] for a in perm[1:]))


def _from_matrix(mat: torch.Tensor, shape: tuple[int, ...], perm: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `as_matrix`: reshape to the permuted shape, then undo the permutation."""
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return mat.reshape([shape[a] for a in perm]).permute(inverse).contiguous()


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def _count(density: float, n: int) -> int:
    """round(density * n) (Python's round, half to even), at least one (when n > 0)."""
    return min(n, max(1, round(density * n))) if n > 0 else 0


def _uniform(rows: int, cols: int, density: float, gen: torch.Generator) -> torch.Tensor:
    n = rows * cols
    flat = torch.zeros(n)
    flat[torch.randperm(n, generator=gen)[:_count(density, n)]] = 1.0
    return flat.reshape(rows, cols)


def _k_of_last(shape: tuple[int, ...], k: int, gen: torch.Generator) -> torch.Tensor:
    """0/1 tensor of `shape` with exactly k random ones along the last axis of every slice."""
    out = torch.zeros(shape)
    if k > 0:
        keep = torch.rand(shape, generator=gen).topk(k, dim=-1).indices
        out.scatter_(-1, keep, 1.0)
    return out


def _nm(rows: int, cols: int, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """N ones in every M consecutive fan-in elements; a ragged tail of length r keeps round(N/M * r)."""
    full = cols // m * m
    parts = []
    if full:
        parts.append(_k_of_last((rows, full // m, m), n, gen).reshape(rows, full))
    if cols > full:
        tail = cols - full
        parts.append(_k_of_last((rows, tail), round(n / m * tail), gen))
    return torch.cat(parts, dim=1) if parts else torch.zeros(rows, cols)


def _blocks(rows: int, cols: int, b: int, density: float, balanced: bool,
            gen: torch.Generator) -> torch.Tensor:
    """Whole B x B blocks (ragged at the right and bottom edges) on or off."""
    brows, bcols = math.ceil(rows / b), math.ceil(cols / b)
    if balanced:  # the same number of nonzero blocks in every block-row
        grid = _k_of_last((brows, bcols), _count(density, bcols), gen)
    else:
        grid = _uniform(brows, bcols, density, gen)
    return grid.repeat_interleave(b, dim=0).repeat_interleave(b, dim=1)[:rows, :cols]


def _check_density(density: float, name: str) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise MaskError(f"{name}: density must be in (0, 1], got {density!r}")
    return float(density)


def _slice_axes(shape: tuple[int, ...], out_axis: int, in_axes: tuple[int, ...],
                batch_axes: tuple[int, ...]) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """The shape and axes of one matrix of a stack (batch axes removed)."""
    nd = len(shape)
    batch = sorted(a % nd for a in batch_axes)
    keep = [a for a in range(nd) if a not in batch]
    return tuple(shape[a] for a in keep), keep.index(out_axis % nd), tuple(keep.index(a % nd) for a in in_axes)


def make_mask(kind: str | MaskKind, shape: tuple[int, ...], density: float, *, seed: int, name: str,
              out_axis: int = 0, in_axes: tuple[int, ...] = (1,), batch_axes: tuple[int, ...] = ()) -> torch.Tensor:
    """A float32 0/1 mask of `shape`, reproducible from (seed, name); see the module docstring.

    density 1 gives all ones for every kind.  For N:M the density is dictated by the kind: a
    density other than N/M (or 1) is an error rather than silently ignored, so a plan can never
    claim a density its masks do not have.  `batch_axes` (the experts of an MoE weight) index a
    stack of independent matrices: each gets its own mask of the same kind and density, drawn
    under the name `name[i]` (i the flat index over the batch axes).
    """
    if batch_axes:
        nd = len(shape)
        batch = sorted(a % nd for a in batch_axes)
        sub, o, ins = _slice_axes(tuple(shape), out_axis, tuple(in_axes), tuple(batch))
        count = math.prod(shape[a] for a in batch)
        mats = [make_mask(kind, sub, density, seed=seed, name=f"{name}[{i}]", out_axis=o, in_axes=ins)
                for i in range(count)]
        stacked = torch.stack(mats).reshape(*[shape[a] for a in batch], *sub) if mats else torch.zeros(shape)
        keep = [a for a in range(nd) if a not in batch]
        return stacked.permute(sorted(range(nd), key=lambda j: (batch + keep)[j])).contiguous()
    k = parse_mask(kind)
    density = _check_density(density, name)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise MaskError(f"{name}: bad weight shape {shape}")
    perm = _view_axes(shape, out_axis, tuple(in_axes))
    if density == 1.0 or math.prod(shape) == 0:
        return torch.full(shape, float(density == 1.0))
    if k.density_fixed is not None and not math.isclose(density, k.density_fixed, rel_tol=1e-6):
        raise MaskError(f"{name}: mask {k} has density {k.density_fixed:g}, got density {density:g} "
                        f"(pass {k.density_fixed:g}, or 1 for a dense layer)")
    rows, cols = shape[perm[0]], math.prod(shape[a] for a in perm[1:])
    gen = torch.Generator().manual_seed(layer_seed(seed, name))
    if k.name in ("uniform", "erk"):  # ERK chooses the density; the positions are uniform
        mat = _uniform(rows, cols, density, gen)
    elif k.name == "nm":
        mat = _nm(rows, cols, k.n, k.m, gen)
    else:
        mat = _blocks(rows, cols, k.block, density, k.name == "balanced_block", gen)
    return _from_matrix(mat, shape, perm)


def planned_density(kind: str | MaskKind, shape: tuple[int, ...], density: float, out_axis: int = 0,
                    in_axes: tuple[int, ...] = (1,), batch_axes: tuple[int, ...] = ()) -> float:
    """The density `make_mask` will produce, without building the mask (for planning huge models).

    Exact for uniform, ERK and N:M (ragged tail included) and for blocks that tile the matrix;
    block masks with ragged edge blocks are counted in whole blocks (the emitter records the truth).
    """
    k = parse_mask(kind)
    if density >= 1:
        return 1.0
    if batch_axes:  # every matrix of the stack has the same density
        shape, out_axis, in_axes = _slice_axes(tuple(shape), out_axis, tuple(in_axes), tuple(batch_axes))
    perm = _view_axes(tuple(shape), out_axis, tuple(in_axes))
    rows, cols = shape[perm[0]], math.prod(shape[a] for a in perm[1:])
    if k.name == "nm":
        full = cols // k.m * k.m
        return (full // k.m * k.n + round(k.n / k.m * (cols - full))) / cols
    if k.name == "balanced_block":
        per_row = math.ceil(cols / k.block)
        return _count(density, per_row) / per_row
    if k.name == "block":
        nb = math.ceil(rows / k.block) * math.ceil(cols / k.block)
        return _count(density, nb) / nb
    return _count(density, rows * cols) / (rows * cols)


def density_steps(kind: str | MaskKind, shape: tuple[int, ...], out_axis: int = 0, in_axes: tuple[int, ...] = (1,),
                  batch_axes: tuple[int, ...] = ()) -> int | None:
    """n such that the densities `make_mask` can produce are c / n, c = 1 .. n (elements for uniform
    and ERK, blocks for block:B, blocks per block-row for balanced_block:B); None for N:M, whose
    density is the kind's. Ragged edge blocks make block densities approximate (see planned_density)."""
    k = parse_mask(kind)
    if k.density_fixed is not None:
        return None
    if batch_axes:
        shape, out_axis, in_axes = _slice_axes(tuple(shape), out_axis, tuple(in_axes), tuple(batch_axes))
    perm = _view_axes(tuple(shape), out_axis, tuple(in_axes))
    rows, cols = shape[perm[0]], math.prod(shape[a] for a in perm[1:])
    if k.name == "balanced_block":
        return math.ceil(cols / k.block)
    if k.name == "block":
        return math.ceil(rows / k.block) * math.ceil(cols / k.block)
    return rows * cols


def mask_density(mask: torch.Tensor) -> float:
    """Fraction of nonzero entries (0.0 for an empty tensor)."""
    mask = torch.as_tensor(mask)
    return float(torch.count_nonzero(mask)) / mask.numel() if mask.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# ERK
# ---------------------------------------------------------------------------------------------
def _erk_scale(shape: tuple[int, ...], erdos_renyi: bool) -> float:
    """Evci et al. 2020, "Rigging the Lottery" (RigL), section 3, sparsity distribution:
    ERK: density_l ∝ (n_out + n_in + k_h + k_w) / (n_out * n_in * k_h * k_w), i.e. Σ dims / Π dims;
    ER:  density_l ∝ (n_out + n_in) / (n_out * n_in), the two matrix dims only (PyTorch layout:
    shape[0] = out, shape[1] = in)."""
    dims = shape[:2] if erdos_renyi else shape
    return sum(dims) / math.prod(dims)


def erk_densities(layers: Mapping[str, tuple[int, ...]], density: float, *,
                  erdos_renyi: bool = False) -> dict[str, float]:
    """Per-layer densities eps * scale_l (see `_erk_scale`) with Σ n_l * density_l = density * Σ n_l.

    A layer whose density would exceed 1 is made dense and eps is re-solved over the others, until
    none exceeds 1 (as in RigL's reference code).  Making a layer dense frees budget, so eps only
    grows and every layer over 1 can be capped in the same round.
    """
    density = _check_density(density, "erk_densities")
    if not layers:
        raise MaskError("erk_densities: no layers given")
    numel, scale = {}, {}
    for name, shape in layers.items():
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise MaskError(f"{name}: ERK needs a weight of rank >= 2 with positive dims, got shape {shape}")
        numel[name], scale[name] = math.prod(shape), _erk_scale(shape, erdos_renyi)
    target = density * sum(numel.values())
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(layers):
        budget = target - sum(numel[n] for n in dense)
        eps = budget / sum(scale[n] * numel[n] for n in layers if n not in dense)
        over = {n for n in layers if n not in dense and eps * scale[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 1.0 if n in dense else min(1.0, eps * scale[n]) for n in layers}
