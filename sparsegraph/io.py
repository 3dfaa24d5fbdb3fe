"""`sg.save` / `sg.load`: a rewritten model with its weights, masks and plan, in one file.

The file is a torch zip archive holding the GraphModule (its code and tensors), the plan as JSON
and the example inputs. It is written to a temporary file and renamed, so a failure never leaves a
half-written model behind.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from .graph import SparsegraphError
from .plan import SparsityPlan, attach_plan, plan_of

FORMAT = "sparsegraph-model"
VERSION = 1


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)`, then move the finished file to `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sparsegraph-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Save a sparsegraph model (an fx.GraphModule with `.plan`)."""
    plan = plan_of(model)
    payload: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "module": model,
        "plan": plan.to_json() if plan is not None else None,
        "example_inputs": getattr(model, "example_inputs", ()),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load(path: str | os.PathLike, map_location: Any = None) -> torch.nn.Module:
    """Load a model written by `save`; `.plan` and `.example_inputs` are restored."""
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
    if payload.get("plan"):
        attach_plan(model, SparsityPlan.from_json(payload["plan"]))
    model.example_inputs = payload.get("example_inputs", ())
    return model
