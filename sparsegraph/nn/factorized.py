"""Sparse Factorized and Sparse Doped as modules.

`SparseFactorized` replaces a layer W by U (fan-in -> d) then V (d -> out), both sparse, with an
optional BatchNorm + ReLU between (convolutions); the bias stays at the layer's path. A doped
layer keeps its own weight S (sparse, with the bias) and class, and adds a dense low-rank path
V(U x): `DopedLinear` is an `nn.Linear`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .product import apply, layer_kind


class SparseFactorized(nn.Module):
    """y = V(U x) + b, U and V layers of the original kind (V 1x1 for convolutions)."""

    def __init__(self, kind: str, u: nn.Module, v: nn.Module, bias: nn.Parameter | None,
                 uv_bn: nn.Module | None = None):
        super().__init__()
        self.kind, self.u, self.v = kind, u, v
        self.rank = u.weight.shape[1 if kind == "conv1d_hf" else 0]
        self.bias = bias
        if uv_bn is not None:
            self.uv_bn = uv_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = apply(self.kind, self.u, x, None)  # (..., d)
        if hasattr(self, "uv_bn"):
            h = F.relu(self.uv_bn(h))
        return apply(self.kind, self.v, h, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """V's weight, for code that reads `layer.weight` only for its dtype or device (T5 does); the layer's
        product is V(U x) and never one matrix."""
        return self.v.weight

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}"


class SparseDoped:
    """Mixin of a doped layer: its own (sparse) product plus the dense low-rank path v(u(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = layer_kind(self)
        y = apply(kind, self, x, self.bias)
        if "u" not in self._modules:  # rank 0: S alone
            return y
        return y + apply(kind, self.v, apply(kind, self.u, x, None), None)


@functools.cache
def _doped_class(cls: type) -> type:
    name = f"Doped{cls.__name__}"
    return type(name, (SparseDoped, cls), {"__module__": __name__, "__qualname__": name})


def doped_(layer: nn.Module, u: nn.Module | None, v: nn.Module | None) -> nn.Module:
    """Turn `layer` (S, already masked or not) into a Sparse Doped layer in place."""
    if u is not None:
        layer.u, layer.v = u, v
    layer.__class__ = _doped_class(type(layer))
    return layer


__all__ = ["SparseDoped", "SparseFactorized", "doped_"]
