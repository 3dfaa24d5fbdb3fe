"""`sg.save` / `sg.load`: a rewritten model with its weights, masks and plan, as data only.

One safetensors file: the tensors (weights, bit-packed 0/1 masks, example inputs, tensors of the
`extra` training state) and, in its metadata, one JSON document: the plan, the recipe of the dense
original (a built-in, torchvision or Hugging Face model: name, options or config), the form
(module or graph), the `extra` state's structure, and a SHA-256 checksum of all of it. Loading
rebuilds the dense original from its recipe, re-applies the plan (`sg.sparsify(..., plan=plan)`),
and fills in the tensors; it never unpickles anything, and a file whose checksum does not match
is refused. A model whose recipe is a class of your own is rebuilt from `sg.load(path, model=...)`.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=1)
    >>> wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75)
    >>> sg.save(wide, "wide.sgm")
    >>> back = sg.load("wide.sgm")
    >>> type(back).__name__, torch.equal(back(spec.example_inputs[0]), wide(spec.example_inputs[0]))
    ('GPT', True)
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import zipfile
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .fsutil import atomic_write
from .graph import SparsegraphError
from .plan import PLAN_MODULE, SparsityPlan, attach_plan, plan_of
from .unwrap import unwrap

FORMAT = "sparsegraph-model"
VERSION = 2
META_KEY = "sparsegraph"


class LoadError(SparsegraphError):
    """A file that is not a sparsegraph model, is damaged, or cannot be rebuilt."""


# ---------------------------------------------------------------------------------------------
# recipes: how to rebuild the dense original
# ---------------------------------------------------------------------------------------------
def source_of(model: nn.Module) -> dict:
    """The recipe of a dense model: what `sparsegraph.models` tagged it with, a Hugging Face
    class and config, or (rebuilt only from `sg.load(path, model=...)`) its class path."""
    tagged = getattr(model, "_sparsegraph_source", None)
    if tagged:
        return dict(tagged)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and _hf_model_class() is not None \
            and isinstance(model, _hf_model_class()):
        cls = type(model)
        config = json.loads(config.to_json_string(use_diff=False))  # as the plan's JSON holds it (str keys)
        return {"kind": "hf", "class": f"{cls.__module__}.{cls.__qualname__}", "config": config}
    cls = type(model)
    return {"kind": "class", "class": f"{cls.__module__}.{cls.__qualname__}"}


def _hf_model_class():
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return PreTrainedModel


def build_source(source: dict) -> nn.Module:
    """The dense original from its recipe. Only models sparsegraph knows how to build are built:
    a built-in by name, a torchvision model by name, a Hugging Face model class (which must be a
    `transformers.PreTrainedModel`) from its config. Nothing named in a file is called otherwise."""
    kind = source.get("kind")
    if kind == "builtin":
        from .models import builtin
        return builtin(source["name"], **source.get("options", {})).model
    if kind == "torchvision":
        import torchvision
        return torchvision.models.get_model(source["name"], weights=None, **source.get("kwargs", {}))
    if kind == "hf":
        base = _hf_model_class()
        module_name, _, name = source["class"].rpartition(".")
        if base is None or not module_name.startswith("transformers."):
            raise LoadError(f"model class {source['class']} is not a Hugging Face transformers model")
        cls = getattr(importlib.import_module(module_name), name, None)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise LoadError(f"{source['class']} is not a transformers.PreTrainedModel")
        return cls(cls.config_class.from_dict(source["config"]))
    raise LoadError(f"the file's model is a {source.get('class', 'model')} of your own: rebuild it with "
                    "sg.load(path, model=<the dense model, freshly constructed>)")


# ---------------------------------------------------------------------------------------------
# JSON + tensors: any nesting of dicts, lists, numbers, strings and tensors
# ---------------------------------------------------------------------------------------------
def _split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-able structure of `obj` with every tensor moved into `tensors` (non-string dict keys kept)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _split_tensors(v, tensors, prefix) for k, v in obj.items()}}
        return {"__items__": [[_split_tensors(k, tensors, prefix), _split_tensors(v, tensors, prefix)]
                              for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__tuple__" if isinstance(obj, tuple) else "__list__": [_split_tensors(v, tensors, prefix) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise SparsegraphError(f"cannot save a {type(obj).__name__} (only tensors, numbers, strings, lists and dicts)")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__dict__" in obj:
        return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in obj["__items__"]}
    items = [_join_tensors(v, tensors) for v in obj.get("__list__", obj.get("__tuple__", []))]
    return tuple(items) if "__tuple__" in obj else items


def _pack_masks(state: dict[str, torch.Tensor]) -> dict[str, list]:
    """0/1 float `*_mask` tensors -> bits (uint8, 8 per byte) in place; returns {key: [dtype, shape]}."""
    info = {}
    for key, t in list(state.items()):
        if not key.endswith("_mask") or not t.is_floating_point():
            continue
        bits = t.cpu().numpy().ravel()
        if np.isin(bits, (0, 1)).all():
            state[key] = torch.from_numpy(np.packbits(bits.astype(bool)))
            info[key] = [str(t.dtype).removeprefix("torch."), list(t.shape)]
    return info


def _unpack_masks(state: dict[str, torch.Tensor], info: dict) -> None:
    for key, (dtype, shape) in info.items():
        bits = np.unpackbits(state[key].numpy(), count=int(np.prod(shape, dtype=np.int64)))
        state[key] = torch.from_numpy(bits).reshape(shape).to(getattr(torch, dtype))


def _checksum(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def save(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Save a model from `sg.sparsify` (either form): weights, masks, plan, example inputs, and
    `extra` (e.g. optimizer and training state: tensors, numbers, strings, lists, dicts)."""
    from safetensors.torch import save_file

    plan = plan_of(model)
    if plan is None:
        raise SparsegraphError(f"sg.save: {type(model).__name__} has no sparsegraph plan; save models that "
                               "sg.sparsify returned (torch.save(model.state_dict()) saves any other model)")
    inner = unwrap(model)  # DDP / compile
    state = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()  # clone: tied weights
             if isinstance(v, torch.Tensor)}
    meta = {"format": FORMAT, "version": VERSION, "form": "graph" if isinstance(inner, fx.GraphModule) else "module",
            "class": f"{type(inner).__module__}.{type(inner).__qualname__}", "plan": plan.to_dict(),
            "masks": _pack_masks(state)}
    tensors = {f"state/{k}": v for k, v in state.items()}
    meta["example_inputs"] = _split_tensors(tuple(getattr(inner, "example_inputs", ())), tensors, "inputs")
    meta["extra"] = _split_tensors(extra or {}, tensors, "extra")
    meta["checksum"] = _checksum(meta, tensors)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)}))


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(metadata, model state_dict with masks unpacked, extra) of a saved model, checked, without
    building the model (resuming training into a model you already have)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoadError(f"saved model not found: {path}")
    if zipfile.is_zipfile(path):
        raise LoadError(f"{path} is a pickle-based file from an older sparsegraph; it is not loaded, since "
                        "unpickling can run code. Re-create it with this version (sg.sparsify, then sg.save)")
    try:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            header = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{path} is not a readable sparsegraph model: {str(e).splitlines()[0] if str(e) else e}") \
            from None
    try:
        meta = json.loads(header) if header else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LoadError(f"{path} is not a sparsegraph model (no '{FORMAT}' header)")
    if meta.get("version") != VERSION:
        raise LoadError(f"{path}: sparsegraph model format version {meta.get('version')} is not supported "
                        f"(this version reads {VERSION})")
    stored = meta.pop("checksum", None)
    if stored != _checksum(meta, tensors):
        raise LoadError(f"{path} is damaged: its checksum does not match its contents")
    state: dict[str, Any] = {k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")}
    _unpack_masks(state, meta.get("masks", {}))
    state[f"{PLAN_MODULE}._extra_state"] = json.dumps(meta["plan"])  # the plan travels in the state_dict too
    return meta, state, _join_tensors(meta.get("extra", {}), tensors) | {"_inputs": _join_tensors(
        meta.get("example_inputs", []), tensors)}


def load(path: str | os.PathLike, model: nn.Module | None = None, map_location: Any = None,
         with_extra: bool = False) -> nn.Module:
    """Load a model written by `save`: the dense original is rebuilt from its recipe (or `model`,
    a freshly constructed dense model of your own class), the plan re-applied (a model saved lowered
    is lowered again with its recorded choices and stored layouts), the tensors loaded.
    `.plan` and `.example_inputs` are restored (and `.extra` with `with_extra=True`)."""
    from .sparsify import sparsify

    meta, state, extra = read(path)
    inputs = tuple(extra.pop("_inputs"))
    plan = SparsityPlan.from_dict(meta["plan"])
    dense = model if model is not None else build_source(plan.source)
    try:
        out = sparsify(dense, inputs, plan=plan, output=meta["form"], verify_module=False)
    except SparsegraphError as e:
        raise LoadError(f"{path}: cannot rebuild the model: {e}") from None
    attach_plan(out, plan)
    if plan.supar.get("parameterization"):  # the forward multipliers, as the saved model had them
        from .train.supar import apply_forward
        apply_forward(out, inputs)
    out = _relower(out, plan, state, inputs)
    try:
        out.load_state_dict(state)
    except RuntimeError as e:
        raise LoadError(f"{path}: the rebuilt model does not match the file: {str(e).splitlines()[0]}") from None
    if map_location is not None:
        out.to(map_location)
    out.example_inputs = inputs
    sync_config(out)
    if with_extra:
        out.extra = extra
    return out


def _relower(model: nn.Module, plan: SparsityPlan, state: dict[str, torch.Tensor], inputs: tuple) -> nn.Module:
    """A model saved lowered (`<weight>_values` and index buffers in its state) is lowered again with
    the plan's recorded choices, each mask first set to the saved layout (RigL / SET move blocks)."""
    layers = {name: rec for name, rec in plan.lowering.get("layers", {}).items() if f"{name}_values" in state}
    if not layers:
        return model
    from .backends.sparse_linear import block_rows
    from .passes.lower import lower

    with torch.no_grad():
        for name, rec in layers.items():
            (n, k), b = rec["shape"], rec["block"]
            grid = torch.zeros(-(-n // b), -(-k // b), dtype=torch.bool)  # (R, C) stored blocks
            grid[block_rows(state[f"{name}_crow"]), state[f"{name}_col"].long()] = True
            matrix = grid.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]  # (n, k), W's matrix view
            mask = model.get_buffer(name + "_mask")
            matrix = matrix.t() if plan.weight(name).out_axis == 1 else matrix  # Conv1D keeps W^T
            mask.copy_(matrix.reshape(mask.shape).to(mask.dtype))
    return lower(model, plan.lowering.get("target", "auto"), inputs, recorded=layers)


# ---------------------------------------------------------------------------------------------
# the plan in a Hugging Face config: what save_pretrained writes to config.json
# ---------------------------------------------------------------------------------------------
CONFIG_FORMAT = "sparsegraph-hf"
CONFIG_VERSION = 1


def encode_inputs(inputs: tuple) -> list:
    """Example inputs as JSON: each tensor as {"dtype", "shape", "data"} (exact for every dtype JSON can
    hold), None (an optional input left out) as null."""
    out = []
    for t in inputs:
        if t is None:
            out.append(None)
            continue
        if not isinstance(t, torch.Tensor):
            raise SparsegraphError(f"cannot write a {type(t).__name__} example input to a config (tensors only)")
        t = t.detach().cpu()
        out.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                    "data": t.reshape(-1).tolist()})
    return out


