"""`sg.export_onnx`: a (sparsified) PyTorch model -> an ONNX file for ONNX Runtime.

1. The masks are multiplied into the weights (on a copy): `weight * mask` becomes one tensor, in
   the graph form and in the module form (your own model, its masked layers plain again).
2. `torch.onnx.export(dynamo=True)` in eval mode, then the ONNX optimizer's constant folding and
   rewrite rules (BatchNormalization folded into Conv, ...) -- without its initializer
   deduplication, which merges distinct parameters that happen to be equal (every fresh
   LayerNorm weight is all ones) and would tie dimension groups for later ONNX rewrites.
3. ONNX-to-ONNX passes (`sg.onnx.lower`): "dense" does nothing more; "ort-block", "ort-sparse" and
   "ort-native" fold first (BN, parallel branches, U.V products), then lower the sparse MatMul/Gemm weights
   (and, with "ort-native", the sparse Conv weights).
4. The plan (`sg.plan_of(model)`: families, densities, SμPar multipliers) goes into
   `metadata_props["sparsegraph.plan"]`; sparse weights become sparse initializers where that
   shrinks the file; the model is checked (`onnx.checker`, full) and written atomically.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as ir_common
import torch
import torch.fx as fx

from ..capture import _as_tuple, _first_line, _get_attr, _pop_attr, check_inputs, quiet, root_cause
from ..graph import SparsegraphError
from ..nn import bake_masks
from .rewrite import PLAN_KEY, keep_weight_views
from ..passes.products import module_form
from ..plan import plan_of

LOWER_MODES = ("dense", "ort-block", "ort-sparse", "ort-native")


def multiply_masks(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a sparsegraph model whose `weight * weight_mask` products are single weights (the
    masks removed): the graph form's products, or the module form's masked modules (`bake_masks`);
    other modules are returned as they are."""
    if module_form(model):
        return bake_masks(copy.deepcopy(model))
    if not isinstance(model, fx.GraphModule):
        return model
    gm = copy.deepcopy(model)
    masks = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.mul.Tensor or len(node.args) != 2:
            continue
        a, b = node.args
        if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (a, b)):
            continue
        w, m = (a, b) if b.target == f"{a.target}_mask" else (b, a) if a.target == f"{b.target}_mask" else (None, None)
        if w is None:
            continue
        with torch.no_grad():
            _get_attr(gm, w.target).mul_(_get_attr(gm, m.target))  # 0/1 masks: idempotent if read twice
        node.replace_all_uses_with(w)
        gm.graph.erase_node(node)
        masks.add(m.target)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    for name in masks:
        _pop_attr(gm, name)
    gm.recompile()
    return gm


def _optimize(model: ir.Model) -> None:
    """onnxscript's optimizer pipeline without DeduplicateInitializersPass (see the module docstring)."""
    try:
        from onnxscript import rewriter
        from onnxscript.optimizer import _constant_folding
    except ImportError:  # an onnxscript without these: export unoptimised
        return
    fold = ir.passes.PassManager([
        _constant_folding.FoldConstantsPass(shape_inference=True,
                                            input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                            should_fold=keep_weight_views),
        rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
        ir_common.RemoveUnusedNodesPass(), ir_common.RemoveUnusedFunctionsPass(), ir_common.RemoveUnusedOpsetsPass(),
    ], steps=2, early_stop=True)
    ir.passes.Sequential(
        ir_common.InlinePass(), fold, ir_common.RemoveUnusedNodesPass(),
        ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        ir_common.LiftSubgraphInitializersToMainGraphPass(), ir_common.CommonSubexpressionEliminationPass(),
        ir_common.OutputFixPass(), ir_common.NameFixPass(),
    )(model)


def to_onnx(model: torch.nn.Module, example_inputs: Any, *, optimize: bool = True, dynamic_shapes: Any = None,
            opset: int | None = None) -> ir.Model:
    """Export a PyTorch model (masks multiplied out, eval mode) to an onnx_ir model with its plan."""
    plan = plan_of(model)
    args = _as_tuple(example_inputs)
    check_inputs(model, args)
    masked = multiply_masks(model)
    training = masked.training
    masked.eval()
    try:
        with quiet():
            prog = torch.onnx.export(masked, args, dynamo=True, optimize=False, verbose=False,
                                     dynamic_shapes=dynamic_shapes, opset_version=opset)
    except Exception as e:  # noqa: BLE001 - torch.export / translation errors: the exporter wraps the cause
        raise SparsegraphError(f"torch.onnx.export failed for {type(model).__name__}: "
                               f"{_first_line(root_cause(e))}") from e
    finally:
        masked.train(training)
    onnx_model = prog.model
    if optimize:
        _optimize(onnx_model)
    if plan is not None:
        onnx_model.metadata_props[PLAN_KEY] = plan.to_json(indent=None)
    return onnx_model


def export_onnx(model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, lower: str = "dense", *,
                fold: bool | None = None, block: int | None = None, max_density: float | None = None,
                layout: str = "auto", optimize: bool = True, dynamic_shapes: Any = None, opset: int | None = None,
                sparse_initializers: bool = True, check: bool = True) -> str:
    """Export a model (dense or a sparsegraph rewrite) to ONNX for ONNX Runtime; returns `path`.

    lower  "dense"       weights with the masks multiplied out (any runtime)
           "ort-block"   block-sparse MatMul/Gemm weights as Gather + batched MatMul over the
                         nonzero blocks (standard ops; see `sg.onnx.lower` for block, max_density
                         and layout)
           "ort-sparse"  com.microsoft SparseToDenseMatMul, the weight a sparse-tensor input
                         (run with `sg.onnx.Session`, which feeds it)
           "ort-native"  the custom ops sparsegraph.SparseLinear (MatMul/Gemm) and SparseConv (Conv): the
                         native CPU kernels in ONNX Runtime (run with `sg.onnx.Session`, which registers
                         their library)
    fold   fold BN into Conv, parallel branches and U.V products first (default: when lowering)

    The plan is in the file's metadata (`sg.analyze(path).plan`, `sg.onnx.read_plan(path)`);
    nothing is written unless the whole export succeeds.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=2)
    >>> wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, mask="balanced_block:32")
    >>> path = sg.export_onnx(wide, spec.example_inputs, "export.onnx", lower="ort-block")
    >>> sg.analyze(path).plan["transform"]
    'sparse_wide'
    >>> sorted({c["block"] for c in sg.onnx.read_lowering(path).values()})
    [32]
    """
    from . import api as onnx_api

    if lower not in LOWER_MODES:
        raise SparsegraphError(f"unknown lower mode {lower!r}; choose from {', '.join(LOWER_MODES)}")
    onnx_model = to_onnx(model, example_inputs, optimize=optimize, dynamic_shapes=dynamic_shapes, opset=opset)
    fold = lower != "dense" if fold is None else fold
    if lower != "dense":
        onnx_model = onnx_api.lower(onnx_model, lower, fold=fold, block=block, max_density=max_density,
                                    layout=layout, check=False)
    elif fold:
        onnx_model = onnx_api.fold(onnx_model, check=False)
    return onnx_api.save(onnx_model, path, sparse_initializers=sparse_initializers, check=check)


__all__ = ["export_onnx", "to_onnx", "multiply_masks", "LOWER_MODES"]
