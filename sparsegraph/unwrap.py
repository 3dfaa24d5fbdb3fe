"""The model inside DistributedDataParallel, DataParallel and torch.compile wrappers: one home for it."""
from __future__ import annotations

import torch.nn as nn

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # what the wrappers put in front of parameter names


def unwrap(model: nn.Module) -> nn.Module:
    """The module under any stack of DDP / DataParallel / torch.compile wrappers (itself if none)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def unwrapped_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name
