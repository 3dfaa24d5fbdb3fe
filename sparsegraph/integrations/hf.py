"""Hugging Face transformers: `from_pretrained`, a `Trainer` callback for dynamic sparsity, and a
`Trainer` optimizer with SμPar's per-parameter learning rates. Importing this module imports
transformers; nothing else in sparsegraph does until it is used.

A model from `sg.sparsify` keeps its class, so `model.save_pretrained(path)` works as for any
Hugging Face model: the weights and `<name>_mask` buffers go to safetensors (sharded as you ask)
and `config.json` carries the sparsegraph plan and example inputs under `"sparsegraph"` (sparsegraph
writes them into `model.config` whenever it changes the plan). `sg.from_pretrained(path)` reads them
back, rebuilds the dense original from the plan's recipe, re-applies the plan (and SμPar's forward
multipliers) the way `sg.load` does, and fills in the saved tensors.

    >>> import torch, transformers, sparsegraph as sg
    >>> from sparsegraph.integrations.hf import SparsegraphCallback, sparsegraph_optimizer
    >>> cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    >>> ids = torch.randint(0, 64, (2, 8))
    >>> model = sg.supar.annotate(sg.sparsify(transformers.GPT2LMHeadModel(cfg).eval(), (ids,), "sparse_wide", 0.5))
    >>> model.save_pretrained("tiny-sparse")
    >>> back = sg.from_pretrained("tiny-sparse")
    >>> torch.equal(back(ids).logits, model(ids).logits), sg.plan_of(back).to_dict() == sg.plan_of(model).to_dict()
    (True, True)
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn as nn
import transformers

from ..io import CONFIG_FORMAT, CONFIG_VERSION, LoadError, build_source, decode_inputs, sync_config
from ..plan import SparsityPlan, attach_plan, plan_of
from ..train import dst as _dst

__all__ = ["from_pretrained", "SparsegraphCallback", "sparsegraph_optimizer", "sync_config", "DST_METHODS"]

DST_METHODS = {"rigl": _dst.RigL, "set": _dst.SET, "gmp": _dst.GMP, "static": _dst.Static}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# from_pretrained
# ---------------------------------------------------------------------------------------------
def _read_entry(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise LoadError(f"{path}: no config.json (not a folder written by save_pretrained)")
    with open(cfg_path) as f:
        entry = json.load(f).get("sparsegraph")
    if not isinstance(entry, dict) or "plan" not in entry:
        raise LoadError(f"{path}: config.json has no sparsegraph plan (save a model sg.sparsify returned; "
                        "a dense model loads with transformers' from_pretrained)")
    if entry.get("format") != CONFIG_FORMAT or entry.get("version") != CONFIG_VERSION:
        raise LoadError(f"{path}: config.json's sparsegraph entry is format {entry.get('format')!r} version "
                        f"{entry.get('version')!r}; this version reads {CONFIG_FORMAT!r} version {CONFIG_VERSION}")
    return entry


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file, or of all its shards."""
    from safetensors.torch import load_file

    if os.path.isfile(os.path.join(path, _INDEX)):
        with open(os.path.join(path, _INDEX)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, _SINGLE)):
        files = [_SINGLE]
    else:
        raise LoadError(f"{path}: no {_SINGLE} or {_INDEX} (weights saved with safe_serialization=False are "
                        "pickles, which sparsegraph does not load)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def from_pretrained(path: str | os.PathLike, map_location: Any = None) -> nn.Module:
    """The model a `save_pretrained` of a sparsegraph model wrote to the folder `path`: the dense
    original rebuilt from the plan in config.json, the plan re-applied (`sg.sparsify(plan=...)`), SμPar's
    forward multipliers re-applied if the plan is annotated, and the saved weights and masks loaded
    (all shards; weights that save_pretrained dropped because they are tied are tied again). Every
    tensor of the model must be in the files, and every tensor of the files in the model.

    >>> import torch, transformers, sparsegraph as sg
    >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    >>> ids = torch.randint(0, 128, (2, 8))
    >>> model = sg.sparsify(transformers.LlamaForCausalLM(cfg).eval(), (ids,), "sparse_parallel", 0.5)
    >>> model.save_pretrained("tiny-llama", max_shard_size="100KB")   # sharded
    >>> back = sg.from_pretrained("tiny-llama")
    >>> type(back).__name__, torch.equal(back(ids).logits, model(ids).logits)
    ('LlamaForCausalLM', True)
    """
    from ..sparsify import sparsify

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise LoadError(f"{path}: not a folder (sg.from_pretrained reads a folder written by save_pretrained)")
    entry = _read_entry(path)
    plan = SparsityPlan.from_dict(entry["plan"])
    inputs = decode_inputs(entry.get("example_inputs", []))
    if plan.source.get("kind") != "hf":
        raise LoadError(f"{path}: the plan's model is not a Hugging Face model ({plan.source.get('class')})")
    dense = build_source(plan.source)
    try:
        out = sparsify(dense, inputs, plan=plan, verify_module=False)
    except Exception as e:  # noqa: BLE001 - reported in one line
        raise LoadError(f"{path}: cannot rebuild the model: {e}") from None
    attach_plan(out, plan)
    out.example_inputs = inputs
    if plan.supar.get("parameterization"):
        from ..train.supar import apply_forward
        apply_forward(out, inputs)
    _load_tensors(out, _read_tensors(path), path)
    if map_location is not None:
        out.to(map_location)
    sync_config(out)
    return out.eval()


def _load_tensors(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise LoadError(f"{path}: the files hold {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if
                        len(unexpected) > 1 else "") + " that the rebuilt model does not have")
    aliases: dict[int, list[str]] = {}  # a tensor under every name (tied weights: save_pretrained keeps one)
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), []).append(name)
    named = {n: t for n, t in [*model.named_parameters(remove_duplicate=False),
                               *model.named_buffers(remove_duplicate=False)]}
    for key, value in own.items():
        if key in state or not isinstance(value, torch.Tensor):
            continue  # the plan's extra state is a string: the plan itself came from config.json
        t = named.get(key)
        present = [n for n in aliases.get(id(t), []) if n in state] if t is not None else []
        if not present:
            raise LoadError(f"{path}: the files have no {key}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise LoadError(f"{path}: {key} is {tuple(value.shape)} in the files, {tuple(own[key].shape)} in the "
                            "rebuilt model")
    with torch.no_grad():
        for key, value in state.items():
            named[key].copy_(value)


