"""SparseOpt: per-neuron gradient correction for sparse layers followed by BatchNorm (DESIGN.md section 5).

BatchNorm normalises each output neuron, so a neuron i whose incoming weights have sparsity s_i
(density d_i = 1 − s_i) has its weight gradient amplified by 1/√d_i relative to a dense neuron:
sparser neurons get larger steps, which rotates the layer's gradient away from the dense
direction. SparseOpt undoes this before the wrapped optimizer's step:

    g_i ← g_i · √(1 − s_i) / √(1 − s_avg)

for row i (output neuron, the weight's `out_axis`: 0 for Linear/Conv, 1 for Hugging Face Conv1D)
of every sparse weight, with s_avg the layer's average sparsity, so the layer's overall scale is
kept. A dense layer, or one whose rows all have the same density (N:M, balanced masks), gets
factor 1 everywhere and is left alone. Factors are cached per mask and recomputed when a mask
changes (DST updates, GMP pruning). A RigL attached to the same model captures its dense gradient
first, so regrowth uses the uncorrected gradient.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("resnet-mini")
    >>> model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, width=1.0)
    >>> opt = sg.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    >>> rigl = sg.dst.RigL(model, opt, total_steps=1000)
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)   # a real Optimizer
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from ..graph import SparsegraphError
from ..sharded import shard_like
from ..unwrap import unwrap
from .dst import capture_pending, sparse_layers

__all__ = ["SparseOpt", "SparseOptError", "neuron_factors"]


class SparseOptError(SparsegraphError, ValueError):
    """Bad input to SparseOpt."""


def neuron_factors(mask: torch.Tensor, out_axis: int) -> torch.Tensor | None:
    """√(1 − s_i) / √(1 − s_avg) per output neuron i, shaped to broadcast over the weight;
    None when every row has the same density (dense or uniformly sparse: nothing to correct).

    >>> m = torch.tensor([[1., 1., 0., 0.], [1., 0., 0., 0.]])   # densities 1/2 and 1/4, mean 3/8
    >>> neuron_factors(m, 0).flatten()                             # √(4/3) and √(2/3)
    tensor([1.1547, 0.8165])
    """
    out_axis = out_axis % mask.dim()
    others = [a for a in range(mask.dim()) if a != out_axis]
    nnz = (mask != 0).sum(dim=others, dtype=torch.int64) if others else (mask != 0).to(torch.int64)  # (rows,)
    if bool((nnz == nnz[0]).all()):
        return None
    fan_in = mask.numel() // mask.shape[out_axis]
    density = nnz.to(torch.float64) / fan_in  # 1 − s_i
    density_avg = density.mean()  # 1 − s_avg = nnz / numel
    factor = (density.sqrt() / density_avg.sqrt()).to(torch.float32)
    shape = [1] * mask.dim()
    shape[out_axis] = -1
    return factor.reshape(shape)


class SparseOpt(torch.optim.Optimizer):
    """Wrap any optimizer: rescale sparse-weight gradients per neuron, then step the wrapped one.

    `param_groups`, `state`, `defaults`, `state_dict`, `load_state_dict`, `zero_grad` and
    `add_param_group` are the wrapped optimizer's; learning-rate schedulers accept a SparseOpt.
    Step pre-hooks registered on the SparseOpt run before the correction (uncorrected gradients).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SparseOptError(f"SparseOpt: expected a torch.optim.Optimizer to wrap, got "
                                 f"{type(optimizer).__name__}")
        if isinstance(optimizer, SparseOpt):
            raise SparseOptError("SparseOpt: the optimizer is already a SparseOpt")
        _, self.layers = sparse_layers(model, "SparseOpt", exc=SparseOptError)
        self.optimizer, self.model, self.module = optimizer, model, unwrap(model)
        # Optimizer.__init__ is not called: the wrapped optimizer owns groups and state; we only
        # need our own hook tables and the hooked step that runs them.
        for table in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                      "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                      "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, table, OrderedDict())
        self._patch_step_function()
        self._cache: dict[str, tuple[tuple[int, int], torch.Tensor | None]] = {}

    # -- delegation ---------------------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"SparseOpt({self.optimizer!r})"

    # -- the correction -----------------------------------------------------------------------
    def factors(self) -> dict[str, torch.Tensor | None]:
        """Per sparse weight its factor tensor (None: left unchanged), recomputed when its mask changed."""
        out = {}
        for lay in self.layers:
            key = (id(lay.mask), lay.mask._version)
            cached = self._cache.get(lay.name)
            if cached is None or cached[0] != key:
                f = neuron_factors(lay.mask, lay.plan.out_axis if lay.plan.out_axis is not None else 0)
                cached = (key, None if f is None else f.to(lay.param.device))
                self._cache[lay.name] = cached
            out[lay.name] = cached[1]
        return out

    def refresh(self) -> None:
        """Forget the cached factors (needed only after writing masks behind autograd's version
        counter, e.g. through `mask.data`; in-place updates and load_state_dict are noticed)."""
        self._cache.clear()

    @torch.no_grad()
    def correct(self) -> None:
        """Rescale the sparse weights' gradients in place (what `step` does before stepping)."""
        capture_pending(self.module)  # a RigL waiting for the dense gradient takes it uncorrected
        factors = self.factors()
        for lay in self.layers:
            f, g = factors[lay.name], lay.param.grad
            if f is not None and g is not None:
                g.mul_(shard_like(f.to(g.dtype).expand(lay.mask.shape), g))  # a DTensor shard under FSDP2

    def step(self, closure=None):
        if closure is None:
            self.correct()
            return self.optimizer.step()

        def corrected_closure():
            with torch.enable_grad():
                loss = closure()
            self.correct()
            return loss

        return self.optimizer.step(corrected_closure)
