"""Masked layers: a weight stays a dense `nn.Parameter` under its own name, a `<name>_mask` buffer
sits beside it, and the layer's forward computes with `weight * mask`.

`mask_(module, {"weight": mask})` turns any module into its masked self by giving it a class of
its own kind: `nn.Linear` becomes `MaskedLinear`, a subclass of `nn.Linear`, so `isinstance`
checks, `state_dict` keys and every optimizer keep working, and `sg.lower`, `sg.fold`, the
compile backend and ONNX export find the `weight * mask` product. A standard layer's forward is
rewritten directly (`F.linear(x, weight * mask, bias)`); a module whose own forward reads the
parameter (e.g. `nn.MultiheadAttention.in_proj_weight`) computes with the masked tensors swapped
in for the duration of its forward.

    >>> import torch, torch.nn as nn
    >>> from sparsegraph.nn import mask_
    >>> layer = mask_(nn.Linear(4, 3), {"weight": torch.tensor([[1., 0, 0, 0]] * 3)})
    >>> isinstance(layer, nn.Linear), type(layer).__name__, sorted(layer.state_dict())
    (True, 'MaskedLinear', ['bias', 'weight', 'weight_mask'])
    >>> x = torch.randn(2, 4)
    >>> torch.equal(layer(x), x[:, :1] @ layer.weight[:, :1].T + layer.bias)
    True
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn

from .product import hf_conv1d, product


def masked_tensor(module: nn.Module, path: str) -> torch.Tensor:
    """`path * path_mask` of a parameter of `module` (path relative to it)."""
    owner, _, leaf = path.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    return mod._parameters[leaf] * mod._buffers[leaf + "_mask"]


def _standard_forward(cls: type) -> Callable | None:
    """The masked forward of a standard layer class (its own forward is the plain product)."""
    conv1d = hf_conv1d()
    kinds = [(nn.Linear.forward, "linear"), (nn.Conv1d.forward, "conv"), (nn.Conv2d.forward, "conv"),
             (nn.Conv3d.forward, "conv")] + ([(conv1d.forward, "conv1d_hf")] if conv1d is not None else [])
    kind = next((k for own, k in kinds if cls.forward is own), None)
    if kind is None:
        return None
    return lambda self, x: product(kind, self, x, masked_tensor(self, "weight"), self.bias)


def _swapped_forward(self, *args, **kwargs):
    """Any other module: its own forward, with every masked parameter it reads replaced by
    `weight * mask` while it runs (the parameters themselves are restored afterwards)."""
    saved = []
    try:
        for path in self.masked_params:
            owner, _, leaf = path.rpartition(".")
            mod = self.get_submodule(owner) if owner else self
            saved.append((mod, leaf, mod._parameters[leaf]))
            mod._parameters[leaf] = masked_tensor(self, path)
        return super(Masked, self).forward(*args, **kwargs)
    finally:
        for mod, leaf, p in saved:
            mod._parameters[leaf] = p


def standard_masked(module: nn.Module) -> bool:
    """A masked standard layer: its own forward is its product with `weight * weight_mask`."""
    return isinstance(module, Masked) and type(module).forward is not _swapped_forward


class Masked:
    """Mixin of every masked class: `masked_params` are the parameter paths (relative to this
    module) its forward reads as `weight * mask`; each mask is a buffer beside its weight."""

    masked_params: tuple[str, ...] = ()

    def extra_repr(self) -> str:
        dens = []
        for path in self.masked_params:
            owner, _, leaf = path.rpartition(".")
            mask = (self.get_submodule(owner) if owner else self)._buffers[leaf + "_mask"]
            if not mask.is_meta:
                dens.append(f"{path} density={float(mask.count_nonzero()) / max(mask.numel(), 1):.4f}")
        return ", ".join([super().extra_repr(), *dens]).strip(", ")


@functools.cache
def masked_class(cls: type, standard: bool = True) -> type:
    """`Masked<cls>`: a subclass of `cls` whose forward computes with masked weights.
    `standard=False` always uses the swap forward (the parameters are read by another module)."""
    if issubclass(cls, Masked):
        return cls
    forward = (_standard_forward(cls) if standard else None) or _swapped_forward
    name = f"Masked{cls.__name__}"
    new = type(name, (Masked, cls), {"forward": forward, "__module__": __name__, "__qualname__": name})
    if cls.__module__.startswith("torch.nn"):
        globals().setdefault(name, new)  # importable by name (pickle): MaskedLinear, MaskedConv2d, ...
    return new


def mask_(module: nn.Module, masks: dict[str, torch.Tensor], standard: bool = True) -> nn.Module:
    """Mask parameters read by `module`'s forward, in place: `masks` maps a parameter path relative
    to `module` (its own `"weight"`, or a child's `"out_proj.weight"`) to a 0/1 tensor of its shape.
    Returns `module`, now of class `Masked<its class>`."""
    for path, mask in masks.items():
        owner, _, leaf = path.rpartition(".")
        mod = module.get_submodule(owner) if owner else module
        p = mod._parameters.get(leaf)
        if p is None or tuple(p.shape) != tuple(mask.shape):
            raise ValueError(f"cannot mask {path!r} of {type(module).__name__}: "
                             f"{'no such parameter' if p is None else f'shape {tuple(p.shape)} != mask {tuple(mask.shape)}'}")
        mod.register_buffer(leaf + "_mask", mask.to(device=p.device, dtype=p.dtype))
    previous = tuple(module.masked_params) if isinstance(module, Masked) else ()
    base = type(module).__mro__[2] if isinstance(module, Masked) else type(module)
    own = all("." not in p for p in (*previous, *masks))
    module.__class__ = masked_class(base, standard and own and set((*previous, *masks)) == {"weight"})
    module.masked_params = tuple(dict.fromkeys((*previous, *masks)))
    return module


def unmask(module: nn.Module) -> nn.Module:
    """Undo `mask_` in place: the weights become `weight * mask` (dense), masks are dropped."""
    if not isinstance(module, Masked):
        return module
    with torch.no_grad():
        for path in module.masked_params:
            owner, _, leaf = path.rpartition(".")
            mod = module.get_submodule(owner) if owner else module
            mod._parameters[leaf].mul_(mod._buffers.pop(leaf + "_mask"))
    module.__class__ = type(module).__mro__[2]
    del module.masked_params
    return module


def bake_masks(model: nn.Module) -> nn.Module:
    """Multiply every mask of `model` into its weight, in place: masked modules become their own
    class again (`unmask`), and a `<name>_mask` buffer beside a parameter (the parts of Sparse
    Parallel, Factorized and Doped layers) is multiplied in and dropped. Returns `model`."""
    for module in list(model.modules()):
        unmask(module)
    with torch.no_grad():
        for module in model.modules():
            for name in [b for b in module._buffers if b.endswith("_mask") and b[:-5] in module._parameters]:
                module._parameters[name[:-5]].mul_(module._buffers.pop(name))
    return model


def __getattr__(name: str) -> type:
    """`MaskedLinear`, `MaskedConv2d`, ... by name in a process that has not made them yet (unpickling
    a model in a spawned worker)."""
    base = getattr(nn, name[len("Masked"):], None) if name.startswith("Masked") else None
    if isinstance(base, type) and issubclass(base, nn.Module):
        return masked_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Masked", "bake_masks", "mask_", "masked_class", "masked_tensor", "standard_masked", "unmask"]