def decode_inputs(data: list) -> tuple:
    return tuple(None if d is None else torch.tensor(d["data"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])
                 for d in data)


def sync_config(model: nn.Module) -> None:
    """Write the model's plan and example inputs into its Hugging Face config as `config.sparsegraph`
    (a JSON-able dict), so `save_pretrained` puts them in config.json. A no-op for a model without
    a config or a plan. sparsegraph calls it wherever it changes a plan (sg.sparsify, sg.load,
    sg.supar.annotate, dynamic sparsity updates); call it after editing a plan by hand.

    >>> import torch, transformers, sparsegraph as sg
    >>> cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    >>> m = sg.sparsify(transformers.GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 64, (1, 8)),), "sparse_wide", 0.5)
    >>> m.config.sparsegraph["plan"] == sg.plan_of(m).to_dict()
    True
    >>> sg.supar.annotate(m).config.sparsegraph["plan"]["supar"]["parameterization"]   # kept in sync
    'supar'
    """
    inner = unwrap(model)
    plan, config = plan_of(inner), getattr(inner, "config", None)
    if plan is None or not callable(getattr(config, "to_json_string", None)) or isinstance(inner, fx.GraphModule):
        return  # only a Hugging Face-style config is written to a file by its model
    config.sparsegraph = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "plan": plan.to_dict(),
                          "example_inputs": encode_inputs(tuple(getattr(inner, "example_inputs", ())))}


__all__ = ["save", "load", "read", "atomic_write", "source_of", "build_source", "LoadError", "sync_config",
           "encode_inputs", "decode_inputs", "CONFIG_FORMAT", "CONFIG_VERSION"]
