"""`sparsegraph::sparse_linear`: one custom op for every sparse weight (torch.library).

    sparse_linear(x, values, crow, col, crow_t, col_t, perm_t, bias, n, k, block, dim=-1, impl="auto")

applies a block-sparse W (n, k) along axis `dim` of x:  y = movedim(movedim(x, dim, -1) @ W^T + bias, -1, dim),
so x (..., k) -> (..., n) for a linear layer (dim=-1) and x (N, k, L) -> (N, n, L) for the im2col view
of a convolution (dim=1). Formats are uniform: BSR with b x b blocks, CSR is block 1, and a
balanced BSR (the same number of blocks in every block-row) is the same op on a balanced layout.

    values (nnzb, b, b)      W's nonzero blocks in W's orientation, zero-padded at ragged edges
    crow, col                BSR of W (int32): (ceil(n/b)+1,), (nnzb,)
    crow_t, col_t, perm_t    BSR of W^T and the value index of each of its blocks (for dX)
    impl                     "auto" (device default: native CPU kernels / Triton on CUDA),
                             "cpu" (native kernels or their fallback), "torch" (PyTorch's sparse
                             kernels), "triton" (generated Triton kernels; CPU needs TRITON_INTERPRET=1)

Autograd: dX = dY W runs the same kernels over W^T's structure (no transposed copy of the values);
dvalues = (dY^T X) only on W's nonzero blocks (an SDDMM); dbias = sum of dY. Fake (meta)
implementations let `torch.export` and `torch.compile` see through the op. On CPU, once the native
library loads, sparse_linear's kernel and autograd are C++ (`cpu_op.cpp`: a call costs a few µs, not
tens); the cases that kernel does not take run the Python body below, registered a second time as
`sparsegraph::sparse_linear_py`. sparse_conv2d's CPU kernel is C++ the same way (its Python body
`sparsegraph::sparse_conv2d_py`), its autograd Python.

`sparsegraph::sparse_conv2d(x, values, ..., bias, out_channels, kernel_size, stride, padding,
dilation, block, impl)` is the convolution with the same weight format (W viewed as
(out, C kh kw)): a direct kernel on CPU, an im2col view onto sparse_linear elsewhere.

    >>> import torch
    >>> from sparsegraph.backends.sparse_linear import SparseWeight
    >>> w = torch.randn(48, 40) * torch.rand(48, 40).lt(0.2)
    >>> sw = SparseWeight.from_dense(w, block=1)                  # CSR
    >>> x = torch.randn(3, 7, 40)
    >>> torch.allclose(sw.apply(x), x @ w.T, atol=1e-5)
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..graph import SparsegraphError
from . import cpu

IMPLS = ("auto", "cpu", "torch", "triton")


class SparseLinearError(SparsegraphError, ValueError):
    """Bad arguments to sparsegraph::sparse_linear / sparse_conv2d (shapes, dtypes, layout)."""


# ---------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------
def block_mask_of(mask: Tensor, block: int) -> Tensor:
    """(ceil(n/b), ceil(k/b)) bool: which b x b blocks of an (n, k) mask hold a nonzero."""
    n, k = mask.shape
    R, C = -(-n // block), -(-k // block)
    padded = torch.nn.functional.pad((mask != 0).to(torch.uint8), (0, C * block - k, 0, R * block - n))
    return padded.reshape(R, block, C, block).amax(dim=(1, 3)).bool()


def layout_tensors(block_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(crow, col, crow_t, col_t, perm_t) int32 of a block mask; W^T's blocks are W's in column-major order."""
    bm = block_mask.bool().cpu()
    R, C = bm.shape
    rows, cols = bm.nonzero(as_tuple=True)
    zero = torch.zeros(1, dtype=torch.long)
    crow = torch.cat([zero, bm.sum(1).cumsum(0)])
    crow_t = torch.cat([zero, bm.sum(0).cumsum(0)])
    perm_t = torch.argsort(cols * R + rows, stable=True)
    i32 = torch.int32
    return crow.to(i32), cols.to(i32), crow_t.to(i32), rows[perm_t].to(i32), perm_t.to(i32)


def block_rows(crow: Tensor) -> Tensor:
    """(nnzb,) int64 on the CPU: the block-row of each stored block, in storage order (crow inverted)."""
    crow = crow.long().cpu()
    return torch.repeat_interleave(torch.arange(crow.numel() - 1), torch.diff(crow))


