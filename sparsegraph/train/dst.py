"""Dynamic sparse training: RigL, SET, GMP and static masks (DESIGN.md section 5).

Every method works on a model made by `sg.sparsify` (its sparse weights are dense parameters with a
`<name>_mask` buffer and the graph computes `weight * mask`) and is driven by one call per step:

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("resnet-mini")
    >>> model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, width=1.0)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> rigl = sg.dst.RigL(model, opt, total_steps=20, update_interval=5)
    >>> x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    >>> for _ in range(20):
    ...     opt.zero_grad()
    ...     torch.nn.functional.cross_entropy(model(x), y).backward()
    ...     opt.step()
    ...     rigl.step()
    >>> [h["step"] for h in sg.plan_of(model).history]       # updates until 75% of training
    [5, 10]

What the methods do at an update step t (every `update_interval` steps):

- RigL (Evci et al. 2020, Algorithm 1): drop the fraction α_t of each layer's active weights with
  the smallest |w|, grow as many at the positions outside the kept set with the largest |dense
  gradient|, until `end_fraction` of training. α_t = α/2·(1 + cos(πt/T_end)) (cosine schedule).
  The dense gradient is the gradient of the effective weight `weight * mask` at every position;
  it is captured on the update iterations only (see `RigL`).
- SET (Mocanu et al. 2018): as RigL, growing at random (seeded by (seed, layer, step)).
- GMP (Zhu & Gupta 2017): start dense and prune by magnitude on the cubic schedule
  s_t = s_f + (s_0 − s_f)(1 − (t − t_0)/(nΔt))³ to the plan's density; nothing regrows.
- Static: the masks never change.

Invariants kept after every `.step()`: the layer's number of active units never changes (RigL,
SET, Static); weight == 0 wherever mask == 0 (the optimizer cannot resurrect pruned weights through
momentum or weight decay); regrown weights are zero and so is every optimizer state tensor of the
parameter's shape (momentum, Adam moments, ...) at regrown and pruned positions.

Block and balanced-block masks change whole blocks (a balanced mask keeps the same number of
blocks in every block-row); N:M masks regrow inside the group a weight left, so N:M holds.

Compact storage: on a model lowered by `sg.lower`, a block-masked weight stored as its blocks
(`weight_values` and BSR index buffers, a `LoweredLinear` / `LoweredConv2d`) is updated in place by
RigL and SET with the same decisions (`sparsegraph.train.compact`): the stored-block count never
changes, kept blocks keep their values and optimizer state, regrown blocks and their state start at
zero, and RigL's gradient on blocks that are not stored comes from SDDMM on candidate layouts, so
no dense weight or gradient is formed. Static leaves such layers alone; GMP, which changes the
count, needs masked-dense weights.

Distributed: every decision is a deterministic function of the weights (identical on every rank
under DistributedDataParallel), the gradients (all-reduced by DDP before the optimizer step, where
they are captured) and seeds derived from (seed, layer name, step). Ties go to the lower index.
Under FSDP2 (`fully_shard`) weights, gradients and optimizer state are DTensor shards while the
mask buffers stay whole on every rank: scores are taken on the full tensors (`full_tensor()`, the
whole dense gradient for RigL's growth), so every rank makes the same decision, and each applies
it to its own shard (`sparsegraph.sharded`).
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..graph import SparsegraphError
from ..io import sync_config
from ..masks import layer_seed
from ..nn.lowered import is_lowered
from ..plan import SparsityPlan, WeightPlan, plan_of
from ..sharded import full, shard_like
from ..unwrap import unwrap
from .compact import CompactLayer, compact_layer
from .mask_units import Units, top_per_pool

__all__ = ["DSTError", "DynamicSparsity", "RigL", "SET", "GMP", "Static", "drop_fraction_at", "gmp_sparsity",
           "capture_pending"]

SCHEDULES = ("cosine", "constant", "linear")


class DSTError(SparsegraphError, ValueError):
    """Bad input to a dynamic sparse training method; one line naming what is wrong."""


# ---------------------------------------------------------------------------------------------
# schedules (the formulas, once)
# ---------------------------------------------------------------------------------------------
def drop_fraction_at(alpha: float, t: int, t_end: float, schedule: str = "cosine") -> float:
    """The fraction of active weights RigL/SET replace at step t < t_end.

    cosine (Evci et al. 2020, eq. 1): α_t = α/2 · (1 + cos(π t / T_end));  constant: α;
    linear: α · (1 − t / T_end).

    >>> round(drop_fraction_at(0.3, 375, 750), 6)    # half-way: α/2
    0.15
    """
    if schedule == "cosine":
        return alpha / 2 * (1 + math.cos(math.pi * t / t_end))
    if schedule == "linear":
        return alpha * (1 - t / t_end)
    return alpha


def gmp_sparsity(t: int, s_0: float, s_f: float, t_0: int, n: int, dt: int) -> float:
    """Zhu & Gupta 2017, eq. 1: s_t = s_f + (s_0 − s_f)(1 − (t − t_0)/(nΔt))³ for t_0 <= t <= t_0 + nΔt.

    >>> round(gmp_sparsity(300, 0.0, 0.9, 0, 6, 100), 6)   # 0.9 − 0.9 · (1/2)³
    0.7875
    """
    frac = min(max((t - t_0) / (n * dt), 0.0), 1.0)
    return s_f + (s_0 - s_f) * (1 - frac) ** 3


# ---------------------------------------------------------------------------------------------
# plumbing: layers, wrappers, the registry SparseOpt asks for a pending dense-gradient capture
# ---------------------------------------------------------------------------------------------
def zero_state(optimizer, param: nn.Parameter, keep: torch.Tensor) -> None:
    """Zero every optimizer state tensor of the parameter's shape where keep (a full tensor) is False."""
    state = getattr(optimizer, "state", {}).get(param, {})
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.mul_(shard_like(keep.to(value.dtype), value))


