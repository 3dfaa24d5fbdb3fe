"""Dynamic sparse training in compact storage: RigL and SET on lowered layers, in place.

A layer that `sg.lower` turned into a `LoweredLinear` or `LoweredConv2d` stores only its nonzero
blocks: `weight_values` (nnzb, b, b), trained by the optimizer, and the int32 BSR index buffers
`weight_crow`, `weight_col`, `weight_crow_t`, `weight_col_t`, `weight_perm_t`
(`backends.sparse_linear.layout_tensors`). `CompactLayer` gives the drop-and-grow methods of
`sg.dst` the same view of such a layer as of a masked one (`dst.Layer`, with the same methods):
units are the b x b blocks of W's matrix view (n, k), numbered row-major (block-row r,
block-column c) -> r·C + c as `mask_units.Units` numbers them, one pool per block-row for a
balanced_block mask. It applies a decision by rewriting those tensors in place: the number of
stored blocks never changes, so the parameter, its gradient and its optimizer state keep their
shapes and the optimizer keeps working on the same tensor.

- kept blocks move to their place in the new row-major order, with their values, gradient and
  every optimizer state tensor of the values' shape (Adam's moments, SGD's momentum, ...);
- regrown blocks start at zero, and so does their optimizer state;
- the index buffers are rewritten for the new block mask (same sizes, so `copy_` in place).

RigL's growth signal is the gradient of W on blocks that are not stored, which the sparse
backward never forms. On the iteration before an update `arm()` hooks the layer to keep its input
x and output gradient dy; `capture()` then computes the gradient on the candidate blocks with
the SDDMM op (`sparsegraph::sparse_linear_grad_values` / `sparse_conv2d_grad_values`) over a
candidate layout, a chunk of block-rows at a time with at most as many blocks as the layer stores,
so the dense weight or its gradient is never formed. Stored blocks take their gradient from
`weight_values.grad`.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=1, n_embd=64, n_head=2)
    >>> wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, mask="balanced_block:16")
    >>> low = sg.lower(wide, target="cpu")
    >>> opt = torch.optim.AdamW(low.parameters(), lr=1e-3)
    >>> rigl = sg.dst.RigL(low, opt, total_steps=8, update_interval=2)   # compact layers, updated in place
    >>> x, y = spec.example_inputs[0], torch.randint(0, 256, (2, 64))
    >>> for _ in range(4):
    ...     opt.zero_grad()
    ...     torch.nn.functional.cross_entropy(low(x).flatten(0, 1), y.flatten()).backward()
    ...     opt.step()
    ...     rigl.step()
    >>> [h["step"] for h in sg.plan_of(low).history]
    [2, 4]
    >>> rigl.layers[0].storage, rigl.layers[0].units.granularity
    ('compact', 'block 16x16')
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..backends.sparse_linear import block_rows, layout_tensors
from ..masks import parse_mask
from ..nn.lowered import INDEX, Lowered
from ..plan import WeightPlan
from .mask_units import Units


def _index(module: nn.Module, key: str) -> torch.Tensor:
    return module._buffers[f"weight_{key}"]


def reindex_(t: torch.Tensor, src: torch.Tensor) -> None:
    """t[j] = t[src[j]] where src[j] >= 0, else 0, in place along the first axis (nnzb, b, b)."""
    valid = (src >= 0).view(-1, *([1] * (t.dim() - 1))).to(t.device)  # (nnzb, 1, 1)
    t.copy_(torch.where(valid, t[src.clamp(min=0).to(t.device)], torch.zeros((), dtype=t.dtype, device=t.device)))


class CompactLayer:
    """A lowered sparse weight as RigL / SET see it (see the module docstring)."""

    storage = "compact"

    def __init__(self, name: str, module: Lowered, plan: WeightPlan):
        self.name, self.module, self.plan = name, module, plan
        self.units = Units(plan.shape, plan.out_axis, plan.in_axes, plan.mask)
        lay = module.weight_layout
        self.n, self.k, self.block = lay.n, lay.k, lay.block
        self.R, self.C = -(-self.n // self.block), -(-self.k // self.block)
        if (self.units.brows, self.units.bcols) != (self.R, self.C):
            raise ValueError(f"{name}: its mask's block grid {self.units.brows}x{self.units.bcols} differs from the "
                             f"lowered layout's {self.R}x{self.C} (block {self.block})")
        self._pairs: list[list] = []  # (x, dy) of each call while armed
        self._handle = None

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight_values

    @property
    def nnzb(self) -> int:
        return self.param.shape[0]

    # -- the layer as units ---------------------------------------------------------------------
    def stored_units(self) -> torch.Tensor:
        """(nnzb,) int64: the unit r·C + c of each stored block, in storage order."""
        return block_rows(_index(self.module, "crow")) * self.C + _index(self.module, "col").long().cpu()

    def active(self) -> torch.Tensor:
        """(units,) bool: the stored blocks."""
        out = torch.zeros(self.R * self.C, dtype=torch.bool)
        out[self.stored_units()] = True
        return out

    def _mean_abs(self, blocks: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """(m,) mean |v| over the entries inside W of each block (m, b, b) at `units` (m,): a ragged edge
        block's padding is left out, whatever a kernel wrote there."""
        b = self.block
        inside_r = (units // self.C)[:, None] * b + torch.arange(b) < self.n  # (m, b) rows inside W
        inside_c = (units % self.C)[:, None] * b + torch.arange(b) < self.k  # (m, b) columns inside W
        inside = (inside_r[:, :, None] & inside_c[:, None, :]).to(blocks.device)  # (m, b, b)
        sums = torch.where(inside, blocks.detach().abs(), 0).sum(dim=(1, 2)).cpu()
        sums = sums.to(torch.promote_types(blocks.dtype, torch.float32))
        return sums / self.units.size[units].to(sums)

    def _per_unit(self, block_values: torch.Tensor) -> torch.Tensor:
        """(units,) mean |v| of each stored block (0 elsewhere) from (nnzb, b, b) block values."""
        units = self.stored_units()
        means = self._mean_abs(block_values, units)
        out = torch.zeros(self.R * self.C, dtype=means.dtype)
        out[units] = means
        return out

    def weight_score(self) -> torch.Tensor:
        """(units,) mean |w| per block: the stored blocks' values, 0 for the rest."""
        return self._per_unit(self.param)

    def density(self) -> float:
        return self.units.elements(self.active()) / (self.n * self.k)

    def clamp_(self) -> None:
        """Nothing to do: a compact layer holds no pruned weights the optimizer could move."""

    def zero_state_(self, optimizer) -> None:
        """Nothing to do: every stored block is active."""

    # -- applying a decision --------------------------------------------------------------------
    def apply_(self, new: torch.Tensor, kept: torch.Tensor, optimizer) -> None:
        """Store the blocks `new` (units,) bool, in place: blocks in `kept` keep their values,
        gradient and optimizer state; the others start at zero."""
        new, kept = new.cpu(), kept.cpu()
        if int(new.sum()) != self.nnzb:
            raise ValueError(f"{self.name}: an update must store {self.nnzb} blocks (compact storage has a fixed "
                             f"size), got {int(new.sum())}")
        position = torch.full((self.R * self.C,), -1, dtype=torch.long)
        position[self.stored_units()] = torch.arange(self.nnzb)  # unit -> its index in the old values
        index = layout_tensors(new.reshape(self.R, self.C))  # (crow, col, crow_t, col_t, perm_t)
        units = block_rows(index[0]) * self.C + index[1].long()  # (nnzb,) the new blocks, row-major
        src = torch.where(kept[units], position[units], -1)  # -1: regrown, starts at zero
        with torch.no_grad():
            p = self.param
            reindex_(p, src)
            if p.grad is not None:
                reindex_(p.grad, src)
            for value in getattr(optimizer, "state", {}).get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    reindex_(value, src)
            for key, t in zip(INDEX, index):
                _index(self.module, key).copy_(t)

    # -- RigL: the gradient on blocks that are not stored ----------------------------------------
    def arm(self) -> None:
        """Keep the input and output gradient of every call until `capture()`."""
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._record)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._pairs = []

    def _record(self, module, args, output) -> None:
        if not output.requires_grad:
            return
        pair = [args[0].detach(), None]
        self._pairs.append(pair)

        def keep(grad: torch.Tensor) -> None:
            pair[1] = grad.detach()
        output.register_hook(keep)

    def capture(self) -> torch.Tensor:
        """(units,) mean |∂L/∂W| per block, for every block: stored ones from `weight_values.grad`,
        the others by SDDMM on candidate layouts (chunks of block-rows, each at most as many blocks as
        the layer stores). Disarms the layer."""
        try:
            p = self.param
            score = self._per_unit(p.grad) if p.grad is not None else torch.zeros(self.R * self.C)
            pairs = [(x, dy) for x, dy in self._pairs if dy is not None]
            if not pairs:
                return score
            candidates = ~self.active().reshape(self.R, self.C)  # (R, C)
            per_row = candidates.sum(1)
            budget = max(self.nnzb, self.C)  # blocks per chunk
            r0 = 0
            while r0 < self.R:
                r1, count = r0, 0
                while r1 < self.R and (r1 == r0 or count + int(per_row[r1]) <= budget):
                    count += int(per_row[r1])
                    r1 += 1
                if count:
                    chunk = torch.zeros_like(candidates)
                    chunk[r0:r1] = candidates[r0:r1]
                    self._score_chunk(chunk, pairs, score)
                r0 = r1
            return score
        finally:
            self.disarm()

    def growth_score(self, captured: torch.Tensor) -> torch.Tensor:
        """RigL's growth score: what `capture()` returned."""
        return captured

    def _score_chunk(self, chunk: torch.Tensor, pairs, score: torch.Tensor) -> None:
        device = self.param.device
        idx = [t.to(device) for t in layout_tensors(chunk)]
        grad = None
        for x, dy in pairs:
            g = self._sddmm(x, dy, idx)  # (blocks in chunk, b, b)
            grad = g if grad is None else grad + g
        rows, cols = chunk.nonzero(as_tuple=True)  # row-major, the layout's order
        units = rows * self.C + cols
        score[units] = self._mean_abs(grad, units).to(score.dtype)

    def _sddmm(self, x: torch.Tensor, dy: torch.Tensor, idx: list[torch.Tensor]) -> torch.Tensor:
        lay = self.module.weight_layout
        if lay.kernel is None:
            return torch.ops.sparsegraph.sparse_linear_grad_values(dy.contiguous(), x, *idx, lay.n, lay.k, lay.block,
                                                                   -1, lay.impl)
        return torch.ops.sparsegraph.sparse_conv2d_grad_values(dy.contiguous(), x, *idx, list(lay.kernel),
                                                               list(lay.stride), list(lay.padding), list(lay.dilation),
                                                               lay.block, lay.impl)


def compact_layer(name: str, holder: nn.Module, plan: WeightPlan, who: str) -> CompactLayer:
    """The CompactLayer of plan weight `name` lowered in `holder`; ValueError naming what does not fit."""
    if not isinstance(holder, Lowered):
        raise ValueError(f"{who}: {name} is lowered inside a {type(holder).__name__}, not a LoweredLinear / "
                         "LoweredConv2d layer, which is what compact dynamic sparsity updates (the lowered module "
                         "form); for a graph form or a Parallel / Doped layer's own weight, train masked-dense and "
                         "lower afterwards")
    block = holder.weight_layout.block
    kind = parse_mask(plan.mask)
    if kind.name not in ("block", "balanced_block") or kind.block != block:
        stored = "CSR" if block == 1 else f"BSR b={block}"
        raise ValueError(f"{who}: {name} is lowered to {stored} with a {plan.mask!r} mask; compact dynamic sparsity "
                         f"drops and grows whole blocks, so it needs a block:{block} or balanced_block:{block} mask "
                         "lowered with that block (or train masked-dense and lower afterwards)")
    return CompactLayer(name, holder, plan)


__all__ = ["CompactLayer", "compact_layer", "reindex_"]
