"""Sparse Parallel as modules: a layer plus `branch1 .. branch{n-1}` copies of density ρ, summed.

The layer keeps its own weight (branch 0, with the bias) and its class: `ParallelLinear` is an
`nn.Linear`. Where a BatchNorm follows, each branch gets its own copy of it (`bn.branch{i}`) and
the sum comes after the norms: the layer then returns its branches stacked along the batch axis,
(n·B, ...), and `ParallelBatchNorm2d` normalises each chunk with its own statistics and sums them.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .product import apply, layer_kind


class SparseParallel:
    """Mixin of a layer with parallel branches (children `branch1` ...)."""

    stacked: bool = False  # True: return the branches stacked along the batch axis for a ParallelNorm

    def branches(self) -> list[nn.Module]:
        return [self] + [m for name, m in self.named_children() if name.startswith("branch")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = layer_kind(self)
        outs = [apply(kind, b, x, self.bias if b is self else None) for b in self.branches()]
        return torch.cat(outs, 0) if self.stacked else functools.reduce(torch.add, outs)  # (n·B, ...) or (B, ...)


class ParallelNorm:
    """Mixin of a BatchNorm after a stacked SparseParallel layer: chunk i through branch i's own norm, summed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norms = [super().forward] + [m for name, m in self.named_children() if name.startswith("branch")]
        chunks = x.chunk(len(norms), 0)  # n × (B, C, ...)
        return functools.reduce(torch.add, (norm(c) for norm, c in zip(norms, chunks)))


@functools.cache
def _subclass(mixin: type, cls: type) -> type:
    name = f"{mixin.__name__.replace('Sparse', '')}{cls.__name__}"
    new = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
    if cls.__module__.startswith("torch.nn"):
        globals().setdefault(name, new)  # importable by name (pickle, spawned processes): ParallelLinear, ...
    return new


def parallel_(layer: nn.Module, branches: list[nn.Module], norms: list[nn.Module] | None = None) -> nn.Module:
    """Turn `layer` (branch 0) into a Sparse Parallel layer in place, with `branches` (bias-free
    layers of its kind) as `branch1 ...`; `norms` (the following BatchNorm, then its copies) makes
    the sum come after per-branch normalisation."""
    for i, b in enumerate(branches, 1):
        layer.add_module(f"branch{i}", b)
    layer.__class__ = _subclass(SparseParallel, type(layer))
    if norms:
        layer.stacked = True
        first, *copies = norms
        for i, n in enumerate(copies, 1):
            first.add_module(f"branch{i}", n)
        first.__class__ = _subclass(ParallelNorm, type(first))
    return layer


def __getattr__(name: str) -> type:
    """`ParallelLinear`, `ParallelNormBatchNorm2d`, ... by name in a process that has not made them yet
    (unpickling a model in a spawned worker)."""
    for mixin in (ParallelNorm, SparseParallel):  # the longer prefix first
        prefix = mixin.__name__.replace("Sparse", "")
        base = getattr(nn, name[len(prefix):], None) if name.startswith(prefix) else None
        if isinstance(base, type) and issubclass(base, nn.Module):
            return _subclass(mixin, base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ParallelNorm", "SparseParallel", "parallel_"]
