"""Checkpoints of sharded (FSDP2) or replicated (DDP) training with `torch.distributed.checkpoint`.

`save(path, model, optimizer, dst)` writes a DCP checkpoint directory: every rank writes its
shards of the weights, the mask buffers and the optimizer state (DCP's own files), and rank 0 adds
`sparsegraph.json`, holding the sparsity plan (with its mask-update history), the DST state, the
optimizer's param-group settings (lr, a scheduler's initial_lr, ...) and your `extra` values as
JSON. `load(path, model, optimizer, dst)` restores all of it into a freshly built model with the
same plan (same model, transform, sparsity and mask settings), sharded or not, on the same or
another number of ranks. Call both on every rank; `shard(model)` applies FSDP2 per block.

    >>> import os, tempfile, torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> def make():
    ...     spec = builtin("gpt-mini", n_layer=1, n_embd=32, n_head=2, block_size=16)
    ...     model = sg.sparsify(spec.model, (torch.zeros(1, 16, dtype=torch.long),), "sparse_wide", 0.5)
    ...     opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ...     return model, opt, sg.dst.RigL(model, opt, total_steps=10, update_interval=1)
    >>> model, opt, rigl = make()
    >>> x = torch.randint(0, 256, (2, 16))
    >>> for _ in range(2):
    ...     opt.zero_grad(); model(x).square().mean().backward(); opt.step(); rigl.step()
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> sg.dist.save(path, model, opt, rigl, extra={"epoch": 3})
    >>> fresh, fresh_opt, fresh_rigl = make()
    >>> sg.dist.load(path, fresh, fresh_opt, fresh_rigl)
    {'epoch': 3}
    >>> fresh_rigl.t, sg.plan_of(fresh).to_dict() == sg.plan_of(model).to_dict()
    (2, True)
    >>> all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values())
    ...     if torch.is_tensor(a))
    True
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import torch.nn as nn

from .fsutil import atomic_write
from .graph import SparsegraphError
from .plan import PLAN_MODULE, SparsityPlan, attach_plan, plan_of
from .unwrap import unwrap

__all__ = ["DistCheckpointError", "load", "save", "shard"]

META = "sparsegraph.json"
FORMAT = 1


class DistCheckpointError(SparsegraphError, ValueError):
    """A distributed checkpoint that cannot be written or does not fit the model; one line."""


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _inner(optimizer):
    """The optimizer DCP should see: a SparseOpt's wrapped optimizer (it owns groups and state)."""
    from .train.sparseopt import SparseOpt

    return optimizer.optimizer if isinstance(optimizer, SparseOpt) else optimizer


def _state_dicts(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    opts = [] if optimizer is None else [_inner(optimizer)]
    with warnings.catch_warnings():  # DCP warns that it runs without a process group (one process)
        warnings.simplefilter("ignore", UserWarning)
        model_sd, optim_sd = get_state_dict(model, opts)
    model_sd.pop(f"{PLAN_MODULE}._extra_state", None)  # the plan goes to sparsegraph.json, as JSON
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optim_sd
    return state


def shard(model: nn.Module, **options) -> nn.Module:
    """FSDP2 on a module-form model, in place: `fully_shard` on every block (each entry of an
    `nn.ModuleList`, outermost lists only: `model.h[i]`, `model.layers[i]`), then on the root.
    Call after `sg.supar.init_` and before building the optimizer and DST; `options` go to
    `fully_shard` (mesh, reshard_after_forward, mp_policy, ...). Returns `model`.

        sg.dist.shard(model)       # under torchrun, after init_process_group
        opt = torch.optim.AdamW(sg.supar.param_groups(model, 1e-3))
        rigl = sg.dst.RigL(model, opt, total_steps=1000)
    """
    from torch.distributed.fsdp import fully_shard

    blocks, inside = [], set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p) for p in inside):
            blocks += list(module)
            inside.add(name + ".")
    for block in blocks:
        fully_shard(block, **options)
    return fully_shard(model, **options)


def _json_value(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _groups(optimizer) -> list[dict]:
    """The optimizer's param-group settings (lr, initial_lr of a scheduler, betas, ...) as JSON: DCP
    restores only the keys a fresh optimizer already has, so `load` puts these back itself."""
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params" and _json_value(v)}
            for g in _inner(optimizer).param_groups]


