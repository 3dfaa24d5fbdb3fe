"""Block-sparse linear products with generated Triton kernels (forward and both backward products).

W is (n, k) = (out_features, in_features), stored as B x B blocks in BSR form. `make_layout` builds
the look-up tables once (at lowering time): row pointers and column indices of W, the same for
W^T, and `perm_t`, which maps each block of W^T to the index of the W block whose values it
transposes, so no transposed copy of the values is ever stored. `pack_values` turns a dense
(masked) weight into the (nnzb, B, B) value array; `unpack_values` is its inverse.

The three products run kernels generated per layer by `triton_codegen` (specialised on block
size, blocks per row when balanced, dtype, bias; see `kernel_spec` and `kernel_source`):

    bsr_linear(x, values, layout, bias)        y  = x @ W^T + bias          (M, k) -> (M, n)
    bsr_linear_grad_input(dy, values, layout)  dx = dy @ W                  (M, n) -> (M, k)
    bsr_sddmm(dy, x, layout)                   dV = (dy^T @ x) on W's blocks -> (nnzb, B, B)

They take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (the Triton interpreter, float32
only: it computes bf16/fp16 wrongly without an error, so those dtypes are refused there).

    >>> import torch
    >>> mask = torch.tensor([[True, False, True], [False, False, False]])   # (ceil(n/B), ceil(k/B))
    >>> layout = make_layout(mask, block=16, n=20, k=40)
    >>> layout.crow.tolist(), layout.col.tolist(), layout.nnz_per_row
    ([0, 2, 2], [0, 2], None)
    >>> w = torch.randn(20, 40)
    >>> values = pack_values(w, layout)                                        # (2, 16, 16)
    >>> torch.equal(unpack_values(values, layout), w * expand_mask(mask, 16, 20, 40))
    True
    >>> torch.equal(block_mask_of(expand_mask(mask, 16, 20, 40), 16), mask)
    True
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..graph import SparsegraphError
from . import triton_codegen as codegen

NEED_DEVICE = "Triton kernels need a CUDA device; set TRITON_INTERPRET=1 to run them on CPU for testing"
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_INDEX32_LIMIT = 2 ** 31 - 1     # addressed extents (in elements) beyond this use the 64-bit-offset kernels


class TritonKernelError(SparsegraphError, ValueError):
    """Bad input to a Triton block-sparse product (shape, dtype, device or layout)."""


@dataclass(eq=False)
class BlockSparseLayout:
    """BSR look-up tables of a block-sparse W (n, k) and of W^T, built once by `make_layout`.

    `row` (block-row of each W block, for the SDDMM) and `nnz_per_col` (blocks per block-row of W^T
    when balanced) are derived from the tables on construction.
    """
    block: int
    n: int
    k: int
    crow: Tensor            # (n_block_rows + 1,) int32
    col: Tensor             # (nnzb,) int32
    crow_t: Tensor          # (n_block_cols + 1,) int32
    col_t: Tensor           # (nnzb,) int32, block-row of W for each block of W^T
    perm_t: Tensor          # (nnzb,) int32, W's value index for each block of W^T
    nnz_per_row: int | None
    row: Tensor = field(init=False, repr=False)         # (nnzb,) int32
    nnz_per_col: int | None = field(init=False)

    def __post_init__(self):
        nb, kb = self.n_block_rows, self.n_block_cols
        for name in ("crow", "col", "crow_t", "col_t", "perm_t"):
            setattr(self, name, getattr(self, name).to(torch.int32))
        if tuple(self.crow.shape) != (nb + 1,) or tuple(self.crow_t.shape) != (kb + 1,):
            raise TritonKernelError(f"BlockSparseLayout: crow must have {nb + 1} entries and crow_t {kb + 1} "
                                    f"for n={self.n}, k={self.k}, block={self.block}")
        nnzb = self.col.numel()
        if not (self.col_t.numel() == self.perm_t.numel() == nnzb):
            raise TritonKernelError("BlockSparseLayout: col, col_t and perm_t must have the same length (nnzb)")
        per_row = torch.diff(self.crow.long())
        per_col = torch.diff(self.crow_t.long())
        self.row = torch.repeat_interleave(torch.arange(nb, device=self.crow.device, dtype=torch.int32), per_row)
        if self.nnz_per_row is not None and not bool((per_row == self.nnz_per_row).all()):
            raise TritonKernelError(f"BlockSparseLayout: nnz_per_row={self.nnz_per_row} but the block-rows hold "
                                    f"{per_row.tolist()} blocks")
        self.nnz_per_col = int(per_col[0]) if kb and bool((per_col == per_col[0]).all()) else None

    @property
    def n_block_rows(self) -> int:
        return -(-self.n // self.block)

    @property
    def n_block_cols(self) -> int:
        return -(-self.k // self.block)

    @property
    def nnzb(self) -> int:
        return self.col.numel()

    @property
    def device(self) -> torch.device:
        return self.crow.device

    @property
    def density(self) -> float:
        """Fraction of the n_block_rows x n_block_cols blocks that are stored."""
        return self.nnzb / max(1, self.n_block_rows * self.n_block_cols)

    def block_mask(self) -> Tensor:
        """The (n_block_rows, n_block_cols) bool mask this layout was built from."""
        m = torch.zeros(self.n_block_rows, self.n_block_cols, dtype=torch.bool, device=self.device)
        m[self.row.long(), self.col.long()] = True
        return m

    def to(self, device) -> "BlockSparseLayout":
        """A copy with the look-up tables on `device`."""
        return BlockSparseLayout(self.block, self.n, self.k, self.crow.to(device), self.col.to(device),
                                 self.crow_t.to(device), self.col_t.to(device), self.perm_t.to(device),
                                 self.nnz_per_row)


def make_layout(block_mask: Tensor, block: int, n: int, k: int) -> BlockSparseLayout:
    """BSR look-up tables of W (n, k) and W^T from a (ceil(n/block), ceil(k/block)) block mask.

    Blocks are numbered row-major (W's value index); W^T's blocks are numbered row-major in W^T
    (i.e. column-major in W) and `perm_t` gives each one's W value index.

        >>> m = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
        >>> L = make_layout(m, block=16, n=48, k=48)
        >>> L.crow.tolist(), L.col.tolist()
        ([0, 2, 2, 4], [0, 2, 0, 1])
        >>> L.crow_t.tolist(), L.col_t.tolist(), L.perm_t.tolist()
        ([0, 2, 3, 4], [0, 2, 2, 0], [0, 2, 3, 1])
    """
    if not isinstance(block, int) or block < 1:
        raise TritonKernelError(f"make_layout: block must be a positive int, got {block!r}")
    if not (isinstance(n, int) and isinstance(k, int) and n >= 1 and k >= 1):
        raise TritonKernelError(f"make_layout: n and k must be positive ints, got n={n!r}, k={k!r}")
    nb, kb = -(-n // block), -(-k // block)
    if block_mask.dim() != 2 or tuple(block_mask.shape) != (nb, kb):
        raise TritonKernelError(f"make_layout: block_mask must have shape (ceil(n/block), ceil(k/block)) = "
                                f"({nb}, {kb}) for n={n}, k={k}, block={block}; got {tuple(block_mask.shape)}")
    mask = block_mask != 0
    dev = mask.device
    rows, cols = mask.nonzero(as_tuple=True)                   # row-major order = W's value index
    per_row = mask.sum(1)                                      # (nb,)
    per_col = mask.sum(0)                                      # (kb,)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    crow = torch.cat([zero, per_row.cumsum(0)])
    crow_t = torch.cat([zero, per_col.cumsum(0)])
    order = torch.argsort(cols * nb + rows, stable=True)       # W^T row-major = W column-major
    balanced = nb > 0 and bool((per_row == per_row[0]).all())
    return BlockSparseLayout(block=block, n=n, k=k, crow=crow, col=cols, crow_t=crow_t, col_t=rows[order],
                             perm_t=order, nnz_per_row=int(per_row[0]) if balanced else None)


def expand_mask(block_mask: Tensor, block: int, n: int, k: int) -> Tensor:
    """The (n, k) element mask (same dtype as block_mask) of a block mask, cropped at ragged edges."""
    return block_mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]


def block_mask_of(mask: Tensor, block: int) -> Tensor:
    """The (ceil(n/block), ceil(k/block)) bool mask of blocks holding any nonzero of an (n, k) mask.

        >>> block_mask_of(torch.eye(40), 16).int().tolist()
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    """
    if mask.dim() != 2:
        raise TritonKernelError(f"block_mask_of: mask must be 2-D (n, k), got shape {tuple(mask.shape)}")
    n, k = mask.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.nn.functional.pad((mask != 0).to(torch.uint8), (0, kb * block - k, 0, nb * block - n))
    return padded.reshape(nb, block, kb, block).amax(dim=(1, 3)).bool()                    # (nb, kb)


def pack_values(weight: Tensor, layout: BlockSparseLayout) -> Tensor:
    """(nnzb, B, B) blocks of `weight` (n, k) at the layout's nonzero blocks, zero-padded at ragged edges.

    Entries outside the layout's blocks are ignored (pass the masked weight if the element mask is
    finer than the blocks).
    """
    if weight.dim() != 2 or tuple(weight.shape) != (layout.n, layout.k):
        raise TritonKernelError(f"pack_values: weight must be ({layout.n}, {layout.k}), got {tuple(weight.shape)}")
    B, nb, kb = layout.block, layout.n_block_rows, layout.n_block_cols
    padded = torch.nn.functional.pad(weight, (0, kb * B - layout.k, 0, nb * B - layout.n))   # (nb*B, kb*B)
    blocks = padded.reshape(nb, B, kb, B).transpose(1, 2)                                    # (nb, kb, B, B)
    row, col = layout.row.to(weight.device).long(), layout.col.to(weight.device).long()
    return blocks[row, col].contiguous()                                                     # (nnzb, B, B)


def unpack_values(values: Tensor, layout: BlockSparseLayout) -> Tensor:
    """The dense (n, k) weight holding `values` at the layout's blocks and zeros elsewhere."""
    B, nb, kb = layout.block, layout.n_block_rows, layout.n_block_cols
    _check_values(values, layout, "unpack_values")
    blocks = values.new_zeros(nb, kb, B, B)
    blocks[layout.row.to(values.device).long(), layout.col.to(values.device).long()] = values
    return blocks.transpose(1, 2).reshape(nb * B, kb * B)[:layout.n, :layout.k]


