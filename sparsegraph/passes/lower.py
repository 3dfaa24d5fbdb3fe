"""Lowering: masked products -> `sparsegraph::sparse_linear` where the cost model says it pays (DESIGN.md 6).

The pass finds `linear/addmm/mm/matmul/conv2d(x, weight * mask, ...)` (`products.py`), reads the
mask's values, and per layer picks dense, CSR (block 1), BSR(b) (b in `BLOCKS`, used only where the
mask is exactly b x b-block structured, so training the values keeps the pattern) or Triton:

  target="auto"    CPU tensors: the cost model (`backends/cost_model.py`, measured on this machine)
                   over dense, CSR and BSR(b); CUDA tensors: Triton BSR for the largest exact block
                   >= 16 if at most `cost_model.GPU_MAX_STORED_BLOCKS` (half) of the blocks are stored
  target="cpu"     the CPU kernels, chosen by the cost model
  target="triton"  Triton kernels for every layer with an exact block structure b >= 16 (on CPU
                   tensors this needs TRITON_INTERPRET=1, for testing)
  target="dense"   every masked weight becomes one dense weight W * mask (no sparse kernels)

Each choice is recorded in `plan.lowering["layers"][weight]`: format, block, balanced, density,
rows (M) it was judged at, predicted times and speedup, and the reason. A lowered linear layer
stores its weight as a trainable (nnzb, b, b) `<weight>_values` parameter beside int32 index
buffers; the dense weight and its mask are dropped. Convolutions lower through an im2col view
(`sparsegraph::sparse_conv2d`: a direct kernel on CPU). Everything else in the graph is untouched.

The module form (your own model, as `sg.sparsify` returns it) is captured to decide, with the same
candidates and choices, and a copy of it is lowered module by module (`rewrite_layer`): the
lowered layers are `sparsegraph.nn.lowered` modules calling the same ops, with the same
`<weight>_values` and index names, and the model keeps its class.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=2)
    >>> wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:32",
    ...                    output="graph")
    >>> low = sg.lower(wide)
    >>> low.plan.lowering["layers"]["h.0.mlp.c_fc.weight"]["format"]
    'bsr'
    >>> x = spec.example_inputs[0]
    >>> torch.allclose(low(x), wide(x), atol=1e-4)
    True
"""
from __future__ import annotations

import copy
import functools
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..backends import cost_model as cm
from ..nn import (LoweredConv2d, LoweredLinear, Masked, SparseDoped, SparseFactorized, SparseLayout, SparseParallel,
                  bake_masks, is_lowered, lower_weight_)
from ..nn.lowered import INDEX
from ..nn.masked import standard_masked
from ..backends.sparse_linear import block_mask_of, layout_tensors
from ..capture import _get_attr, _has_attr, _pop_attr, _set_attr
from ..graph import SparsegraphError
from ..plan import attach_plan, plan_of
from .products import Product, WeightExpr, as_product, captured_copy, matrix_view, module_form, weight_expr

TARGETS = ("auto", "cpu", "triton", "dense")
BLOCKS = (8, 16, 32, 64)  # BSR block sizes considered (besides CSR)
TRITON_BLOCKS = (64, 32, 16)  # largest first
DEFAULT_ROWS = 64  # rows assumed when no example input says how many a layer sees


class LoweringError(SparsegraphError):
    pass