@dataclass
class SparseWeight:
    """A block-sparse weight (n, k): values and the index tensors the op needs, built once."""
    values: Tensor
    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm_t: Tensor
    n: int
    k: int
    block: int

    @classmethod
    def from_dense(cls, weight: Tensor, block: int, mask: Tensor | None = None) -> "SparseWeight":
        """From a dense (n, k) weight; `mask` (default: weight != 0) decides which blocks are stored."""
        if weight.dim() != 2:
            raise SparseLinearError(f"weight must be 2-D (n, k), got shape {tuple(weight.shape)}")
        if not isinstance(block, int) or block < 1:
            raise SparseLinearError(f"block must be a positive int, got {block!r}")
        mask = weight != 0 if mask is None else mask
        w = weight * mask.to(weight.dtype) if mask.dtype != torch.bool else weight * mask
        bm = block_mask_of(mask, block)
        crow, col, crow_t, col_t, perm_t = (t.to(weight.device) for t in layout_tensors(bm))
        n, k = weight.shape
        return cls(cpu.pack(w.detach(), crow, col, block), crow, col, crow_t, col_t, perm_t, n, k, block)

    @property
    def nnzb(self) -> int:
        return self.col.shape[0]

    @property
    def balanced(self) -> bool:
        per_row = torch.diff(self.crow.long())
        return per_row.numel() > 0 and bool((per_row == per_row[0]).all())

    def to_dense(self) -> Tensor:
        return cpu.unpack(self.values, self.crow, self.col, self.n, self.k, self.block)

    def apply(self, x: Tensor, bias: Tensor | None = None, dim: int = -1, impl: str = "auto") -> Tensor:
        return sparse_linear(x, self.values, self.crow, self.col, self.crow_t, self.col_t, self.perm_t, bias,
                             self.n, self.k, self.block, dim, impl)

    def conv2d(self, x: Tensor, bias: Tensor | None, kernel_size, stride=1, padding=0, dilation=1,
               impl: str = "auto") -> Tensor:
        """A 2-D convolution whose weight (n, k // (kh kw), kh, kw) is this matrix (n, k)."""
        return sparse_conv2d(x, self.values, self.crow, self.col, self.crow_t, self.col_t, self.perm_t, bias,
                             self.n, *(_pair(v) for v in (kernel_size, stride, padding, dilation)), self.block, impl)