# ---------------------------------------------------------------------------------------------
# Kernel selection

def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 (kernels run on CPU tensors through the Triton interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _fp32_precision() -> str:
    """tl.dot precision for float32: TF32 only when torch's own float32 matmuls may use it."""
    allowed = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "ieee"


def kernel_spec(layout: BlockSparseLayout, op: str, dtype: torch.dtype = torch.float32, bias: bool = False,
                *, interpret: bool | None = None, index64: bool = False) -> codegen.KernelSpec:
    """The specialisation key of the kernel that `op` runs for this layer (what the launchers use).

        >>> L = make_layout(torch.ones(2, 3, dtype=torch.bool), block=32, n=64, k=96)
        >>> kernel_spec(L, "fwd", torch.bfloat16, bias=True, interpret=False).name
        'sg_bsr_fwd_b32_n3_bf16_bias'
    """
    if dtype not in _DTYPES:
        raise TritonKernelError(f"Triton block-sparse kernels support {[str(d) for d in _DTYPES]}, got {dtype}")
    interpret = interpreting() if interpret is None else interpret
    nnz = layout.nnz_per_col if op == "grad_input" else layout.nnz_per_row
    if op == "sddmm" and nnz == 0:
        nnz = None                           # nothing to launch; keep the spec valid
    precision = ("ieee" if interpret else _fp32_precision()) if dtype == torch.float32 else "ieee"
    return codegen.KernelSpec(op=op, block=layout.block, nnz=nnz, dtype=_DTYPES[dtype], bias=bias and op == "fwd",
                              precision=precision, index64=index64, interpret=interpret)


def kernel_source(layout: BlockSparseLayout, op: str = "fwd", dtype: torch.dtype = torch.float32,
                  bias: bool = False, *, interpret: bool | None = None) -> str:
    """The generated Triton source that `op` runs for this layer (see `kernel_spec`)."""
    return codegen.kernel_source(kernel_spec(layout, op, dtype, bias, interpret=interpret))


# ---------------------------------------------------------------------------------------------
# Launchers

def bsr_linear(x: Tensor, values: Tensor, layout: BlockSparseLayout, bias: Tensor | None = None) -> Tensor:
    """y = x @ W^T + bias for x (M, k), W given by (values, layout) -> y (M, n).

    Needs CUDA tensors, or CPU float32 tensors with TRITON_INTERPRET=1 set before Triton is imported
    (so this is not a doctest; tests/test_triton_kernels.py runs the kernels that way):

        L = make_layout(torch.ones(2, 2, dtype=torch.bool), 16, 32, 20)
        w, x = torch.randn(32, 20), torch.randn(5, 20)
        torch.allclose(bsr_linear(x, pack_values(w, L), L), x @ w.T, atol=1e-5)   # True
    """
    _check_device(layout, x, values, bias)
    M = _check_2d(x, layout.k, "bsr_linear", "x", "k")
    _check_values(values, layout, "bsr_linear", x.dtype)
    if bias is not None and (tuple(bias.shape) != (layout.n,) or bias.dtype != x.dtype):
        raise TritonKernelError(f"bsr_linear: bias must be ({layout.n},) {x.dtype}, got "
                                f"{tuple(bias.shape)} {bias.dtype}")
    y = torch.empty(M, layout.n, dtype=x.dtype, device=x.device)                   # (M, n)
    if M == 0:
        return y
    spec = kernel_spec(layout, "fwd", x.dtype, bias is not None, index64=_wide(x, y, values))
    args = [x, values.contiguous(), layout.crow, layout.col] + ([bias.contiguous()] if bias is not None else [])
    args += [y, M, layout.n, layout.k, _bucket(M), x.stride(0), x.stride(1), y.stride(0), y.stride(1)]
    grid = lambda meta: (layout.n_block_rows, -(-M // meta["BLOCK_M"]))         # noqa: E731
    codegen.get_kernel(spec).launch(grid, *args)
    return y


def bsr_linear_grad_input(dy: Tensor, values: Tensor, layout: BlockSparseLayout) -> Tensor:
    """dx = dy @ W for dy (M, n) -> dx (M, k), walking W^T's look-up tables (no transposed copy)."""
    _check_device(layout, dy, values)
    M = _check_2d(dy, layout.n, "bsr_linear_grad_input", "dy", "n")
    _check_values(values, layout, "bsr_linear_grad_input", dy.dtype)
    dx = torch.empty(M, layout.k, dtype=dy.dtype, device=dy.device)                # (M, k)
    if M == 0:
        return dx
    spec = kernel_spec(layout, "grad_input", dy.dtype, index64=_wide(dy, dx, values))
    args = [dy, values.contiguous(), layout.crow_t, layout.col_t, layout.perm_t, dx, M, layout.n, layout.k,
            _bucket(M), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1)]
    grid = lambda meta: (layout.n_block_cols, -(-M // meta["BLOCK_M"]))         # noqa: E731
    codegen.get_kernel(spec).launch(grid, *args)
    return dx


def bsr_sddmm(dy: Tensor, x: Tensor, layout: BlockSparseLayout) -> Tensor:
    """(dy^T @ x) sampled on W's nonzero blocks: dy (M, n), x (M, k) -> (nnzb, B, B), zero-padded."""
    return _bsr_sddmm(dy, x, layout)


def _bsr_sddmm(dy: Tensor, x: Tensor, layout: BlockSparseLayout, splits: int | None = None) -> Tensor:
    """bsr_sddmm with an explicit number of M-chunks reduced by separate programs (None = heuristic)."""
    _check_device(layout, dy, x)
    M = _check_2d(dy, layout.n, "bsr_sddmm", "dy", "n")
    if _check_2d(x, layout.k, "bsr_sddmm", "x", "k") != M or x.dtype != dy.dtype:
        raise TritonKernelError(f"bsr_sddmm: dy and x must have the same rows and dtype, got "
                                f"{tuple(dy.shape)} {dy.dtype} and {tuple(x.shape)} {x.dtype}")
    B, nnzb = layout.block, layout.nnzb
    if nnzb == 0 or M == 0:
        return torch.zeros(nnzb, B, B, dtype=x.dtype, device=x.device)
    if splits is None:
        splits = _sddmm_splits(M, nnzb, x.device)
    align = codegen.SDDMM_CHUNK_ALIGN
    chunk = -(-(-(-M // splits)) // align) * align         # rows per split, a multiple of every BLOCK_M
    splits = -(-M // chunk)
    partial = torch.empty(splits, nnzb, B, B, dtype=torch.float32, device=x.device)   # (S, nnzb, B, B)
    spec = kernel_spec(layout, "sddmm", x.dtype, index64=_wide(dy, x, partial))
    args = [dy, x, layout.row, layout.col, partial, M, layout.n, layout.k, _bucket(M), chunk, nnzb,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1)]
    codegen.get_kernel(spec).launch((nnzb, splits), *args)
    out = partial[0] if splits == 1 else partial.sum(0)                          # (nnzb, B, B) fp32
    return out.to(x.dtype)


def _sddmm_splits(M: int, nnzb: int, device: torch.device) -> int:
    """Split the M reduction so that about two programs per SM run when W has few blocks."""
    if interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(math.ceil(2 * sms / nnzb), math.ceil(M / codegen.SDDMM_CHUNK_ALIGN)))


def _bucket(M: int) -> int:
    """Autotune key for M: its next power of two (one tuning per bucket, not per batch size)."""
    return 1 << max(0, M - 1).bit_length()


def _wide(*tensors: Tensor) -> bool:
    """64-bit offsets are needed once any addressed extent reaches 2**31 elements."""
    return any(t.numel() > 0 and sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) >= _INDEX32_LIMIT
               for t in tensors)


def _check_device(layout: BlockSparseLayout, *tensors: Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise TritonKernelError(f"Triton block-sparse kernels need all tensors on one device, "
                                f"got {sorted(map(str, devices))}")
    dev = devices.pop()
    if dev.type != "cuda" and not interpreting():
        raise TritonKernelError(NEED_DEVICE)
    if layout.device != dev:
        raise TritonKernelError(f"the layout's look-up tables are on {layout.device} but the tensors are on {dev}; "
                                f"build it on the weight's device (layout.to(device))")
    for t in tensors:
        if t is not None and t.dtype not in _DTYPES:
            raise TritonKernelError(f"Triton block-sparse kernels support float32, float16 and bfloat16, got {t.dtype}")
        if t is not None and interpreting() and t.dtype != torch.float32:
            raise TritonKernelError(f"{t.dtype} Triton kernels are GPU-only: the Triton interpreter "
                                    f"(TRITON_INTERPRET=1) computes bf16/fp16 wrongly; use float32 there")


def _check_2d(t: Tensor, cols: int, fn: str, name: str, dim: str) -> int:
    if t.dim() != 2 or t.shape[1] != cols:
        raise TritonKernelError(f"{fn}: {name} must be (M, {dim}={cols}), got {tuple(t.shape)}")
    return t.shape[0]


def _check_values(values: Tensor, layout: BlockSparseLayout, fn: str, dtype: torch.dtype | None = None) -> None:
    want = (layout.nnzb, layout.block, layout.block)
    if tuple(values.shape) != want:
        raise TritonKernelError(f"{fn}: values must be (nnzb, block, block) = {want}, got {tuple(values.shape)}")
    if dtype is not None and values.dtype != dtype:
        raise TritonKernelError(f"{fn}: values are {values.dtype} but the activations are {dtype}")