@dataclass
class Layer:
    """A masked sparse weight: a dense parameter and its `<name>_mask` buffer (the compact form of a
    lowered weight is `compact.CompactLayer`, with the same methods)."""
    name: str
    param: nn.Parameter
    mask: torch.Tensor  # the `<name>_mask` buffer, updated in place (DDP and state_dict hold it)
    plan: WeightPlan
    stash: torch.Tensor | None = field(default=None, repr=False)  # the real mask while RigL runs it at ones

    storage = "masked"

    @functools.cached_property
    def units(self) -> Units:
        """What is dropped and grown (elements, blocks, N:M groups), built on first use: for N:M masks it
        holds a pool index per element, which SparseOpt, sharing these layers, never needs."""
        return Units(self.param.shape, self.plan.out_axis, self.plan.in_axes, self.plan.mask)

    def active(self) -> torch.Tensor:
        """(units,) bool: units with a nonzero mask entry."""
        return self.units.active(self.mask)

    def weight_score(self) -> torch.Tensor:
        """(units,) mean |w| per unit, of the whole weight under FSDP2."""
        return self.units.score(full(self.param))

    def density(self) -> float:
        return float(self.mask.count_nonzero()) / self.mask.numel()

    def clamp_(self) -> None:
        """weight *= mask: the optimizer may have moved masked weights (noise, custom rules)."""
        self.param.mul_(shard_like(self.mask, self.param))

    def zero_state_(self, optimizer) -> None:
        """Weight and optimizer state at zero wherever the mask is."""
        keep = self.mask != 0
        self.param.mul_(shard_like(keep, self.param))
        zero_state(optimizer, self.param, keep)

    def apply_(self, new: torch.Tensor, kept: torch.Tensor, optimizer) -> None:
        """The mask becomes `new` (units,); weights and optimizer state outside `kept` start at zero."""
        new_el, kept_el = self.units.expand(new, self.mask), self.units.expand(kept, self.param)
        self.param.mul_(shard_like(kept_el, self.param))  # dropped and regrown weights start at zero
        self.mask.copy_(new_el)
        zero_state(optimizer, self.param, kept_el != 0)

    # -- RigL: the dense gradient ---------------------------------------------------------------
    def arm(self) -> None:
        """Run the next forward with the mask at ones (in place: DDP broadcasts and autograd saves this
        very tensor); the forward is unchanged since masked weights are zero."""
        self.stash = self.mask.clone()
        self.mask.fill_(1.0)

    def disarm(self) -> None:
        if self.stash is not None:
            self.mask.copy_(self.stash)
            self.stash = None

    def capture(self) -> torch.Tensor:
        """The dense gradient of the effective weight; the gradient is masked and the mask restored."""
        g = self.param.grad
        dense = g.detach().clone() if g is not None else torch.zeros_like(self.param)
        if g is not None:
            g.mul_(shard_like(self.stash, g))  # the optimizer sees the masked gradient, as on any other step
        self.disarm()
        return dense

    def growth_score(self, captured: torch.Tensor) -> torch.Tensor:
        """(units,) mean |dense gradient| per unit (all of it, under FSDP2 too)."""
        return self.units.score(full(captured))


