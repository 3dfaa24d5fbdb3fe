"""`sg.sparsify`: capture -> plan -> emit, the one verb for Sparse-IFT rewrites."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from .capture import _as_tuple, capture
from .graph import ModelGraph, SparsegraphError
from .passes.emit_torch import emit
from .passes.sparse_ift import Options, make_plan
from .plan import SparsityPlan


def sparsify(model: nn.Module, example_inputs: Any, transform: str = "sparse_wide", sparsity: float = 0.75,
             mask: str = "uniform", seed: int = 0, *, include_stem: bool = False, include_head: bool = False,
             filter: Callable[[Any, str], bool] | None = None, budget: float | None = None,
             budget_ratio: float | None = None, factorized_bn: bool = False, width: float | None = None,
             init: str = "default",
             graph: ModelGraph | None = None) -> torch.fx.GraphModule:
    """Rewrite a dense model into a Sparse Iso-FLOP Transformation of itself.

    Returns a trainable `fx.GraphModule` whose `.plan` is the `SparsityPlan`: sparse weights are
    dense parameters with `<name>_mask` buffers, the graph computes `weight * mask`.

    transform: sparse_wide | sparse_parallel | sparse_factorized | sparse_doped
    mask:      uniform | erk | "nm:2:4" | "block:32" | "balanced_block:32"
    filter:    (module_or_node, fqn) -> bool, which layers may become sparse
    budget / budget_ratio: Sparse Wide only, target sparse FLOPs instead of the original's
    width:     Sparse Wide only, widen by exactly this factor at density 1 - sparsity (no iso-FLOP
               search): width and sparsity as independent knobs, e.g. for SμPar sweeps
    init:      "default" (fresh PyTorch initialisation) or "keep" (keep weights whose shape is unchanged)

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini")
    >>> wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", sparsity=0.75)
    >>> wide.plan.weight("h.0.mlp.c_fc.weight").shape    # d_model 128 -> 256, FFN 512 -> 1024
    [1024, 256]
    >>> round(wide.plan.flops_ratio, 3)                 # sparse FLOPs / original dense FLOPs
    1.0
    >>> wide(spec.example_inputs[0]).shape
    torch.Size([2, 64, 256])
    """
    g = graph or capture(model, example_inputs)
    modules = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
    opts = Options(include_stem, include_head, filter, budget, budget_ratio, factorized_bn, width,
                   resolve_module=modules.get)
    plan = make_plan(g, transform, sparsity, mask, seed, opts)
    out = emit(g.source, plan, init)
    out.example_inputs = _as_tuple(example_inputs)
    check_runs(out, plan)
    return out


def check_runs(model: torch.fx.GraphModule, plan: SparsityPlan) -> None:
    """Run the rewritten model once on its example inputs: a broken rewrite fails here, loudly."""
    inputs = model.example_inputs
    if not inputs or any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs):
        return
    try:
        with torch.no_grad():
            training = model.training
            model.eval()
            model(*inputs)
            model.train(training)
    except Exception as e:  # noqa: BLE001
        raise SparsegraphError(f"{plan.model}: the {plan.transform} rewrite does not run: "
                               f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
