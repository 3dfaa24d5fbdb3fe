"""`check_rewrite`: does a Sparse-IFT rewrite of this model keep its promises?

One rewrite (`sg.sparsify`) of one model, and every check the tests and `bench/model_sweep.py` apply
to it:

  runs    the rewritten model runs on the example inputs and gives outputs of the original's shapes
  flops   the plan's FLOPs are PyTorch's own count: the original's dense FLOPs equal FlopCounterMode
          on the captured original, the plan's dense FLOPs equal FlopCounterMode on the rewritten
          model (masks count in full there), and its sparse FLOPs equal what a re-capture of the
          rewritten model reads from its masks
  iso     sparse FLOPs within 0.1% of the original's dense FLOPs
  fold    `sg.fold` of the rewritten model computes the same function (eval mode)

The rewritten model is the module form (the user's own class); where sparsegraph cannot build it
(`EmitError`), the graph form is checked instead and the row says so (`form`, `module_error`).

FlopCounterMode runs with the math attention backend (CPU's fused kernels are invisible to it) and
with the grouped-matmul formula of `flops.flop_counter` (MoE experts, which PyTorch does not count).
"""
from __future__ import annotations

import time
import traceback
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten

from .flops import flop_counter

ISO_TOLERANCE = 1e-3


def call_flops(fn: Callable[[], object]) -> int:
    """FlopCounterMode's total for one call of `fn`, a training step's backward included (math
    attention, grouped matmuls counted; without nn.MultiheadAttention's fused inference path, whose op
    FlopCounterMode does not count)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with flop_counter() as fc, sdpa_kernel(SDPBackend.MATH):
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(fc.get_total_flops())


def count_flops(model: nn.Module, inputs: tuple) -> int:
    """`call_flops` of one forward pass, without autograd."""
    return call_flops(torch.no_grad()(lambda: model(*inputs)))


def masked_flops(g) -> int:
    """Sparse FLOPs of a captured model from its graph alone: every weight op's FLOPs times the density
    of the mask it multiplies its weight by (`weight * weight_mask` in the graph), plus the other ops."""
    from .flops import layer_density, op_flops
    from .layers import find_layers

    layers = [l for l in find_layers(g) if l.kind in ("linear", "conv")]
    ops = {l.op for l in layers}
    return sum(op_flops(g, op) for op in g if op.name not in ops) + \
        sum(round(op_flops(g, g.ops[l.op]) * layer_density(g, l)) for l in layers)


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def widened(plan) -> list[str]:
    """What grew: the widened groups' sizes (old->new) and the weights that changed shape."""
    sizes = sorted({(a, b) for grp in plan.groups for a, b in grp.sizes if a != b})
    return [f"{a}->{b}" for a, b in sizes]


def check_rewrite(model: nn.Module, example_inputs: tuple, transform: str, sparsity: float = 0.75,
                  mask: str = "uniform", *, graph=None, recapture: bool = True, fold: bool = True,
                  rtol: float = 1e-4, atol: float = 1e-5, **options) -> dict:
    """Rewrite `model` and check it (see the module docstring). Returns one row: the checks
    (`runs`, `flops`, `iso`, `fold`, `ok`), the numbers behind them and the plan; `error` names the
    first failure (an exception's first line, or which check failed)."""
    from . import fold as fold_model
    from .capture import _as_tuple, capture
    from .passes.emit_module import EmitError
    from .plan import plan_of
    from .sparsify import sparsify

    inputs = _as_tuple(example_inputs)
    row: dict[str, Any] = {"transform": transform, "sparsity": sparsity, "mask": mask, "runs": False,
                           "flops": False, "iso": False, "fold": None, "ok": False, "error": None}
    t0 = time.perf_counter()
    try:
        g = graph if graph is not None else capture(model, inputs)
        try:
            out, row["form"] = sparsify(model, inputs, transform, sparsity, mask, graph=g, **options), "module"
        except EmitError as e:  # a module form sparsegraph cannot build: the graph form is checked, the gap kept
            if "output" in options:
                raise
            row["module_error"] = str(e).strip().splitlines()[0]
            out = sparsify(model, inputs, transform, sparsity, mask, graph=g, output="graph", **options)
            row["form"] = "graph"
        plan = plan_of(out)
        row["plan"] = plan
        out.eval()
        with torch.no_grad():
            got, want = _tensors(out(*inputs)), _tensors(g.source.eval()(*inputs))
        row["runs"] = len(got) == len(want) and all(a.shape == b.shape for a, b in zip(got, want))
        tot = plan.totals
        row.update(original_flops=tot["original_dense_flops"], original_counted=count_flops(g.source, inputs),
                   dense_flops=tot["dense_flops"], dense_counted=count_flops(out, inputs),
                   sparse_flops=tot["sparse_flops"], ratio=plan.flops_ratio, sparsity_used=plan.sparsity_used,
                   sparse_weights=len(plan.sparse_weights), widened=widened(plan), notes=list(plan.notes))
        row["flops"] = row["original_flops"] == row["original_counted"] and row["dense_flops"] == row["dense_counted"]
        if recapture:  # the masks themselves, read back by a fresh capture of the rewritten model
            row["sparse_measured"] = masked_flops(capture(out, inputs))
            row["flops"] &= abs(row["sparse_measured"] - row["sparse_flops"]) <= 1e-6 * row["sparse_flops"]
        row["iso"] = abs(row["ratio"] - 1) <= ISO_TOLERANCE
        if fold:
            folded = fold_model(out)
            with torch.no_grad():
                a, b = _tensors(out(*inputs)), _tensors(folded(*inputs))
            row["fold_error"] = max(float(((x - y).abs().max() / (atol + rtol * x.abs().max())).item())
                                    for x, y in zip(a, b)) if a else 0.0
            row["fold"] = len(a) == len(b) and row["fold_error"] <= 1.0
        failed = [k for k in ("runs", "flops", "iso", "fold") if row[k] is False]
        row["ok"] = not failed
        row["error"] = f"check failed: {', '.join(failed)}" if failed else None
    except Exception as e:  # noqa: BLE001 - the row reports it
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
        row["traceback"] = traceback.format_exc(limit=6)
    row["seconds"] = time.perf_counter() - t0
    return row


__all__ = ["call_flops", "check_rewrite", "count_flops", "masked_flops", "widened", "ISO_TOLERANCE"]
