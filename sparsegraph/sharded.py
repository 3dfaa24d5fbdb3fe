"""Tensors that FSDP2 shards as DTensors, and the full tensors beside them: one home for the bridge.

FSDP2 (`torch.distributed.fsdp.fully_shard`) turns each parameter, its gradient and its optimizer
state into a DTensor holding one shard per rank; buffers (the `<name>_mask` of a masked layer) stay
plain, replicated tensors. Mask decisions are made on full tensors, identical on every rank, and
applied to each rank's shard:

    >>> import torch
    >>> w, mask = torch.randn(4, 3), torch.ones(4, 3)
    >>> full(w) is w, torch.equal(shard_like(mask, w), mask)      # plain tensors pass through
    (True, True)
"""
from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support
    DTensor, distribute_tensor = (), None


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (a parameter, gradient or optimizer state under FSDP2)."""
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from every rank's shard for a DTensor (a collective: every
    rank must call it), the tensor itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` (the same full tensor on every rank) laid out like `like`: a DTensor with `like`'s
    mesh and placements, built from this rank's slice without any communication, or `whole`
    itself when `like` is a plain tensor."""
    if not isinstance(like, DTensor):
        return whole
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


__all__ = ["full", "is_sharded", "shard_like"]
