"""`sg.save` / `sg.load`: a rewritten model with its weights, masks and plan, in one file.

The file is a torch zip archive holding the GraphModule (its code and tensors), the plan as JSON
and the example inputs. 0/1 masks are stored one bit per element (a float mask would take as much
room as its weight). The file is written to a temporary file and renamed, so a failure never leaves
a half-written model behind.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import torch

from .fsutil import atomic_write
from .graph import SparsegraphError
from .plan import SparsityPlan, attach_plan, plan_of

FORMAT = "sparsegraph-model"
VERSION = 1


def save(model: torch.nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Save a sparsegraph model (an fx.GraphModule with `.plan`); `extra` holds e.g. training state."""
    plan = plan_of(model)
    payload: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "module": model,
        "plan": plan.to_json() if plan is not None else None,
        "example_inputs": getattr(model, "example_inputs", ()),
        "extra": extra or {},
    }
    with _without_hooks(model), _packed_masks(model) as packed:
        payload["packed_masks"] = packed
        atomic_write(path, lambda tmp: torch.save(payload, tmp))


@contextlib.contextmanager
def _packed_masks(model: torch.nn.Module):
    """Swap every 0/1 float `*_mask` buffer for its bits (uint8, 8 elements a byte) while saving.
    Yields {buffer fqn: (dtype, shape)}, what `_unpack_masks` needs to restore them."""
    swapped, info = [], {}
    for fqn, buf in list(model.named_buffers()):
        if not fqn.endswith("_mask") or not buf.is_floating_point() or buf.is_meta:
            continue
        bits = buf.detach().cpu().numpy().ravel()
        if not np.isin(bits, (0, 1)).all():
            continue
        owner, _, name = fqn.rpartition(".")
        module = model.get_submodule(owner)
        swapped.append((module, name, buf))
        module._buffers[name] = torch.from_numpy(np.packbits(bits.astype(bool))).to(buf.device)
        info[fqn] = (str(buf.dtype).removeprefix("torch."), tuple(buf.shape))
    try:
        yield info
    finally:
        for module, name, buf in swapped:
            module._buffers[name] = buf


def _unpack_masks(model: torch.nn.Module, info: dict) -> None:
    for fqn, (dtype, shape) in info.items():
        owner, _, name = fqn.rpartition(".")
        module = model.get_submodule(owner)
        packed = module._buffers[name]  # (ceil(numel / 8),) uint8
        bits = np.unpackbits(packed.cpu().numpy(), count=int(np.prod(shape, dtype=np.int64)))
        module._buffers[name] = torch.from_numpy(bits).reshape(shape).to(packed.device, getattr(torch, dtype))


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def _without_hooks(model: torch.nn.Module):
    """Runtime hooks (a DST schedule's, a profiler's) belong to the session, not to the saved model."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in _HOOKS if hasattr(m, name)]
    try:
        for m, name, hooks in saved:
            setattr(m, name, type(hooks)())
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


def load(path: str | os.PathLike, map_location: Any = None, with_extra: bool = False) -> torch.nn.Module:
    """Load a model written by `save`; `.plan` and `.example_inputs` are restored (and `.extra`)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SparsegraphError(f"saved model not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise SparsegraphError(f"{path} is not a readable sparsegraph model: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SparsegraphError(f"{path} is not a sparsegraph model (no '{FORMAT}' header)")
    if payload.get("version") != VERSION:
        raise SparsegraphError(f"{path}: sparsegraph model format version {payload.get('version')} is not supported")
    model = payload["module"]
    _unpack_masks(model, payload.get("packed_masks", {}))
    if payload.get("plan"):
        attach_plan(model, SparsityPlan.from_json(payload["plan"]))
    model.example_inputs = payload.get("example_inputs", ())
    if with_extra:
        model.extra = payload.get("extra", {})
    return model
