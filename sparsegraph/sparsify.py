"""`sg.sparsify`: capture -> plan -> emit, the one verb for Sparse-IFT rewrites."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import _as_tuple, capture
from .graph import ModelGraph, SparsegraphError
from .io import source_of, sync_config
from .passes.emit_module import emit_module, verify
from .passes.emit_torch import emit
from .passes.sparse_ift import Options, make_plan
from .plan import SparsityPlan

OUTPUTS = ("module", "graph")


def sparsify(model: nn.Module, example_inputs: Any, transform: str = "sparse_wide", sparsity: float = 0.75,
             mask: str = "uniform", seed: int = 0, *, output: str | None = None, inplace: bool = False,
             include_stem: bool = False, include_head: bool = False,
             filter: Callable[[Any, str], bool] | None = None, budget: float | None = None,
             budget_ratio: float | None = None, factorized_bn: bool = False, width: float | None = None,
             init: str = "default", verify_module: bool = True, plan: SparsityPlan | None = None,
             graph: ModelGraph | None = None) -> nn.Module:
    """Rewrite a dense model into a Sparse Iso-FLOP Transformation of itself.

    Returns your own model, same class, with the plan applied (`output="module"`, the default for
    an `nn.Module`): widened parameters and sizes (a Hugging Face model is rebuilt from its widened
    config), sparse weights as dense parameters with a `<name>_mask` buffer beside them, and Sparse
    Parallel / Factorized / Doped layers swapped for the modules of `sparsegraph.nn`. It is verified
    against the captured graph: weight shapes, FLOPs and outputs. `sg.plan_of(model)` (or
    `model.plan`) is the `SparsityPlan`. `output="graph"` returns the captured aten graph as a
    trainable `fx.GraphModule` instead (the default when `model` is an `fx.GraphModule`).

    transform: sparse_wide | sparse_parallel | sparse_factorized | sparse_doped
    mask:      uniform | erk | "nm:2:4" | "block:32" | "balanced_block:32"
    inplace:   rewrite `model` itself instead of a copy (module form)
    filter:    (module, fqn) -> bool, which layers may become sparse
    budget / budget_ratio: Sparse Wide only, target sparse FLOPs instead of the original's
    width:     Sparse Wide only, widen by exactly this factor at density 1 - sparsity (no iso-FLOP
               search): width and sparsity as independent knobs, e.g. for SμPar sweeps
    init:      "default" (fresh PyTorch initialisation) or "keep" (keep weights whose shape is unchanged)
    plan:      apply this plan (e.g. one read from a file) instead of planning

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini")
    >>> wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", sparsity=0.75)
    >>> type(wide).__name__, type(wide.h[0].mlp.c_fc).__name__     # your class; a masked nn.Linear
    ('GPT', 'MaskedLinear')
    >>> wide.plan.weight("h.0.mlp.c_fc.weight").shape               # d_model 128 -> 256, FFN 512 -> 1024
    [1024, 256]
    >>> round(wide.plan.flops_ratio, 3)                             # sparse FLOPs / original dense FLOPs
    1.0
    >>> wide(spec.example_inputs[0]).shape
    torch.Size([2, 64, 256])
    """
    output = output or ("graph" if isinstance(model, fx.GraphModule) else "module")
    if output not in OUTPUTS:
        raise SparsegraphError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    inputs = _as_tuple(example_inputs)
    g = graph or capture(model, inputs)
    if plan is None:
        modules = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
        opts = Options(include_stem, include_head, filter, budget, budget_ratio, factorized_bn, width,
                       resolve_module=modules.get)
        plan = make_plan(g, transform, sparsity, mask, seed, opts)
    if not plan.source and isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):
        plan.source = source_of(model)  # how sg.load rebuilds the dense original
    graph_form = emit(g.source, plan, init)
    graph_form.example_inputs = inputs
    check_runs(graph_form, plan)
    if output == "graph":
        return graph_form
    out = emit_module(model, g, plan, init, inplace=inplace)
    if verify_module:
        verify(out, graph_form, plan, inputs)
    out.example_inputs = inputs
    sync_config(out)  # a Hugging Face config carries the plan (config.json after save_pretrained)
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