# ---------------------------------------------------------------------------------------------
# argument checks (cheap: shapes and dtypes only; the index contents are checked at build time)
# ---------------------------------------------------------------------------------------------
def _check_layout(values: Tensor, crow: Tensor, col: Tensor, n: int, k: int, block: int, impl: str,
                  dtype: torch.dtype, fn: str) -> None:
    if impl not in IMPLS:
        raise SparseLinearError(f"{fn}: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if block < 1 or n < 1 or k < 1:
        raise SparseLinearError(f"{fn}: n, k and block must be positive, got n={n}, k={k}, block={block}")
    R = -(-n // block)
    if values.dim() != 3 or tuple(values.shape[1:]) != (block, block) or values.shape[0] != col.shape[0]:
        raise SparseLinearError(f"{fn}: values must be (nnzb, {block}, {block}) with nnzb = len(col) = "
                                f"{col.shape[0]}, got {tuple(values.shape)}")
    if crow.dim() != 1 or crow.shape[0] != R + 1:
        raise SparseLinearError(f"{fn}: crow must have ceil(n/block)+1 = {R + 1} entries, got {tuple(crow.shape)}")
    if values.dtype != dtype:
        raise SparseLinearError(f"{fn}: values dtype {values.dtype} differs from the input's {dtype}")


def _check(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, n: int, k: int, block: int, dim: int,
           impl: str, fn: str = "sparse_linear") -> int:
    if x.dim() == 0:
        raise SparseLinearError(f"{fn}: x must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise SparseLinearError(f"{fn}: dim={dim} is out of range for x of shape {tuple(x.shape)}")
    _check_layout(values, crow, col, n, k, block, impl, x.dtype, fn)
    return dim % x.dim()


def _split(x: Tensor, d: int) -> tuple[int, int]:
    """x viewed as (P, features, L) around axis d."""
    return math.prod(x.shape[:d]), math.prod(x.shape[d + 1:])


def _use_triton(impl: str, t: Tensor) -> bool:
    return impl == "triton" or (impl == "auto" and t.device.type == "cuda")


_layouts: dict = {}


def _triton_layout(crow, col, crow_t, col_t, perm_t, n, k, block):
    """The Triton kernels' BlockSparseLayout for these index tensors, cached by storage and version
    (an in-place update, e.g. `load_state_dict` into the same buffers, makes a new entry)."""
    from . import triton_kernels as tk

    idx = (crow, col, crow_t, col_t, perm_t)
    key = (*(t.data_ptr() for t in idx), *(t._version for t in idx), n, k, block, crow.device)
    lay = _layouts.get(key)
    if lay is None:
        per_row = torch.diff(crow.long())
        balanced = per_row.numel() > 0 and bool((per_row == per_row[0]).all())
        lay = tk.BlockSparseLayout(block, n, k, crow, col, crow_t, col_t, perm_t,
                                   int(per_row[0]) if balanced else None)
        if len(_layouts) > 256:
            _layouts.clear()
        _layouts[key] = lay
    return tk, lay


# ---------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------
def _linear(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, crow_t: Tensor, col_t: Tensor, perm_t: Tensor,
            bias: Optional[Tensor], n: int, k: int, block: int, dim: int = -1, impl: str = "auto") -> Tensor:
    """y = W x along axis `dim` of x (see the module docstring)."""
    d = _check(x, values, crow, col, n, k, block, dim, impl)
    if x.shape[d] != k:
        raise SparseLinearError(f"sparse_linear: x has {x.shape[d]} features on dim {dim}, the weight expects k={k}")
    P, L = _split(x, d)
    out_shape = (*x.shape[:d], n, *x.shape[d + 1:])
    if L == 1:
        x2 = x.reshape(P, k)
        if _use_triton(impl, x):
            tk, lay = _triton_layout(crow, col, crow_t, col_t, perm_t, n, k, block)
            y = tk.bsr_linear(x2.contiguous(), values, lay, bias)
        else:
            y = cpu.linear(x2, values, crow, col, bias, n, k, block, impl)
        return y.reshape(out_shape)
    X = x.reshape(P, k, L)
    if _use_triton(impl, x):
        tk, lay = _triton_layout(crow, col, crow_t, col_t, perm_t, n, k, block)
        y = tk.bsr_linear(X.transpose(1, 2).reshape(P * L, k).contiguous(), values, lay, bias)
        return y.view(P, L, n).transpose(1, 2).reshape(out_shape).contiguous()
    return cpu.apply_cols(X, values, crow, col, bias, n, k, block, impl).reshape(out_shape)


sparse_linear = torch.library.custom_op("sparsegraph::sparse_linear", _linear, mutates_args=())
# the same body under a second name: where the op's C++ CPU kernel (`cpu_op.cpp`) does not take a case
sparse_linear_py = torch.library.custom_op("sparsegraph::sparse_linear_py", _linear, mutates_args=())


@sparse_linear.register_fake
def _(x, values, crow, col, crow_t, col_t, perm_t, bias, n, k, block, dim=-1, impl="auto"):
    d = _check(x, values, crow, col, n, k, block, dim, impl)
    torch._check(x.shape[d] == k, lambda: f"sparse_linear: x has {x.shape[d]} features, expected k={k}")
    return x.new_empty((*x.shape[:d], n, *x.shape[d + 1:]))


def _linear_packed(x: Tensor, values_t: Tensor, crow: Tensor, col: Tensor, bias: Optional[Tensor], n: int, k: int,
                   block: int) -> Tensor:
    """y = x @ W^T + bias along x's last axis, W's blocks given as `values_t = values.transpose(1, 2)`
    (each block stored (in, out), as the CPU's packed rows kernel reads it). Inference only (no
    autograd): a frozen compiled graph computes `values_t` once, at compile time (`compile.py`), so
    no call transposes W's blocks."""
    _check(x, values_t, crow, col, n, k, block, -1, "cpu", "sparse_linear_packed")
    if x.shape[-1] != k:
        raise SparseLinearError(f"sparse_linear_packed: x has {x.shape[-1]} features, the weight expects k={k}")
    y = cpu.linear_packed(x.reshape(-1, k), values_t, crow, col, bias, n, k, block)  # (M, n)
    return y.reshape(*x.shape[:-1], n)


sparse_linear_packed = torch.library.custom_op("sparsegraph::sparse_linear_packed", _linear_packed, mutates_args=())
# (as sparse_linear_py: where the op's C++ CPU kernel does not take a case)
sparse_linear_packed_py = torch.library.custom_op("sparsegraph::sparse_linear_packed_py", _linear_packed,
                                                  mutates_args=())


@sparse_linear_packed.register_fake
def _(x, values_t, crow, col, bias, n, k, block):
    _check(x, values_t, crow, col, n, k, block, -1, "cpu", "sparse_linear_packed")
    torch._check(x.shape[-1] == k, lambda: f"sparse_linear_packed: x has {x.shape[-1]} features, expected k={k}")
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("sparsegraph::sparse_linear_grad_input", mutates_args=())
def sparse_linear_grad_input(dy: Tensor, values: Tensor, crow_t: Tensor, col_t: Tensor, perm_t: Tensor,
                             crow: Tensor, col: Tensor, n: int, k: int, block: int, dim: int = -1,
                             impl: str = "auto") -> Tensor:
    """dx = W^T dy along axis `dim` (dy has n features there, dx has k)."""
    d = _check(dy, values, crow, col, n, k, block, dim, impl, "sparse_linear_grad_input")
    P, L = _split(dy, d)
    out_shape = (*dy.shape[:d], k, *dy.shape[d + 1:])
    if _use_triton(impl, dy):
        tk, lay = _triton_layout(crow, col, crow_t, col_t, perm_t, n, k, block)
        g2 = dy.reshape(P, n) if L == 1 else dy.reshape(P, n, L).transpose(1, 2).reshape(P * L, n)
        dx = tk.bsr_linear_grad_input(g2.contiguous(), values, lay)
        return dx.reshape(out_shape) if L == 1 else dx.view(P, L, k).transpose(1, 2).reshape(out_shape).contiguous()
    if L == 1:
        return cpu.linear_grad_input(dy.reshape(P, n), values, crow_t, col_t, perm_t, n, k, block, impl) \
            .reshape(out_shape)
    return cpu.apply_cols_grad_input(dy.reshape(P, n, L), values, crow_t, col_t, perm_t, n, k, block, impl) \
        .reshape(out_shape)


@sparse_linear_grad_input.register_fake
def _(dy, values, crow_t, col_t, perm_t, crow, col, n, k, block, dim=-1, impl="auto"):
    d = _check(dy, values, crow, col, n, k, block, dim, impl, "sparse_linear_grad_input")
    return dy.new_empty((*dy.shape[:d], k, *dy.shape[d + 1:]))


@torch.library.custom_op("sparsegraph::sparse_linear_grad_values", mutates_args=())
def sparse_linear_grad_values(dy: Tensor, x: Tensor, crow: Tensor, col: Tensor, crow_t: Tensor, col_t: Tensor,
                              perm_t: Tensor, n: int, k: int, block: int, dim: int = -1,
                              impl: str = "auto") -> Tensor:
    """dvalues (nnzb, b, b): the gradient of W restricted to its nonzero blocks (SDDMM)."""
    d = dim % x.dim()
    P, L = _split(x, d)
    if _use_triton(impl, x):
        tk, lay = _triton_layout(crow, col, crow_t, col_t, perm_t, n, k, block)
        if L == 1:
            g2, x2 = dy.reshape(P, n), x.reshape(P, k)
        else:
            g2 = dy.reshape(P, n, L).transpose(1, 2).reshape(P * L, n)
            x2 = x.reshape(P, k, L).transpose(1, 2).reshape(P * L, k)
        return tk.bsr_sddmm(g2.contiguous(), x2.contiguous(), lay)
    if L == 1:
        return cpu.linear_grad_values(dy.reshape(P, n), x.reshape(P, k), crow, col, n, k, block, impl)
    return cpu.cols_grad_values(dy.reshape(P, n, L), x.reshape(P, k, L), crow, col, n, k, block, impl)


@sparse_linear_grad_values.register_fake
def _(dy, x, crow, col, crow_t, col_t, perm_t, n, k, block, dim=-1, impl="auto"):
    return x.new_empty((col.shape[0], block, block))


def _setup_context(ctx, inputs, output):
    x, values, crow, col, crow_t, col_t, perm_t, bias, n, k, block, dim, impl = inputs
    ctx.save_for_backward(x, values, crow, col, crow_t, col_t, perm_t)
    ctx.args = (n, k, block, dim % x.dim(), impl, bias is not None)


def _backward(ctx, dy):
    x, values, crow, col, crow_t, col_t, perm_t = ctx.saved_tensors
    n, k, block, d, impl, has_bias = ctx.args
    dy = dy.contiguous()
    dx = dv = db = None
    if ctx.needs_input_grad[0]:
        dx = sparse_linear_grad_input(dy, values, crow_t, col_t, perm_t, crow, col, n, k, block, d, impl)
    if ctx.needs_input_grad[1]:
        dv = sparse_linear_grad_values(dy, x, crow, col, crow_t, col_t, perm_t, n, k, block, d, impl)
    if has_bias and ctx.needs_input_grad[7]:
        db = dy.sum(dim=[i for i in range(dy.dim()) if i != d])
    return dx, dv, None, None, None, None, None, db, None, None, None, None, None


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# convolutions: sparsegraph::sparse_conv2d (direct CPU kernel; elsewhere an im2col view onto sparse_linear)
# ---------------------------------------------------------------------------------------------
def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _conv_out(H, W, k, s, p, d):
    return (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1, (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1


def _image_chunk(K: int, L: int) -> int:
    """Images per im2col chunk: keep the (chunk, K, L) unfolded tensor near 16M elements."""
    return max(1, (1 << 24) // max(1, K * L))


def _check_conv(x, values, crow, col, out_channels, kernel, block, impl, fn="sparse_conv2d") -> int:
    if x.dim() != 4:
        raise SparseLinearError(f"{fn}: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    K = x.shape[1] * kernel[0] * kernel[1]
    _check_layout(values, crow, col, out_channels, K, block, impl, x.dtype, fn)
    return K


def _conv2d_unfold(x, values, crow, col, crow_t, col_t, perm_t, bias, out_channels, kernel, stride, padding,
                   dilation, block, impl):
    """The im2col view: unfold (N, C kh kw, L), sparse_linear along dim 1, view (N, out, H', W')."""
    N, C, H, W = x.shape
    Ho, Wo = _conv_out(H, W, kernel, stride, padding, dilation)
    cols = torch.nn.functional.unfold(x, kernel, dilation, padding, stride)  # (N, C kh kw, L)
    y = sparse_linear(cols, values, crow, col, crow_t, col_t, perm_t, bias, out_channels, C * kernel[0] * kernel[1],
                      block, 1, impl)  # (N, out, L)
    return y.view(N, out_channels, Ho, Wo)


def _conv2d(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, crow_t: Tensor, col_t: Tensor,
            perm_t: Tensor, bias: Optional[Tensor], out_channels: int, kernel_size: list[int], stride: list[int],
            padding: list[int], dilation: list[int], block: int, impl: str = "auto") -> Tensor:
    """conv2d(x, W, bias, stride, padding, dilation) for a block-sparse W viewed as (out, C kh kw).

    The (c, kh, kw) order of `W.reshape(out, -1)`. On CPU the native kernel convolves directly
    (stride 1 through row offsets into the padded image, other strides through per-thread im2col
    tiles); otherwise x is unfolded (`aten.im2col`, in chunks of images) and multiplied along
    dim 1 by `sparse_linear`.
    """
    kernel, stride, padding, dilation = (_pair(v) for v in (kernel_size, stride, padding, dilation))
    K = _check_conv(x, values, crow, col, out_channels, kernel, block, impl)
    if impl in ("auto", "cpu") and x.device.type == "cpu":
        y = cpu.conv2d(x, values, crow, col, bias, out_channels, tuple(kernel), tuple(stride), tuple(padding),
                       tuple(dilation), block)
        if y is not None:
            return y
    N, _, H, W = x.shape
    Ho, Wo = _conv_out(H, W, kernel, stride, padding, dilation)
    step = _image_chunk(K, Ho * Wo)
    parts = [_conv2d_unfold(x[i:i + step], values, crow, col, crow_t, col_t, perm_t, bias, out_channels, kernel,
                            stride, padding, dilation, block, impl) for i in range(0, N, step)]
    return torch.cat(parts) if len(parts) != 1 else parts[0]


sparse_conv2d = torch.library.custom_op("sparsegraph::sparse_conv2d", _conv2d, mutates_args=())
# (as sparse_linear_py: where the op's C++ CPU kernel does not take a case)
sparse_conv2d_py = torch.library.custom_op("sparsegraph::sparse_conv2d_py", _conv2d, mutates_args=())


@sparse_conv2d.register_fake
def _(x, values, crow, col, crow_t, col_t, perm_t, bias, out_channels, kernel_size, stride, padding, dilation,
      block, impl="auto"):
    kernel, stride, padding, dilation = (_pair(v) for v in (kernel_size, stride, padding, dilation))
    _check_conv(x, values, crow, col, out_channels, kernel, block, impl)
    Ho, Wo = _conv_out(x.shape[2], x.shape[3], kernel, stride, padding, dilation)
    return x.new_empty((x.shape[0], out_channels, Ho, Wo))


@torch.library.custom_op("sparsegraph::sparse_conv2d_grad_input", mutates_args=())
def sparse_conv2d_grad_input(dy: Tensor, values: Tensor, crow_t: Tensor, col_t: Tensor, perm_t: Tensor,
                             crow: Tensor, col: Tensor, x_shape: list[int], kernel_size: list[int],
                             stride: list[int], padding: list[int], dilation: list[int], block: int,
                             impl: str = "auto") -> Tensor:
    """dx = col2im(W^T dy), in chunks of images."""
    N, C, H, W = x_shape
    out, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    K, L = C * kernel_size[0] * kernel_size[1], Ho * Wo
    dx = dy.new_zeros(x_shape)
    step = _image_chunk(K, L)
    for i in range(0, N, step):
        g = dy[i:i + step].reshape(-1, out, L)
        gi = sparse_linear_grad_input(g, values, crow_t, col_t, perm_t, crow, col, out, K, block, 1, impl)
        dx[i:i + step] = torch.nn.functional.fold(gi, (H, W), kernel_size, dilation, padding, stride)
    return dx


@sparse_conv2d_grad_input.register_fake
def _(dy, values, crow_t, col_t, perm_t, crow, col, x_shape, kernel_size, stride, padding, dilation, block,
      impl="auto"):
    return dy.new_empty(x_shape)


@torch.library.custom_op("sparsegraph::sparse_conv2d_grad_values", mutates_args=())
def sparse_conv2d_grad_values(dy: Tensor, x: Tensor, crow: Tensor, col: Tensor, crow_t: Tensor, col_t: Tensor,
                              perm_t: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                              dilation: list[int], block: int, impl: str = "auto") -> Tensor:
    """dvalues = sum over images of dy (out, L) im2col(x)^T (L, K), on W's nonzero blocks."""
    N, C = x.shape[0], x.shape[1]
    out, L = dy.shape[1], dy.shape[2] * dy.shape[3]
    K = C * kernel_size[0] * kernel_size[1]
    dv = x.new_zeros((col.shape[0], block, block))
    step = _image_chunk(K, L)
    for i in range(0, N, step):
        cols = torch.nn.functional.unfold(x[i:i + step], kernel_size, dilation, padding, stride)  # (n, K, L)
        dv += sparse_linear_grad_values(dy[i:i + step].reshape(-1, out, L), cols, crow, col, crow_t, col_t, perm_t,
                                        out, K, block, 1, impl)
    return dv


@sparse_conv2d_grad_values.register_fake
def _(dy, x, crow, col, crow_t, col_t, perm_t, kernel_size, stride, padding, dilation, block, impl="auto"):
    return x.new_empty((col.shape[0], block, block))


def _conv_setup(ctx, inputs, output):
    x, values, crow, col, crow_t, col_t, perm_t, bias, out_channels, kernel, stride, padding, dilation, block, \
        impl = inputs
    ctx.save_for_backward(x, values, crow, col, crow_t, col_t, perm_t)
    ctx.args = (list(x.shape), *(_pair(v) for v in (kernel, stride, padding, dilation)), block, impl,
                bias is not None)


def _conv_backward(ctx, dy):
    x, values, crow, col, crow_t, col_t, perm_t = ctx.saved_tensors
    x_shape, kernel, stride, padding, dilation, block, impl, has_bias = ctx.args
    dy = dy.contiguous()
    dx = dv = db = None
    if ctx.needs_input_grad[0]:
        dx = sparse_conv2d_grad_input(dy, values, crow_t, col_t, perm_t, crow, col, x_shape, kernel, stride, padding,
                                      dilation, block, impl)
    if ctx.needs_input_grad[1]:
        dv = sparse_conv2d_grad_values(dy, x, crow, col, crow_t, col_t, perm_t, kernel, stride, padding, dilation,
                                       block, impl)
    if has_bias and ctx.needs_input_grad[7]:
        db = dy.sum(dim=(0, 2, 3))
    return dx, dv, None, None, None, None, None, db, None, None, None, None, None, None, None


sparse_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)


__all__ = ["sparse_linear", "sparse_linear_packed", "sparse_conv2d", "sparse_conv2d_grad_input",
           "sparse_conv2d_grad_values", "sparse_linear_grad_input", "sparse_linear_grad_values", "SparseWeight",
           "block_mask_of", "block_rows", "layout_tensors", "SparseLinearError", "IMPLS"]