# ---------------------------------------------------------------------------------------------
# where tensors come from: module attributes (sg.lower) or graph inputs (torch.compile)
# ---------------------------------------------------------------------------------------------
class Resolver:
    """Values and names of the tensors a graph reads (get_attr nodes of a module)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def value(self, node: fx.Node) -> torch.Tensor | None:
        if node.op != "get_attr":
            return None
        try:
            v = _get_attr(self.gm, node.target)
        except AttributeError:
            return None
        return v if isinstance(v, torch.Tensor) else None

    def name(self, node: fx.Node) -> str:
        return node.target

    def is_tensor(self, node: fx.Node) -> bool:
        return self.value(node) is not None

    def is_param(self, node: fx.Node) -> bool:
        return isinstance(self.value(node), nn.Parameter)


class InputResolver(Resolver):
    """Placeholders of a graph whose parameters and buffers are inputs (Dynamo / AOT graphs)."""

    def __init__(self, gm: fx.GraphModule, state: dict[int, tuple[str, bool]], inputs: list):
        super().__init__(gm)
        self.by_node = {}
        for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            if i in state and isinstance(inputs[i], torch.Tensor):
                self.by_node[node] = (state[i][0], inputs[i], state[i][1])

    def value(self, node: fx.Node) -> torch.Tensor | None:
        hit = self.by_node.get(node)
        return hit[1] if hit else None

    def name(self, node: fx.Node) -> str:
        return self.by_node[node][0]

    def is_param(self, node: fx.Node) -> bool:
        hit = self.by_node.get(node)
        return bool(hit and hit[2])


# ---------------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------------
@dataclass
class LayerChoice:
    weight: str
    op: str
    kind: str  # linear | conv
    shape: list  # [n, k]: the weight's matrix view
    rows: int  # M (linear) or N * L (conv) the choice was judged at
    density: float
    format: str  # dense | csr | bsr | triton
    block: int
    balanced: bool
    reason: str
    mask: str = ""  # the mask tensor the choice was made from
    predicted_dense_ms: float | None = None
    predicted_sparse_ms: float | None = None
    predicted_speedup: float | None = None


def _exact(mask: torch.Tensor, bm: torch.Tensor, b: int) -> bool:
    """Is the (n, k) mask exactly the union of the stored b x b blocks (cropped at ragged edges)?"""
    n, k = mask.shape
    return bool(torch.equal(bm.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k], mask))


def _balanced(bm: torch.Tensor) -> bool:
    per = bm.sum(1)
    return per.numel() > 0 and bool((per == per[0]).all())


def decide(weight: str, op: str, kind: str, mask: torch.Tensor, rows: tuple[int, int], target: str,
           device: torch.device, model: cm.CostModel | None = None, shape_known: bool = True,
           dense: str = "mkl") -> LayerChoice:
    """Pick the format of one layer. `mask` is the (n, k) matrix view; rows = (M, 1) or (N, L).
    `dense`: the dense linear layer a sparse format must beat, "mkl" (F.linear, eager PyTorch) or
    "onednn" (pre-packed, as a frozen graph with a dynamic batch runs it; `cost_model`)."""
    if dense not in ("mkl", "onednn"):
        raise ValueError(f"dense={dense!r}: choose 'mkl' or 'onednn'")
    model = model or cm.load()
    n, k = mask.shape
    M, L = rows
    m = mask != 0
    density = float(m.float().mean())
    base = dict(weight=weight, op=op, kind=kind, shape=[n, k], rows=M * L, density=round(density, 6))
    note = "" if shape_known else f" (no example input: judged at {M * L} rows)"
    if target == "dense":
        return LayerChoice(**base, format="dense", block=0, balanced=False, reason="target=dense: W * mask baked")
    if density == 1.0:
        return LayerChoice(**base, format="dense", block=0, balanced=False, reason="mask is all ones")
    exact = {}
    for b in BLOCKS:
        if b <= max(n, k):
            bm = block_mask_of(m, b)
            if _exact(m, bm, b):
                exact[b] = bm
    if target == "triton" or (target == "auto" and device.type == "cuda"):
        for b in TRITON_BLOCKS:
            if b in exact:
                stored = float(exact[b].float().mean())
                if target == "triton" or stored <= cm.GPU_MAX_STORED_BLOCKS:
                    return LayerChoice(**base, format="triton", block=b, balanced=_balanced(exact[b]),
                                       reason=f"{'target=triton' if target == 'triton' else 'CUDA'}: BSR b={b}, "
                                              f"{stored:.3f} of the blocks stored")
        return LayerChoice(**base, format="dense", block=0, balanced=False,
                           reason="no exact block structure of 16 or more (Triton kernels need one)"
                           if not any(b in exact for b in TRITON_BLOCKS) else "too many blocks stored for Triton")
    if device.type != "cpu":
        raise LoweringError(f"{weight}: target={target} runs on CPU tensors, the weight is on {device}")
    if kind == "conv":
        t_dense = model.conv_dense(M, L, n, k)
        cost = lambda nnzb, b: model.conv_sparse(M, L, n, k, nnzb, b)  # noqa: E731
    else:
        t_dense = model.linear_dense(M, n, k, onednn=dense == "onednn")  # (MKL's rate if oneDNN's was not measured)
        cost = lambda nnzb, b: model.linear_sparse(M, n, k, nnzb, b)  # noqa: E731
    options = [("csr", 1, int(m.sum()), _balanced(m))]
    options += [("bsr", b, int(bm.sum()), _balanced(bm)) for b, bm in exact.items()]
    best = min(options, key=lambda o: (cost(o[2], o[1]), -o[1]))  # ties: the larger block
    fmt, b, nnzb, bal = best
    t_sparse = cost(nnzb, b)
    pred = dict(predicted_dense_ms=round(t_dense * 1e3, 4), predicted_sparse_ms=round(t_sparse * 1e3, 4),
                predicted_speedup=round(t_dense / t_sparse, 3))
    label = f"{fmt}" + (f" b={b}" if fmt == "bsr" else "") + (" balanced" if bal and fmt == "bsr" else "")
    baseline = "dense (oneDNN, pre-packed)" if dense == "onednn" and kind != "conv" and model.flops_dense_packed \
        else "dense"
    if t_sparse < cm.MARGIN * t_dense:
        return LayerChoice(**base, format=fmt, block=b, balanced=bal, **pred,
                           reason=f"{label}: predicted {t_dense / t_sparse:.2f}x faster than {baseline}{note}")
    return LayerChoice(**base, format="dense", block=0, balanced=False, **pred,
                       reason=f"dense: best sparse option ({label}) predicted {t_dense / t_sparse:.2f}x of {baseline} "
                              f"speed, below the {1 / cm.MARGIN:.2f}x margin{note}")


# ---------------------------------------------------------------------------------------------
# finding candidates
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    product: Product
    weight: WeightExpr
    name: str  # weight name
    W: torch.Tensor
    mask: torch.Tensor
    matrix_mask: torch.Tensor  # (n, k)
    kind: str
    rows: tuple[int, int]
    shape_known: bool
    rows_symbolic: bool  # the row count is a symbol (a dynamic batch)
    skip: str | None = None  # reason this masked product cannot lower


def _meta_shape(node: fx.Node):
    """The node's output shape: from shape propagation on the example inputs, else its fake value."""
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    val = node.meta.get("val", node.meta.get("example_value"))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _hint(s) -> int:
    if isinstance(s, int):
        return s
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint
        return int(optimization_hint(s))
    except Exception:  # noqa: BLE001
        return DEFAULT_ROWS


