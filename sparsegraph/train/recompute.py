"""Activation checkpointing per block: the memory half of training a wide sparse model.

Compact storage (`sg.lower`) keeps a Sparse Wide model's parameters, gradients and optimizer state
at about the dense original's size, but its hidden activations grow with the width,
k = 1/sqrt(1 - s) (2x at s = 0.75, 3.2x at s = 0.9), whatever the weights' storage: a compact
training step peaks at 1.6-2.9x the dense original's memory (`python bench/train_step.py`).
`checkpoint_blocks` runs each block of the model's stack of blocks under
`torch.utils.checkpoint` (non-reentrant): a block keeps only its inputs for backward and runs its
forward again there. In that benchmark it brought the step's peak to 1.17x (gpt-mini) and
1.45x (a 2-layer, d 512 Hugging Face GPT-2) of the dense original at s = 0.9, for one more forward
of the blocks per step. Gradients are those of the model without it; `sparsegraph train --recompute`
turns it on for a training run.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=2)
    >>> wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:32")
    >>> low = sg.checkpoint_blocks(sg.lower(wide))      # in place; returns the model
    >>> low(spec.example_inputs[0]).float().mean().backward()
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The longest ModuleList of blocks of one type: a transformer's layers (`h`, `layers`, `blocks`)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no ModuleList of blocks to checkpoint; pass blocks=[...]")
    return max(lists, key=len)


def checkpoint_blocks(model: nn.Module, blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """Run each of `blocks` (default: the model's longest ModuleList of same-type blocks) under
    non-reentrant activation checkpointing; modifies `model` in place and returns it. A block already
    checkpointed is left as it is, so calling this twice recomputes each block once, not twice."""
    for block in (_blocks(model) if blocks is None else blocks):
        if getattr(block, "_sg_checkpointed", False):
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block._sg_checkpointed = True
    return model
