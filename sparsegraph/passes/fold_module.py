"""Fold on the module form: sparsegraph's own modules back to one dense layer of the original size.

`sg.fold(model)` on the module form of `sg.sparsify` returns a copy of your model, same class, in
eval mode, in which every layer that folds is one dense layer again. `FOLDS` is the table, per
module class (the algebra is `fold.py`'s, in float64):

  SparseParallel     W = sum_i W_i * M_i.  A stacked layer and its ParallelNorm (per-branch
                     BatchNorms, BN_i(y) = s_i y + t_i in eval mode): W = sum_i s_i (W_i * M_i), and the
                     norm keeps the summed shift alone (mean 0, variance 1 - eps, gamma 1, beta sum_i t_i)
  SparseFactorized   W = V . U (convolutions: the 1x1 V times the k x k U); kept as it is with a
                     BatchNorm + ReLU between U and V
  SparseDoped        W = S * M + V . U (rank 0: S stays a masked layer)

So the folded model has the dense original's architecture: every layer its own class again, with
the original parameter names and shapes, and every BatchNorm of yours still in place (the graph
form's fold also folds those into their convolutions). Sparse Wide's masked layers have nothing to
fold and stay masked; `sg.lower(model, target="dense")` multiplies masks in. The folds are
recorded in the plan's copy, `plan.lowering["fold"]`, as the graph form's are.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("resnet-mini")
    >>> par = sg.sparsify(spec.model, spec.example_inputs, "sparse_parallel", 0.5).eval()
    >>> folded = sg.fold(par)
    >>> type(folded).__name__, type(folded.layers[0][0].conv1).__name__
    ('ResNet', 'Conv2d')
    >>> x = spec.example_inputs[0]
    >>> torch.allclose(folded(x), par(x), rtol=1e-4, atol=1e-5)
    True
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..capture import _as_tuple
from ..nn import SparseDoped, SparseFactorized, SparseParallel, layer_kind, mask_, plain_like, weight_of
from ..nn.lowered import is_lowered
from ..nn.parallel import ParallelNorm
from ..plan import attach_plan, plan_of
from .fold import FoldError, bn_affine, compose, scale_out


@dataclass
class Folds:
    """What the fold functions share: the norm after each stacked parallel layer, and the log."""
    norms: dict[int, tuple[str, nn.Module]]  # id(stacked SparseParallel) -> (path, its ParallelNorm)
    log: list[dict] = field(default_factory=list)


def _out_axis(kind: str) -> int:
    return 1 if kind == "conv1d_hf" else 0  # Hugging Face Conv1D holds W as (in, out)


def _branches(module: nn.Module) -> list[nn.Module]:
    """A parallel layer's or norm's branch-0 self and its `branch<i>` children, in order."""
    return [module] + [m for name, m in module.named_children() if name.startswith("branch")]


def _unwrap(module: nn.Module) -> None:
    """Back to the class the mixin was put on (`Parallel<Cls>` -> Cls), without the branch children."""
    for name in [n for n in module._modules if n.startswith("branch")]:
        del module._modules[name]
    module.__dict__.pop("stacked", None)
    module.__class__ = type(module).__bases__[1]


def _set_weight(module: nn.Module, w: torch.Tensor, like: torch.Tensor) -> None:
    module._buffers.pop("weight_mask", None)
    module.weight = nn.Parameter(w.to(like), requires_grad=like.requires_grad)


def _composable(kind: str, u: nn.Module) -> bool:
    """U then V compose into one layer of U's kind: not for grouped convolutions."""
    return kind != "conv" or u.groups == 1


# ---------------------------------------------------------------------------------------------
# one function per module class: the folded module, or None to keep it as it is
# ---------------------------------------------------------------------------------------------
def fold_parallel(layer: nn.Module, path: str, folds: Folds) -> nn.Module | None:
    """W = sum_i s_i (W_i * M_i) (s_i = 1 without norms); the norm after it keeps sum_i t_i."""
    kind = layer_kind(layer)
    norm_path, norm = folds.norms.get(id(layer), (None, None))
    if layer.stacked and (norm is None or not norm.affine or norm.running_mean is None):
        return None  # the norm was not found (or cannot hold the shift): keep the branches
    branches = _branches(layer)
    norms = _branches(norm) if norm is not None else [None] * len(branches)
    affine = [bn_affine(bn) if bn is not None else None for bn in norms]
    axis, like = _out_axis(kind), layer.weight
    W = 0
    for i, (branch, st) in enumerate(zip(branches, affine)):
        w = weight_of(branch).detach().double()
        if st is not None:
            w = scale_out(w, st[0], axis)
            folds.log.append({"rule": "batchnorm", "into": f"{path}.branch{i}.weight" if i else f"{path}.weight",
                              "norm": f"{norm_path}.branch{i}" if i else norm_path})
        W = W + w
    folds.log.append({"rule": "sum", "into": f"{path}.weight",
                      "from": [f"{path}.branch{i}.weight" if i else f"{path}.weight" for i in range(len(branches))]})
    _unwrap(layer)
    _set_weight(layer, W, like)
    if norm is not None:
        with torch.no_grad():
            if layer.bias is not None:  # BN_0(W_0 x + b): the bias takes branch 0's scale
                layer.bias.mul_(affine[0][0].to(layer.bias))
            norm.running_mean.zero_()
            norm.running_var.fill_(1 - norm.eps)
            norm.weight.fill_(1)
            norm.bias.copy_(sum(t for _, t in affine))
        _unwrap(norm)
    return layer