def candidates(gm: fx.GraphModule, res: Resolver) -> list[Candidate]:
    out = []
    for node in gm.graph.nodes:
        p = as_product(node)
        if p is None:
            continue
        we = weight_expr(p.w, res.is_tensor, res.is_param)
        if we is None or we.mask is None:
            continue
        W, mask = res.value(we.param), res.value(we.mask)
        name = res.name(we.param)
        if mask.shape != W.shape:
            continue  # a broadcast multiplier, not a mask
        if mask.is_meta or getattr(mask, "fake_mode", None) is not None:
            raise LoweringError(f"{name}: its mask {res.name(we.mask)} has no values at lowering time "
                                "(a fake or meta tensor); masks must be real tensors")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise LoweringError(f"{name}: {res.name(we.mask)} holds values other than 0 and 1, so weight * mask "
                                "is not a sparsity pattern")
        skip = None
        if p.is_conv:
            if W.dim() != 4:
                skip = f"{W.dim() - 2}-D convolution (only 2-D convolutions lower)"
            elif p.conv["groups"] != 1:
                skip = f"grouped convolution (groups={p.conv['groups']})"
            elif isinstance(p.conv["padding"], str):
                skip = f"padding={p.conv['padding']!r}"
        elif W.dim() != 2:
            skip = f"{W.dim()}-D weight"
        kind = "conv" if p.is_conv else "linear"
        xs, ys = _meta_shape(p.x), _meta_shape(node)
        known = xs is not None and ys is not None
        if kind == "conv":
            rows = (_hint(ys[0]), _hint(ys[2]) * _hint(ys[3])) if known and len(ys) == 4 else (1, DEFAULT_ROWS)
        else:
            k = W.shape[1] if p.kind.out_axis == 0 else W.shape[0]
            rows = (max(1, _numel(xs) // k), 1) if known else (DEFAULT_ROWS, 1)
        mm = matrix_view(mask, p.kind) if skip is None else mask.reshape(mask.shape[0], -1)
        symbolic = known and not all(isinstance(s, int) for s in xs)
        out.append(Candidate(p, we, name, W, mask, mm, kind, rows, known, symbolic, skip))
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= _hint(s)
    return n


# ---------------------------------------------------------------------------------------------
# rewriting
# ---------------------------------------------------------------------------------------------
def pack_weight(w: torch.Tensor, row: torch.Tensor, col: torch.Tensor, block: int, transpose: bool) -> torch.Tensor:
    """(nnzb, b, b) blocks of a weight's matrix view (W, W^T if `transpose`, or W.reshape(out, -1)).

    Differentiable (an index into a padded view), so the weight's gradient is the values'
    gradient scattered back: zero outside the stored blocks.
    """
    m = w.t() if transpose else w.reshape(w.shape[0], -1)
    n, k = m.shape
    R, C = -(-n // block), -(-k // block)
    if R * block != n or C * block != k:
        m = torch.nn.functional.pad(m, (0, C * block - k, 0, R * block - n))
    return m.reshape(R, block, C, block).transpose(1, 2)[row, col]


@dataclass
class _Sparse:
    """Index tensors of one lowered weight."""
    crow: torch.Tensor
    col: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    perm_t: torch.Tensor
    row: torch.Tensor  # (nnzb,) int64 block-row of each block (for packing)


def _layout(matrix_mask: torch.Tensor, block: int, device) -> _Sparse:
    bm = block_mask_of(matrix_mask, block)
    crow, col, crow_t, col_t, perm_t = (t.to(device) for t in layout_tensors(bm))
    row = torch.repeat_interleave(torch.arange(bm.shape[0]), bm.sum(1)).to(device)
    return _Sparse(crow, col, crow_t, col_t, perm_t, row)


def _emit(graph: fx.Graph, c: Candidate, choice: LayerChoice, values: fx.Node, idx: list[fx.Node], impl: str
          ) -> fx.Node:
    p = c.product
    n, k = choice.shape
    if c.kind == "conv":
        kh, kw = int(c.W.shape[2]), int(c.W.shape[3])
        return graph.call_function(torch.ops.sparsegraph.sparse_conv2d.default,
                                   (p.x, values, *idx, p.bias, n, [kh, kw], list(p.conv["stride"]),
                                    list(p.conv["padding"]), list(p.conv["dilation"]), choice.block, impl))
    return graph.call_function(torch.ops.sparsegraph.sparse_linear.default, (p.x, values, *idx, p.bias, n, k, choice.block, -1, impl))


def _impl(target: str, fmt: str) -> str:
    return "triton" if fmt == "triton" and target == "triton" else ("cpu" if target == "cpu" else "auto")


def rewrite_module(gm: fx.GraphModule, c: Candidate, choice: LayerChoice, target: str, tag: str = "") -> None:
    """sg.lower: the weight becomes a `<weight>_values` parameter and index buffers."""
    graph = gm.graph
    p = c.product
    if choice.format == "dense":
        if target == "dense":
            name = _free(gm, c.name + "_masked")
            _set_attr(gm, name, nn.Parameter((c.W * c.mask).detach().clone(), requires_grad=c.W.requires_grad),
                      is_param=True)
            with graph.inserting_before(p.node):
                p.node.replace_input_with(p.w, graph.get_attr(name))
        return
    base = c.name
    values_name = base + "_values"
    if not _has_attr(gm, values_name):
        values, index = packed(c, choice, c.W, c.mask)
        _set_attr(gm, values_name, values, is_param=True)
        for key, t in index.items():
            _set_attr(gm, f"{base}_{key}", t)
    with graph.inserting_before(p.node):
        vnode = graph.get_attr(values_name)
        idx = [graph.get_attr(f"{base}_{key}") for key in ("crow", "col", "crow_t", "col_t", "perm_t")]
        out = _emit(graph, c, choice, vnode, idx, _impl(target, choice.format))
    p.node.replace_all_uses_with(out)
    graph.erase_node(p.node)


def packed(c: Candidate, choice: LayerChoice, W: torch.Tensor, mask: torch.Tensor
           ) -> tuple[nn.Parameter, dict[str, torch.Tensor]]:
    """The lowered form of `W * mask` (candidate `c`, as `choice` says): its blocks (nnzb, b, b), a
    parameter trainable like W, and the op's index tensors by name (crow, col, crow_t, col_t, perm_t)."""
    lay = _layout(c.matrix_mask != 0, choice.block, W.device)
    values = pack_weight((W * mask).detach(), lay.row, lay.col.long(), choice.block,
                         transpose=c.product.kind.out_axis == 1).contiguous()
    return nn.Parameter(values, requires_grad=W.requires_grad), {key: getattr(lay, key) for key in INDEX}


def rewrite_layer(root: nn.Module, gm: fx.GraphModule, c: Candidate, choice: LayerChoice, target: str,
                  tag: str = "") -> None:
    """sg.lower on the module form: the module holding the weight gets its lowered form
    (`sparsegraph.nn.lowered`): a standard masked layer, or a part of a Parallel / Factorized /
    Doped layer, becomes a LoweredLinear / LoweredConv2d; a Parallel or Doped layer's own weight is
    lowered in place. A weight another module's own forward reads (e.g. nn.MultiheadAttention's)
    stays masked, and the choice says so."""
    if choice.format == "dense":
        return  # target="dense": every mask is multiplied in at the end (bake_masks)
    owner, _, leaf = c.name.rpartition(".")
    holder = root.get_submodule(owner)
    if is_lowered(holder):
        return  # an earlier product of the same weight (a layer called twice) lowered it
    parent = root.get_submodule(owner.rpartition(".")[0]) if owner else None
    own = isinstance(holder, (SparseParallel, SparseDoped))
    part = isinstance(parent, (SparseParallel, SparseFactorized, SparseDoped)) and \
        any(m is holder for m in parent.children())
    if leaf != "weight" or not (own or part or standard_masked(holder)):
        reader = owner
        while reader and not isinstance(root.get_submodule(reader), Masked):
            reader = reader.rpartition(".")[0]
        choice.format, choice.block, choice.balanced = "dense", 0, False
        choice.reason = (f"kept masked: {type(root.get_submodule(reader)).__name__}'s own forward reads it, "
                         "so no layer can be swapped for a lowered one")
        return
    values, index = packed(c, choice, holder.weight, holder.weight_mask)
    n, k = choice.shape
    impl = _impl(target, choice.format)
    if c.kind == "conv":
        conv = c.product.conv
        layout = SparseLayout(n, k, choice.block, impl, tuple(holder.weight.shape[2:]), tuple(conv["stride"]),
                              tuple(conv["padding"]), tuple(conv["dilation"]))
    else:
        layout = SparseLayout(n, k, choice.block, impl)
    if own:
        lower_weight_(holder, values, index, layout)
    else:
        cls = LoweredConv2d if c.kind == "conv" else LoweredLinear
        root.set_submodule(owner, cls(values, index, layout, None if part else holder.bias))


def rewrite_inputs(gm: fx.GraphModule, c: Candidate, choice: LayerChoice, target: str, tag: str) -> None:
    """torch.compile: W and mask stay graph inputs; values = pack(W * mask) in the graph (trainable)."""
    if choice.format == "dense":
        return
    graph = gm.graph
    p = c.product
    lay = _layout(c.matrix_mask != 0, choice.block, c.W.device)
    consts = {}
    for key in ("crow", "col", "crow_t", "col_t", "perm_t", "row"):
        t = getattr(lay, key)
        name = f"_sg_{tag}_{key}"
        gm.register_buffer(name, t if key != "row" else t.long())
        consts[key] = name
    gm.register_buffer(f"_sg_{tag}_col64", lay.col.long())
    with graph.inserting_before(p.node):
        row, col64 = graph.get_attr(consts["row"]), graph.get_attr(f"_sg_{tag}_col64")
        values = graph.call_function(pack_weight, (p.w, row, col64, choice.block, p.kind.out_axis == 1))
        idx = [graph.get_attr(consts[key]) for key in ("crow", "col", "crow_t", "col_t", "perm_t")]
        out = _emit(graph, c, choice, values, idx, _impl(target, choice.format))
    p.node.replace_all_uses_with(out)
    graph.erase_node(p.node)


def _free(gm: nn.Module, want: str) -> str:
    name, i = want, 0
    while _has_attr(gm, name):
        i += 1
        name = f"{want}_{i}"
    return name


def lower_graph(gm: fx.GraphModule, res: Resolver, target: str, rewrite: Callable, model: cm.CostModel | None = None,
                recorded: dict[str, dict] | None = None, frozen: bool = False) -> list[LayerChoice]:
    """Decide and rewrite every masked product of `gm` in place; returns the choices. A weight in
    `recorded` (a plan's `lowering["layers"]`) takes its recorded choice instead of a new decision;
    `frozen`: the graph will be compiled frozen, where a dense linear layer with a dynamic batch
    runs through oneDNN (`decide(dense="onednn")`)."""
    if target not in TARGETS:
        raise LoweringError(f"unknown lowering target {target!r}; choose from {', '.join(TARGETS)}")
    choices = []
    for i, c in enumerate(candidates(gm, res)):
        if c.skip is not None:
            choices.append(LayerChoice(c.name, c.product.node.name, c.kind, list(c.matrix_mask.shape),
                                       c.rows[0] * c.rows[1], round(float((c.mask != 0).float().mean()), 6),
                                       "dense", 0, False, f"kept dense: {c.skip}", res.name(c.weight.mask)))
            continue
        if recorded and c.name in recorded:
            choice = LayerChoice(**recorded[c.name])
        else:
            choice = decide(c.name, c.product.node.name, c.kind, c.matrix_mask, c.rows, target, c.W.device, model,
                            c.shape_known, "onednn" if frozen and c.rows_symbolic else "mkl")
        choice.mask = res.name(c.weight.mask)
        choices.append(choice)
        c.product = as_product(c.product.node)  # its input may be an earlier rewrite's output now (U then V)
        rewrite(gm, c, choice, target, str(i))  # tag: a unique suffix for constants it registers
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return choices


def summary(choices: list[LayerChoice], target: str, model: cm.CostModel) -> dict:
    return {"target": target, "cost_model": model.source,
            "formats": {f: sum(c.format == f for c in choices) for f in sorted({c.format for c in choices})},
            "layers": {c.weight: asdict(c) for c in choices}}


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def lower(model: nn.Module, target: str = "auto", example_inputs: Any = None, *,
          recorded: dict[str, dict] | None = None) -> nn.Module:
    """Lower every masked product of `model` to the format its cost model prefers (see module doc).

    The module form of `sg.sparsify` (your own class, with its plan) gives a copy of itself, same
    class, whose lowered layers are `sparsegraph.nn.lowered` modules calling the op (`rewrite_layer`;
    target="dense" multiplies every mask into its weight instead); the graph form, or any other
    module (captured with `example_inputs`), gives a new `fx.GraphModule`. The input is not
    modified; the result's plan records the choices in `plan.lowering`. `example_inputs` (default:
    the model's own) tell how many rows each layer sees; the lowered model runs at any batch size.
    `recorded` (a plan's `lowering["layers"]`) repeats earlier choices instead of deciding anew
    (`sg.load` of a lowered model).
    """
    if target not in TARGETS:
        raise LoweringError(f"unknown lowering target {target!r}; choose from {', '.join(TARGETS)}")
    plan = plan_of(model)
    gm, inputs = captured_copy(model, example_inputs, "lower", LoweringError)
    costs = cm.load()
    if module_form(model):  # decided on the captured graph, applied to a copy of the model's own modules
        out = copy.deepcopy(model)
        choices = lower_graph(gm, Resolver(gm), target, functools.partial(rewrite_layer, out), costs, recorded)
        if target == "dense":
            bake_masks(out)
    else:
        out = gm
        choices = lower_graph(gm, Resolver(gm), target, rewrite_module, costs, recorded)
        _prune(gm)
        gm.example_inputs = getattr(model, "example_inputs", inputs)
    plan = copy.deepcopy(plan) if plan is not None else None
    if plan is not None:
        plan.lowering.update(summary(choices, target, costs))
        attach_plan(out, plan)
    else:
        out.lowering = summary(choices, target, costs)
    return out


def _prune(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used and not any(name.startswith(u + ".") for u in used):
            _pop_attr(gm, name)


__all__ = ["lower", "lower_graph", "decide", "LayerChoice", "LoweringError", "TARGETS", "BLOCKS",
           "Resolver", "InputResolver", "pack_weight", "packed", "rewrite_module", "rewrite_layer", "rewrite_inputs",
           "summary"]