def _restore_groups(optimizer, groups: list[dict], path: str) -> None:
    mine = _inner(optimizer).param_groups
    if len(mine) != len(groups):
        raise DistCheckpointError(f"sg.dist.load: {path} holds {len(groups)} optimizer param groups, the "
                                  f"optimizer has {len(mine)}; build it the same way")
    for group, saved in zip(mine, groups):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})


def _plan(model: nn.Module, who: str) -> SparsityPlan:
    plan = plan_of(model)
    if plan is None:
        raise DistCheckpointError(f"{who}: {type(unwrap(model)).__name__} has no sparsegraph plan; "
                                  "make the model with sg.sparsify")
    return plan


def save(path: str | os.PathLike, model: nn.Module, optimizer=None, dst=None, extra: dict | None = None) -> None:
    """Save model (weights and masks, sharded or not), optimizer, plan and DST state to the DCP
    directory `path`; call on every rank. `extra` must be JSON-serialisable (step, epoch, ...)."""
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    plan = _plan(model, "sg.dist.save")
    meta = {"format": FORMAT, "plan": plan.to_dict(), "dst": None if dst is None else dst.state_dict(),
            "extra": extra or {}, "optimizer": None if optimizer is None else _groups(optimizer)}
    try:
        text = json.dumps(meta)
    except TypeError as e:
        raise DistCheckpointError(f"sg.dist.save: extra and DST state must be JSON values: {e}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=path)
    if _rank() == 0:
        atomic_write(os.path.join(path, META), lambda tmp: open(tmp, "w").write(text))
    _barrier()  # nobody reads the checkpoint before its metadata is there


def _check_plan(saved: SparsityPlan, plan: SparsityPlan, path: str) -> None:
    mine = [(w.name, list(w.shape)) for w in plan.weights]
    theirs = [(w.name, list(w.shape)) for w in saved.weights]
    settings = ("model", "transform", "sparsity", "mask", "seed")
    diff = [f"{k} {getattr(saved, k)!r} there, {getattr(plan, k)!r} here" for k in settings
            if getattr(saved, k) != getattr(plan, k)]
    if diff or mine != theirs:
        raise DistCheckpointError(f"sg.dist.load: {path} holds another plan ({'; '.join(diff) or 'other weights'}); "
                                  "build the model with the same sg.sparsify settings")


def _adopt(plan: SparsityPlan, saved: SparsityPlan) -> None:
    """Make `plan` equal to `saved` in place, so objects that hold it (DST, SparseOpt) see the restored one."""
    for old, new in zip(plan.weights, saved.weights):
        old.__dict__.update(new.__dict__)
    for f in dataclasses.fields(plan):
        if f.name != "weights":
            setattr(plan, f.name, getattr(saved, f.name))


def load(path: str | os.PathLike, model: nn.Module, optimizer=None, dst=None) -> dict:
    """Restore a `save`d checkpoint into `model` (same plan; sharded or wrapped as you train it),
    `optimizer` and `dst`, in place; call on every rank. Returns the saved `extra`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = os.fspath(path)
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise DistCheckpointError(f"sg.dist.load: {path} is not a sparsegraph distributed checkpoint (no {META})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise DistCheckpointError(f"sg.dist.load: {meta_path} has format {meta.get('format')!r}, expected {FORMAT}")
    if optimizer is not None and meta["optimizer"] is None:
        raise DistCheckpointError(f"sg.dist.load: {path} was saved without an optimizer")
    if dst is not None and meta["dst"] is None:
        raise DistCheckpointError(f"sg.dist.load: {path} was saved without a DST state")
    plan = _plan(model, "sg.dist.load")
    saved = SparsityPlan.from_dict(meta["plan"])
    _check_plan(saved, plan, path)
    state = _state_dicts(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=path)
        state["model"][f"{PLAN_MODULE}._extra_state"] = json.dumps(meta["plan"])  # strict: every key present
        set_state_dict(model, [] if optimizer is None else [_inner(optimizer)], model_state_dict=state["model"],
                       optim_state_dict=state.get("optimizer", {}))
    if optimizer is not None:
        _restore_groups(optimizer, meta["optimizer"], path)
    attach_plan(unwrap(model), plan)  # the model keeps its plan object (DST and SparseOpt hold it) ...
    _adopt(plan, saved)  # ... now equal to the saved one
    if dst is not None:
        dst.load_state_dict(meta["dst"])
    return meta["extra"]