def sparse_layers(model: nn.Module, who: str, *, exc=DSTError, compact: bool = False
                  ) -> tuple[SparsityPlan, list[Layer | CompactLayer]]:
    """(plan, layers) of a sparsegraph model; one clear error for a model without masks. With
    `compact`, a weight `sg.lower` stored as blocks is a `CompactLayer`."""
    if not isinstance(model, nn.Module):
        raise exc(f"{who}: expected an nn.Module made by sg.sparsify, got {type(model).__name__}")
    plan = plan_of(model)
    if plan is None:
        raise exc(f"{who}: {type(model).__name__} has no sparsity plan, so no masks to train: make the "
                  "model with sg.sparsify(model, example_inputs, ...)")
    module = unwrap(model)
    layers = []
    for w in plan.sparse_weights:
        holder = _submodule(module, w.name.rpartition(".")[0])
        if holder is not None and w.name.endswith(".weight") and is_lowered(holder):
            if not compact:
                raise exc(f"{who}: {w.name} is stored compactly (lowered by sg.lower); {who} works on masked-dense "
                          "weights: apply it to the model before lowering")
            try:
                layers.append(compact_layer(w.name, holder, w, who))
            except ValueError as e:
                raise exc(str(e)) from None
            continue
        try:
            param = module.get_parameter(w.name)
            mask = module.get_buffer(w.name + "_mask")
        except AttributeError:
            raise exc(f"{who}: the plan names sparse weight {w.name!r} but the model has no parameter "
                      f"{w.name!r} with a buffer {w.name + '_mask'!r}") from None
        if mask.shape != param.shape:
            raise exc(f"{who}: mask of {w.name!r} has shape {tuple(mask.shape)}, the weight {tuple(param.shape)}")
        layers.append(Layer(w.name, param, mask, w))
    if not layers:
        raise exc(f"{who}: the model {plan.model!r} has no sparse weights (every weight is dense); "
                  "sparsify it with a sparsity > 0 first")
    return plan, layers


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    """`module.get_submodule(name)`, or None if there is none (or no name: the root holds no lowered weight)."""
    if not name:
        return None
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def capture_pending(model: nn.Module) -> None:
    """Capture now the dense gradients a RigL attached to `model` is waiting for, masking the
    gradients and restoring the masks (otherwise this happens in the optimizer step pre-hook).

    SparseOpt calls it before rescaling, so regrowth sees the uncorrected gradient. Call it yourself
    before anything that reads gradients between backward and optimizer.step() -- gradient clipping
    (`clip_grad_norm_`), logging of gradient norms -- so that it sees the masked gradient on update
    iterations too. A no-op on every other iteration.
    """
    for ref in _ATTACHED.get(unwrap(model), []):
        dst = ref()
        if dst is not None:
            dst._capture()