# ---------------------------------------------------------------------------------------------
# Trainer: optimizer with SμPar learning rates, callback for dynamic sparsity
# ---------------------------------------------------------------------------------------------
def sparsegraph_optimizer(model: nn.Module, args: transformers.TrainingArguments, optimizer: str = "adamw",
                          sparseopt: bool = False, momentum: float = 0.0) -> tuple[torch.optim.Optimizer, None]:
    """`(optimizer, None)` for `Trainer(optimizers=...)`: SμPar parameter groups
    (`sg.supar.param_groups(model, args.learning_rate, args.weight_decay, optimizer)`) in AdamW
    (`args.adam_beta1/2`, `args.adam_epsilon`), Adam or SGD, wrapped in `sg.SparseOpt` if `sparseopt`.
    The Trainer builds its scheduler (`args.lr_scheduler_type`, warmup) around it; schedulers scale
    every group's learning rate by the same factor, so the SμPar ratios hold throughout.

    >>> import torch, transformers, sparsegraph as sg
    >>> cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    >>> model = sg.sparsify(transformers.GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 64, (2, 8)),), "sparse_wide",
    ...                     0.5, width=2.0)
    >>> model = sg.supar.annotate(model)
    >>> args = transformers.TrainingArguments("out", learning_rate=1e-3, report_to=[], use_cpu=True)
    >>> opt, sched = sparsegraph_optimizer(model, args)
    >>> sorted({g["lr"] for g in opt.param_groups})    # hidden weights: 1e-3 / (m_d 2 * m_rho 0.5)
    [0.001]
    """
    from ..train.sparseopt import SparseOpt
    from ..train.supar import check_optimizer, param_groups

    name = check_optimizer(optimizer)
    groups = param_groups(model, args.learning_rate, args.weight_decay, name)
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=args.learning_rate, momentum=momentum)
    else:
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        opt = cls(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    return (SparseOpt(opt, model) if sparseopt else opt), None


def _inner_optimizer(optimizer: Any) -> Any:
    """The optimizer the Trainer wraps in accelerate's AcceleratedOptimizer (a sg.SparseOpt stays as is)."""
    try:
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError:
        return optimizer
    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


class SparsegraphCallback(transformers.TrainerCallback):
    """Dynamic sparse training inside `Trainer`: builds `sg.dst.<method>(model, optimizer,
    total_steps=state.max_steps, **options)` when training begins and steps it after every
    optimizer step. `method` is "rigl", "set", "gmp" or "static"; `options` are the method's own
    (update_interval, drop_fraction, end_fraction, seed, ...). Use it with an optimizer from
    `sparsegraph_optimizer` (SμPar learning rates, optionally SparseOpt) or the Trainer's own.
    The method object is `callback.dst` once training has begun.

    Note: the Trainer clips gradients (`max_grad_norm`) before the optimizer step, where RigL takes
    its dense gradient; on RigL's update steps the clipping norm includes the dense gradient at
    masked positions (the optimizer still sees only the masked gradient).

    >>> cb = SparsegraphCallback("rigl", update_interval=2)
    >>> cb.method, cb.options
    ('rigl', {'update_interval': 2})
    """

    def __init__(self, method: str = "rigl", **options: Any):
        if method not in DST_METHODS:
            raise _dst.DSTError(f"unknown dynamic sparsity method {method!r}; choose from {', '.join(DST_METHODS)}")
        self.method, self.options, self.dst = method, options, None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise _dst.DSTError("SparsegraphCallback: the Trainer gave no model or optimizer at the start of training")
        if plan_of(model) is None:
            raise _dst.DSTError(f"SparsegraphCallback: {type(model).__name__} has no sparsegraph plan "
                                "(train a model sg.sparsify returned)")
        if self.dst is not None:
            self.dst.remove()
        self.dst = DST_METHODS[self.method](model, _inner_optimizer(optimizer), state.max_steps, **self.options)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.dst.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.dst is not None:
            self.dst.remove()
