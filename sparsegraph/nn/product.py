"""The one product a layer computes, as a function of the weight it uses.

Three layer kinds carry a weight matrix that sparsegraph rewrites: `linear` (`nn.Linear` and its
subclasses; W (out, in)), `conv` (`nn.Conv1d/2d/3d`; W (out, in/groups, *kernel)) and `conv1d_hf`
(Hugging Face's `Conv1D`, GPT-2's linear layer; W (in, out)). Every module in `sparsegraph.nn`
computes through `product(kind, layer, x, weight, bias)`, so a layer's parameters can live in one
module while the product is taken in another (parallel branches, U/V factors); `apply` is that
product with the layer's own weight as its forward uses it, masked or lowered (`lowered.py`).
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lowered import is_lowered, sparse_product


def hf_conv1d() -> type | None:
    """Hugging Face's `Conv1D`, if transformers is loaded (it is never imported for this)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def layer_kind(module: nn.Module) -> str | None:
    """linear | conv | conv1d_hf for layers sparsegraph can rewrite as modules, else None."""
    conv1d = hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d_hf"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode == "zeros":
        return "conv"
    return None


def product(kind: str, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """`layer`'s op applied to x with `weight` and `bias` (conv hyperparameters come from `layer`)."""
    if kind == "linear":
        return F.linear(x, weight, bias)  # (..., out)
    if kind == "conv":
        return layer._conv_forward(x, weight, bias)  # (B, out, *spatial)
    flat = x.reshape(-1, x.size(-1))  # conv1d_hf: (N, in) @ (in, out)
    out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
    return out.view(*x.shape[:-1], weight.shape[1])


def weight_of(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The weight as the forward uses it: `weight * weight_mask` where a mask buffer exists."""
    w = module._parameters[name]
    mask = module._buffers.get(name + "_mask")
    return w if mask is None else w * mask


def apply(kind: str, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`layer`'s op on x with its own weight (`weight * weight_mask`, or the sparse kernel of a
    lowered weight) and `bias`."""
    if is_lowered(layer):
        return sparse_product(layer, x, bias)
    return product(kind, layer, x, weight_of(layer), bias)


def plain_like(kind: str, layer: nn.Module, weight: torch.Tensor, pointwise: bool = False) -> nn.Module:
    """A bias-free layer of `layer`'s kind holding `weight` (its shape sets the sizes); `pointwise`
    makes a conv 1x1 with stride 1 (the V factor of a factorized convolution)."""
    fan_in, fan_out = (weight.shape[0], weight.shape[1]) if kind == "conv1d_hf" else (weight.shape[1], weight.shape[0])
    with torch.device("meta"):  # sizes only: the weight is set below
        if kind == "linear":
            new = nn.Linear(fan_in, fan_out, bias=False)
        elif kind == "conv1d_hf":
            new = hf_conv1d()(fan_out, fan_in)
            new.bias = None
        else:
            nd = weight.dim() - 2
            kw = {} if pointwise else dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            groups = 1 if pointwise else layer.groups
            new = type(layer)(fan_in * groups, fan_out, (1,) * nd if pointwise else layer.kernel_size,
                              groups=groups, bias=False, **kw)
    new.weight = nn.Parameter(weight)
    return new


__all__ = ["apply", "hf_conv1d", "layer_kind", "plain_like", "product", "weight_of"]