class _WeakHook:
    """A hook that calls `owner.<method>` through a weak reference. It keeps no DST object alive,
    and a pickled or deep-copied model gets an inert copy (the hook belongs to this session)."""

    def __init__(self, owner, method: str):
        self._ref, self._method = weakref.ref(owner), method

    def __call__(self, *args):
        owner = self._ref() if self._ref is not None else None
        if owner is not None:
            getattr(owner, self._method)(*args)

    def __getstate__(self):
        return {"_ref": None, "_method": self._method}

    def __deepcopy__(self, memo):
        clone = _WeakHook.__new__(_WeakHook)
        clone.__dict__.update(self.__getstate__())
        return clone


def _check_positive_int(value, what: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DSTError(f"{who}: {what} must be a positive integer, got {value!r}")
    return value


def _check_fraction(value, what: str, who: str, *, closed_right: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0 < value <= 1 if closed_right else 0 < value < 1)
    if not ok:
        raise DSTError(f"{who}: {what} must be in (0, 1{']' if closed_right else ')'}, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# the base class: step counting, invariants, optimizer state, history
# ---------------------------------------------------------------------------------------------
class DynamicSparsity:
    """Base of RigL, SET, GMP and Static; call `.step()` once after every `optimizer.step()`."""

    method = "static"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                 update_interval: int = 100, end_fraction: float = 0.75, *, seed: int | None = None):
        who = type(self).__name__
        self.total_steps = _check_positive_int(total_steps, "total_steps", who)
        self.update_interval = _check_positive_int(update_interval, "update_interval", who)
        self.end_fraction = _check_fraction(end_fraction, "end_fraction", who, closed_right=True)
        self.t_end = int(self.end_fraction * self.total_steps)  # no updates at t >= t_end
        self.model, self.module = model, unwrap(model)
        self.plan, self.layers = sparse_layers(model, who, compact=True)
        self.optimizer = optimizer
        self.seed = self.plan.seed if seed is None else int(seed)
        self.t = 0  # optimizer steps completed
        in_optimizer = {id(p) for g in getattr(optimizer, "param_groups", []) for p in g["params"]}
        missing = [lay.name for lay in self.layers if id(lay.param) not in in_optimizer]
        if missing:
            raise DSTError(f"{who}: the optimizer does not update sparse weight(s) {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}; pass the optimizer of this model")
        self._handles: list = []
        _ATTACHED.setdefault(self.module, []).append(weakref.ref(self))
        with torch.no_grad():
            self._start()
            for lay in self.layers:  # weight == 0 and optimizer state == 0 where the mask is 0
                lay.zero_state_(self.optimizer)

    def _start(self) -> None:
        """Prepare the masks before training (GMP starts dense)."""

    # -- the step -----------------------------------------------------------------------------
    def is_update_step(self, t: int) -> bool:
        return False

    def step(self) -> None:
        """Call once after every optimizer.step(): keeps pruned weights at zero, updates masks when due."""
        self.t += 1
        with torch.no_grad():
            for lay in self.layers:  # the optimizer may have moved masked weights (noise, custom rules)
                lay.clamp_()
            if self.is_update_step(self.t):
                self._update(self.t)

    def _update(self, t: int) -> None:
        record = {"step": t, "method": self.method, **self._update_info(t), "layers": {}}
        for lay in self.layers:
            change = self._update_layer(lay, t)
            if change is None:
                record["layers"][lay.name] = {"dropped": 0, "grown": 0, "changed": 0, "density": lay.density()}
                continue
            new, kept, stats = change  # (units,) bool each: the new mask and the units kept as they were
            lay.apply_(new, kept, self.optimizer)  # dropped and regrown units start at zero, state too
            record["layers"][lay.name] = {**stats, "density": lay.density()}
        self._record(record)

    def _update_info(self, t: int) -> dict:
        return {}

    def _update_layer(self, lay: Layer, t: int):
        """(new, kept, stats) in units, or None for no change."""
        return None

    # -- helpers ------------------------------------------------------------------------------
    def _record(self, record: dict) -> None:
        self.plan.history.append(record)
        self._measure()
        sync_config(self.module)  # a Hugging Face config carries the plan with its new history

    def _measure(self) -> None:
        from ..passes.emit_torch import measure

        measure(self.module, self.plan)  # the plan's densities and sparse FLOPs follow the masks

    def densities(self) -> dict[str, float]:
        """Current density of every sparse layer."""
        return {lay.name: lay.density() for lay in self.layers}

    def state_dict(self) -> dict:
        """The step counter (masks live in the model's state_dict, history in its plan)."""
        return {"method": self.method, "step": self.t}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method:
            raise DSTError(f"{type(self).__name__}: cannot resume from a {state.get('method')!r} state")
        self.t = int(state["step"])

    def remove(self) -> None:
        """Detach the hooks this object installed."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        refs = _ATTACHED.get(self.module, [])
        refs[:] = [r for r in refs if r() is not None and r() is not self]

    def _capture(self) -> None:
        """Only RigL captures dense gradients."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={len(self.layers)}, step={self.t}/{self.total_steps}, "
                f"update_interval={self.update_interval}, end_step={self.t_end})")


