"""Lowered layers: a sparse weight stored as its nonzero blocks and applied by the
`sparsegraph::sparse_linear` / `sparse_conv2d` custom ops (`sg.lower` on the module form).

A lowered weight lives where the masked weight lived: the `weight` parameter and its `weight_mask`
become a trainable `weight_values` parameter (nnzb, b, b) and int32 index buffers `weight_crow`,
`weight_col`, `weight_crow_t`, `weight_col_t`, `weight_perm_t` (the op's BSR layout; CSR is b = 1),
with the sizes and kernel choice in `weight_layout`. A standard masked layer (`MaskedLinear`,
`MaskedConv2d`, masked `Conv1D`) and a bias-free part of a Sparse Parallel / Factorized / Doped
layer become a `LoweredLinear` or `LoweredConv2d`; a Parallel or Doped layer's own weight is
lowered in place, and the layer computes through `sparsegraph.nn.apply`, which runs the op.
Gradients reach the stored blocks only, so a lowered model fine-tunes with its sparsity fixed.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..backends import cpu
from ..backends import sparse_linear as _ops  # noqa: F401 - registers torch.ops.sparsegraph.*

INDEX = ("crow", "col", "crow_t", "col_t", "perm_t")


@dataclass(frozen=True)
class SparseLayout:
    """What the op needs besides the tensors: W's matrix view (n, k), the block size, the kernel
    implementation, and for a convolution its geometry."""
    n: int
    k: int
    block: int
    impl: str = "auto"
    kernel: tuple[int, int] | None = None  # convolutions: (kh, kw), stride, padding, dilation
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)


def lower_weight_(module: nn.Module, values: nn.Parameter, index: dict[str, torch.Tensor],
                  layout: SparseLayout) -> nn.Module:
    """Give `module` the lowered form of its weight, in place: `weight` and `weight_mask` are
    dropped, `values` (nnzb, b, b) and the index buffers take their place."""
    module._parameters.pop("weight", None)
    module._buffers.pop("weight_mask", None)
    module.weight_values = values
    for key in INDEX:
        module.register_buffer(f"weight_{key}", index[key])
    module.weight_layout = layout
    return module


def is_lowered(module: nn.Module) -> bool:
    return "weight_values" in module._parameters


_prepared: "weakref.WeakKeyDictionary[nn.Module, cpu.Prepared | None]" = weakref.WeakKeyDictionary()


def _fast(module: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> "cpu.Prepared | None":
    """The one-native-call product of an eager CPU inference step (no autograd, no tracing), or None."""
    if torch.is_grad_enabled() or module.weight_layout.impl not in ("auto", "cpu") or torch.compiler.is_compiling():
        return None
    buf = module._buffers
    crow, col = buf["weight_crow"], buf["weight_col"]
    prep = _prepared.get(module)
    if prep is None or not prep.current(bias, crow, col):  # (re)made only when the weight changed
        lay = module.weight_layout
        _prepared[module] = prep = cpu.Prepared.make(module.weight_values, crow, col, bias, lay.n, lay.k, lay.block)
    return prep if prep is not None and prep.accepts(x) else None


def sparse_product(module: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`module`'s lowered weight applied to x: (..., k) -> (..., n), or a convolution (N, C, H, W) -> (N, n, H', W').
    Eager CPU inference of a linear layer takes one native call (`cpu.Prepared`); everything else
    (autograd, tracing, export, other devices) runs the op."""
    lay = module.weight_layout
    if lay.kernel is None and (prep := _fast(module, x, bias)) is not None:
        return prep(x)
    idx = [module._buffers[f"weight_{key}"] for key in INDEX]
    if lay.kernel is None:
        return torch.ops.sparsegraph.sparse_linear(x, module.weight_values, *idx, bias, lay.n, lay.k, lay.block, -1,
                                                   lay.impl)
    return torch.ops.sparsegraph.sparse_conv2d(x, module.weight_values, *idx, bias, lay.n, list(lay.kernel),
                                               list(lay.stride), list(lay.padding), list(lay.dilation), lay.block,
                                               lay.impl)


class Lowered(nn.Module):
    """A layer that is a lowered weight and a bias: its forward is the op."""

    def __init__(self, values: nn.Parameter, index: dict[str, torch.Tensor], layout: SparseLayout,
                 bias: nn.Parameter | None = None):
        super().__init__()
        lower_weight_(self, values, index, layout)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_product(self, x, self.bias)

    def extra_repr(self) -> str:
        lay = self.weight_layout
        stored = self.weight_values.shape[0] * lay.block ** 2 / (lay.n * lay.k)
        fmt = "csr" if lay.block == 1 else f"bsr b={lay.block}"
        return (f"in={lay.k}, out={lay.n}, bias={self.bias is not None}, {fmt}, "
                f"stored={min(stored, 1.0):.4f}, impl={lay.impl}")


class LoweredLinear(Lowered):
    """y = x W^T + b with W (n, k) block-sparse: `sparsegraph::sparse_linear`."""


class LoweredConv2d(Lowered):
    """A 2-D convolution whose weight (n, C, kh, kw), viewed as (n, C kh kw), is block-sparse:
    `sparsegraph::sparse_conv2d`."""

    def extra_repr(self) -> str:
        lay = self.weight_layout
        return (f"{super().extra_repr()}, kernel_size={lay.kernel}, stride={lay.stride}, padding={lay.padding}, "
                f"dilation={lay.dilation}")


__all__ = ["INDEX", "SparseLayout", "Lowered", "LoweredLinear", "LoweredConv2d", "lower_weight_", "is_lowered",
           "sparse_product"]