def fold_factorized(module: SparseFactorized, path: str, folds: Folds) -> nn.Module | None:
    """W = V . U: one layer of the original kind, U's geometry, the module's bias."""
    if hasattr(module, "uv_bn") or not _composable(module.kind, module.u):
        return None  # BatchNorm + ReLU between U and V: nothing to compose
    like = module.u.weight
    W, _ = compose(weight_of(module.u).detach().double(), weight_of(module.v).detach().double(), None, None,
                   _out_axis(module.kind))
    folded = plain_like(module.kind, module.u, W.to(like))
    folded.weight.requires_grad_(like.requires_grad)
    folded.bias = module.bias
    folds.log.append({"rule": "compose", "into": f"{path}.weight", "from": [f"{path}.u.weight", f"{path}.v.weight"]})
    return folded


def fold_doped(layer: nn.Module, path: str, folds: Folds) -> nn.Module | None:
    """W = S * M + V . U; without a low-rank path S stays masked (a Sparse Wide-like layer)."""
    kind, base = layer_kind(layer), type(layer).__bases__[1]
    if "u" not in layer._modules:
        mask = layer._buffers.pop("weight_mask", None)
        layer.__class__ = base
        return mask_(layer, {"weight": mask}) if mask is not None else layer
    if not _composable(kind, layer.u):
        return None
    UV, _ = compose(weight_of(layer.u).detach().double(), weight_of(layer.v).detach().double(), None, None,
                    _out_axis(kind))
    W = weight_of(layer).detach().double() + UV
    folds.log.append({"rule": "compose", "into": f"{path}.weight", "from": [f"{path}.u.weight", f"{path}.v.weight"]})
    folds.log.append({"rule": "sum", "into": f"{path}.weight", "from": [f"{path}.weight", f"{path}.u.weight",
                                                                        f"{path}.v.weight"]})
    del layer._modules["u"], layer._modules["v"]
    layer.__class__ = base
    _set_weight(layer, W, layer.weight)
    return layer


# the table: module class -> its fold
FOLDS: dict[type, Callable[[nn.Module, str, Folds], nn.Module | None]] = {
    SparseParallel: fold_parallel,      # branches summed, each after its own BatchNorm when it has one
    SparseFactorized: fold_factorized,  # U then V composed, unless a nonlinearity sits between
    SparseDoped: fold_doped,            # S plus the composed low-rank path
}


def stacked_norms(model: nn.Module, inputs: tuple) -> dict[int, tuple[str, nn.Module]]:
    """id(stacked parallel layer) -> (path, the ParallelNorm reading its output): found by running the
    model once (eval, no gradients) and matching each layer's output tensor to a norm's input."""
    paths = {id(m): p for p, m in model.named_modules()}
    produced, found, hooks = {}, {}, []

    def produced_by(layer, args, out):
        produced[id(out)] = (layer, out)  # holds `out`, so its id stays its own

    def read_by(norm, args):
        hit = produced.get(id(args[0]))
        if hit is not None:
            found[id(hit[0])] = (paths[id(norm)], norm)

    for m in model.modules():
        if isinstance(m, SparseParallel) and m.stacked:
            hooks.append(m.register_forward_hook(produced_by))
        elif isinstance(m, ParallelNorm):
            hooks.append(m.register_forward_pre_hook(read_by))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


def fold_module(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """The module form folded (see the module docstring): a copy, same class, eval mode."""
    out = copy.deepcopy(model).eval()
    if any(is_lowered(m) for m in out.modules()):
        raise FoldError(f"fold: {type(model).__name__} is already lowered; fold first, then sg.lower")
    norms = {}
    if any(isinstance(m, ParallelNorm) for m in out.modules()):
        inputs = example_inputs if example_inputs is not None else getattr(model, "example_inputs", None)
        if inputs is None:
            raise FoldError(f"fold: {type(model).__name__} has per-branch BatchNorms; pass example_inputs "
                            "(one run finds which norm follows which layer)")
        norms = stacked_norms(out, _as_tuple(inputs))
    folds = Folds(norms)
    for path, module in list(out.named_modules()):
        fn = next((f for cls, f in FOLDS.items() if isinstance(module, cls)), None)
        new = fn(module, path, folds) if fn is not None else None
        if new is not None and new is not module:
            out.set_submodule(path, new)
    plan = plan_of(model)
    if plan is not None:
        plan = copy.deepcopy(plan)
        plan.lowering["fold"] = {"rules": sorted({e["rule"] for e in folds.log}), "folds": folds.log,
                                 "params": sum(p.numel() for p in out.parameters())}
        attach_plan(out, plan)
    return out


__all__ = ["FOLDS", "Folds", "fold_module", "fold_parallel", "fold_factorized", "fold_doped", "stacked_norms"]