class Static(DynamicSparsity):
    """Masks never change; pruned weights and their optimizer state stay at zero.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("resnet-mini")
    >>> model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, width=1.0)
    >>> opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    >>> static = sg.dst.Static(model, opt, total_steps=100)
    """

    method = "static"

    def __init__(self, model, optimizer, total_steps: int, update_interval: int = 100,
                 end_fraction: float = 0.75, **kwargs):
        super().__init__(model, optimizer, total_steps, update_interval, end_fraction, **kwargs)


# ---------------------------------------------------------------------------------------------
# drop and grow: RigL and SET
# ---------------------------------------------------------------------------------------------
class _DropGrow(DynamicSparsity):
    def __init__(self, model, optimizer, total_steps: int, update_interval: int = 100,
                 drop_fraction: float = 0.3, schedule: str = "cosine", end_fraction: float = 0.75, *,
                 seed: int | None = None):
        who = type(self).__name__
        self.drop_fraction = _check_fraction(drop_fraction, "drop_fraction", who)
        if schedule not in SCHEDULES:
            raise DSTError(f"{who}: unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
        self.schedule = schedule
        super().__init__(model, optimizer, total_steps, update_interval, end_fraction, seed=seed)

    def is_update_step(self, t: int) -> bool:
        return t > 0 and t % self.update_interval == 0 and t < self.t_end

    def drop_fraction_at(self, t: int) -> float:
        return drop_fraction_at(self.drop_fraction, t, self.t_end, self.schedule)

    def _update_info(self, t: int) -> dict:
        return {"drop_fraction": self.drop_fraction_at(t)}

    def _grow_score(self, lay: Layer, t: int) -> torch.Tensor:
        raise NotImplementedError

    def _update_layer(self, lay: Layer, t: int):
        u = lay.units
        active = lay.active()  # (units,) bool
        n_active = int(active.sum())
        k = int(self.drop_fraction_at(t) * n_active)  # floor, as RigL's reference code
        if k == 0 or n_active == u.count:  # nothing to replace, or a dense layer: nowhere to grow
            return None
        inf = torch.tensor(float("inf"))
        w_score = lay.weight_score().to(active.device)  # (units,) mean |w|
        dropped = top_per_pool(torch.where(active, -w_score, -inf.to(w_score)), k)  # k smallest |w|
        kept = active & ~dropped
        g_score = self._grow_score(lay, t).to(active.device)  # (units,)
        g_score = torch.where(kept, -inf.to(g_score), g_score)  # grow outside the kept set
        if u.pools is None:
            grown = top_per_pool(g_score, k)
        else:  # regrow in the pool (block-row, N:M group) each unit left: keeps the structure
            pools = u.pools.to(dropped.device)
            per_pool = torch.bincount(pools[dropped], minlength=int(pools.max()) + 1)
            grown = top_per_pool(g_score, per_pool, pools)
        new = kept | grown
        stats = {"dropped": u.elements(dropped), "grown": u.elements(grown),
                 "changed": u.elements(grown & ~active)}  # positions that really were inactive
        return new, kept, stats


class RigL(_DropGrow):
    """RigL (Evci et al. 2020): drop smallest |w|, grow largest |dense gradient|, cosine-annealed.

    `RigL(model, optimizer, total_steps, update_interval=100, drop_fraction=0.3, schedule="cosine",
    end_fraction=0.75)`; call `.step()` after every `optimizer.step()`. The optimizer may be a
    `sg.SparseOpt` (regrowth still sees the uncorrected gradient).

    Dense gradient, on update iterations only: when the model is run (with gradients enabled)
    before an update step, the mask buffers are set to ones — the forward is unchanged since masked
    weights are zero — so the backward pass (and DDP's all-reduce) produces the gradient of the
    effective weight at every position. An optimizer step pre-hook stashes it, multiplies the
    gradients by the real masks and restores the masks, so the optimizer never sees a dense gradient.
    Other iterations cost one in-place `weight *= mask` per sparse layer. A compact (lowered) layer
    instead keeps its input and output gradient on that iteration, and the pre-hook computes the
    gradient on the blocks it does not store by SDDMM (`sparsegraph.train.compact`).

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("resnet-mini")
    >>> model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:4",
    ...                     width=1.0)
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> rigl = sg.dst.RigL(model, opt, total_steps=1000)   # blocks of 4x4, balanced per block-row
    >>> rigl.layers[0].units.granularity
    'block 4x4'
    """

    method = "rigl"

    def __init__(self, model, optimizer, total_steps: int, update_interval: int = 100,
                 drop_fraction: float = 0.3, schedule: str = "cosine", end_fraction: float = 0.75, *,
                 seed: int | None = None):
        super().__init__(model, optimizer, total_steps, update_interval, drop_fraction, schedule, end_fraction,
                         seed=seed)
        self._armed = False  # masks are set to ones (compact layers hooked) for a dense-gradient pass
        self._dense: dict[str, torch.Tensor] | None = None  # captured per layer: what `growth_score` reads
        self._captured_for = -1  # the update step the captured gradients belong to
        if not hasattr(self.optimizer, "register_step_pre_hook"):
            raise DSTError(f"RigL: {type(self.optimizer).__name__} is not a torch.optim.Optimizer "
                           "(RigL hooks its step to capture the dense gradient)")
        compact = [lay.name for lay in self.layers if lay.storage == "compact"]
        if compact and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise DSTError(f"RigL: {compact[0]} is stored compactly, whose growth gradient comes from this rank's "
                           "inputs only (it is not all-reduced); under several ranks use SET, or RigL on the "
                           "masked-dense model")
        self._handles.append(self.optimizer.register_step_pre_hook(_WeakHook(self, "_capture_hook")))
        self._handles.append(self.module.register_forward_pre_hook(_WeakHook(self, "_arm")))

    # -- dense gradient capture -----------------------------------------------------------------
    def _arm(self, module, args) -> None:
        t_next = self.t + 1
        if self._armed or not torch.is_grad_enabled() or self._captured_for == t_next \
                or not self.is_update_step(t_next):
            return
        with torch.no_grad():
            for lay in self.layers:
                lay.arm()
        self._armed = True

    def _capture_hook(self, optimizer, args, kwargs) -> None:
        self._capture()

    def _capture(self) -> None:
        if not self._armed:
            return
        with torch.no_grad():
            self._dense = {lay.name: lay.capture() for lay in self.layers}
        self._armed, self._captured_for = False, self.t + 1

    def step(self) -> None:
        if self._armed:  # the model ran armed, but the optimizer we hooked did not step
            warnings.warn("RigL: the optimizer step did not go through the optimizer given to RigL; "
                          "capturing the dense gradient in .step() (the optimizer saw it unmasked)",
                          stacklevel=2)
            self._capture()
        t_next = self.t + 1
        if self.is_update_step(t_next) and self._captured_for != t_next:
            raise DSTError(f"RigL: no dense gradient for the mask update at step {t_next}: run the model "
                           "forward and backward (gradients enabled) before each optimizer.step(), and call "
                           ".step() exactly once after each optimizer.step()")
        try:
            super().step()
        finally:
            self._dense = None

    def _grow_score(self, lay: Layer, t: int) -> torch.Tensor:
        return lay.growth_score(self._dense[lay.name])  # mean |dense gradient| per unit (all of it)

    def _disarm(self) -> None:
        """Back to the real masks (and no hooks on compact layers) without capturing."""
        if self._armed:
            with torch.no_grad():
                for lay in self.layers:
                    lay.disarm()
            self._armed = False

    def load_state_dict(self, state: dict) -> None:
        self._disarm()
        super().load_state_dict(state)

    def remove(self) -> None:
        self._disarm()
        super().remove()


class SET(_DropGrow):
    """SET (Mocanu et al. 2018): drop smallest |w|, grow at random outside the kept set.

    Random choices come from a generator seeded by (seed, layer name, step): identical on every rank.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("resnet-mini")
    >>> model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.8, width=1.0)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> set_ = sg.dst.SET(model, opt, total_steps=1000, schedule="constant")
    """

    method = "set"

    def _grow_score(self, lay: Layer, t: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(layer_seed(self.seed, f"{lay.name}@{t}"))
        return torch.rand(lay.units.count, generator=gen).to(lay.param.device)


# ---------------------------------------------------------------------------------------------
# gradual magnitude pruning
# ---------------------------------------------------------------------------------------------
class GMP(DynamicSparsity):
    """Gradual magnitude pruning (Zhu & Gupta 2017): dense start, cubic schedule to the plan's density.

    The plan's masks give each layer's final density ρ_f = 1 − s_f (in whole blocks for block
    masks); the masks are reset to the initial sparsity s_0 (dense by default) and, every
    `update_interval` steps from t_0 = start_fraction·total_steps, the smallest-|w| units are pruned
    to s_t = s_f + (s_0 − s_f)(1 − (t − t_0)/(nΔt))³ with n = ⌊(T_end − t_0)/Δt⌋ (at least 1),
    T_end = end_fraction·total_steps. Balanced-block masks prune per block-row. Pruned weights never
    regrow. N:M masks fix the density, so GMP rejects them.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("resnet-mini")
    >>> model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, width=1.0)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> gmp = sg.dst.GMP(model, opt, total_steps=800)      # n = 6 prunings at t = 100 ... 600
    >>> min(gmp.densities().values())                     # dense at the start
    1.0
    >>> [round(gmp.sparsity_at(t), 3) for t in (0, 300, 600, 800)]   # s_f = 0.9002 for the first layer
    [0.0, 0.788, 0.9, 0.9]
    """

    method = "gmp"

    def __init__(self, model, optimizer, total_steps: int, update_interval: int = 100,
                 end_fraction: float = 0.75, *, initial_sparsity: float = 0.0, start_fraction: float = 0.0,
                 seed: int | None = None):
        if isinstance(initial_sparsity, bool) or not isinstance(initial_sparsity, (int, float)) \
                or not 0 <= initial_sparsity < 1:
            raise DSTError(f"GMP: initial_sparsity must be in [0, 1), got {initial_sparsity!r}")
        if isinstance(start_fraction, bool) or not isinstance(start_fraction, (int, float)) \
                or not 0 <= start_fraction < end_fraction:
            raise DSTError(f"GMP: start_fraction must be in [0, end_fraction={end_fraction!r}), got {start_fraction!r}")
        self.initial_sparsity = float(initial_sparsity)
        self.start_fraction = float(start_fraction)
        super().__init__(model, optimizer, total_steps, update_interval, end_fraction, seed=seed)

    def _start(self) -> None:
        self.t_0 = int(self.start_fraction * self.total_steps)
        self.n = max(1, (self.t_end - self.t_0) // self.update_interval)
        self.final_units: dict[str, int] = {}  # per layer (or per pool) the unit count at the end
        for lay in self.layers:
            if lay.storage == "compact":
                raise DSTError(f"GMP: {lay.name} is stored compactly (lowered by sg.lower), with a fixed number of "
                               "blocks, and GMP changes that number: run GMP on the masked-dense model and lower it "
                               "after pruning")
            if lay.units.kind.name == "nm":
                raise DSTError(f"GMP: {lay.name} has an {lay.units.kind} mask, whose density is fixed; "
                               "use RigL/SET/Static or a uniform/block mask")
            active = lay.units.active(lay.mask)
            self.final_units[lay.name] = self._per_pool_max(lay, active)
            keep = self._keep(lay, torch.ones_like(active), self.initial_sparsity)
            lay.mask.copy_(lay.units.expand(keep, lay.mask))
        self._measure()

    @staticmethod
    def _per_pool_max(lay: Layer, active: torch.Tensor) -> int:
        if lay.units.pools is None:
            return int(active.sum())
        return int(torch.bincount(lay.units.pools.to(active.device)[active]).max())  # balanced: all equal

    def _pool_size(self, lay: Layer) -> int:
        return lay.units.count if lay.units.pools is None else lay.units.bcols

    def _target(self, lay: Layer, sparsity: float) -> int:
        """Units to keep (per pool for balanced blocks): round((1 − s) · size), at least the final count."""
        size = self._pool_size(lay)
        s_f = 1 - self.final_units[lay.name] / size
        s = min(sparsity, s_f)
        return max(self.final_units[lay.name], min(size, round((1 - s) * size)))

    def _keep(self, lay: Layer, active: torch.Tensor, sparsity: float) -> torch.Tensor:
        u = lay.units
        n = self._target(lay, sparsity)
        score = u.score(full(lay.param))
        score = torch.where(active, score, torch.tensor(-float("inf")).to(score))
        if u.pools is None:
            return top_per_pool(score, min(n, int(active.sum()))) & active
        counts = torch.full((u.brows,), n, dtype=torch.long)
        return top_per_pool(score, counts, u.pools) & active

    def sparsity_at(self, t: int, name: str | None = None) -> float:
        """Scheduled sparsity at step t (s_f of layer `name`, or of the first sparse layer)."""
        lay = next(lay for lay in self.layers if name is None or lay.name == name)
        s_f = 1 - self.final_units[lay.name] / self._pool_size(lay)
        s_0 = min(self.initial_sparsity, s_f)
        return gmp_sparsity(t, s_0, s_f, self.t_0, self.n, self.update_interval)

    def is_update_step(self, t: int) -> bool:
        return t >= max(1, self.t_0) and (t - self.t_0) % self.update_interval == 0 \
            and t <= self.t_0 + self.n * self.update_interval

    def _update_info(self, t: int) -> dict:
        return {"scheduled_sparsity": {lay.name: self.sparsity_at(t, lay.name) for lay in self.layers}}

    def _update_layer(self, lay: Layer, t: int):
        active = lay.units.active(lay.mask)
        keep = self._keep(lay, active, self.sparsity_at(t, lay.name))
        pruned = active & ~keep
        if not bool(pruned.any()):
            return None
        return keep, keep, {"dropped": lay.units.elements(pruned), "grown": 0, "changed": 0}
