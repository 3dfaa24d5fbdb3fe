"""ONNX Runtime lowering passes for sparse MatMul/Gemm weights, and with ort-native Conv weights (DESIGN.md
section 6).

ONNX Runtime densifies sparse initializers when it loads a model, so a sparse weight costs a
dense product unless the graph itself skips the zeros. Three lowerings:

ort-block (`BlockSparseMatMulPass`, standard ops only: any execution provider). For y = x W with
W (K, N) cut into b x b blocks and every output block-column n reading r nonzero input blocks
idx[n, :] (block-columns with fewer are padded with zero blocks), x2 = x.reshape(M, K), and
Wp[n] = [W[idx[n, j], n]]_j (Nb, r*b, b) the nonzero blocks packed, three formulations:

  rows (r > 1)                                                     shapes
    g  = Gather(x2.reshape(M, Kb, b), idx, axis=1)                 (M, Nb, r, b)   the needed input blocks
    g3 = g.reshape(M, Nb, r*b).transpose(1, 0, 2)                  (Nb, M, r*b)    (ORT: FusedMatMul transBatchA)
    yb = MatMul(g3, Wp)                                            (Nb, M, b)
    y  = yb.transpose(1, 0, 2).reshape(*lead, N)                   (..., N)
  blocks (r = 1: one input block per output block)
    xt = x2.reshape(M, Kb, b).transpose(1, 0, 2)                   (Kb, M, b)      each input block contiguous
    g  = Gather(xt, idx[:, 0], axis=0)                             (Nb, M, b)
    yb = MatMul(g, Wp)                                             (Nb, M, b)
    y  = yb.transpose(1, 0, 2).reshape(*lead, N)
    (forced with r > 1: Gather(xt, idx) (Nb, r, M, b), a MatMul per block, ReduceSum over r)
  column (a single static row, M = 1: the transposes are free reshapes)
    g  = Gather(x2^T.reshape(Kb, b*M), idx, axis=0)                (Nb, r, b*M)
    yb = MatMul(Wp^T, g.reshape(Nb, r*b, M))                       (Nb, b, M)
    y  = yb.reshape(N, M)^T.reshape(*lead, N)

so the batched MatMul does r*b/K of the dense FLOPs (the padded block density). Balanced block
masks (the same r in every block-row of the PyTorch weight = block-column of W) pad nothing. When
b does not divide K or N, W gets zero rows/columns, x a Pad and y a Slice. `layout="auto"`
(`auto_layout`) picks column for one static row, blocks for r = 1, rows otherwise: profiled on
ONNX Runtime 1.32 CPU (bench/onnx_runtime.py), the strided FusedMatMul that the rows layout
becomes runs its K = b products (r = 1) at half the speed of blocks' contiguous MatMul, while
for r > 1 the per-block products and the ReduceSum of the blocks layout cost more than rows saves;
column's two 2-D Transposes are slow in ONNX Runtime from a few dozen rows on.

Between layers: rows and blocks both compute yb (Nb, M, b) and transpose it back; blocks reads x as
(Kb, M, b). When a layer's input is another lowered layer's output through a bias, GELU, a scale
or any such per-feature elementwise chain (`feature_chain`: each value read once, static leading
sizes, b dividing the shared width), the chain is rebuilt on yb and the next layer's Gather reads
it (`hand_over_blocks`): a transformer MLP's c_fc -> GELU -> c_proj runs without the two
Transposes of the widest activation. With layout="auto" such a consumer uses blocks whatever
its r (recorded as "input_from" in the lowering metadata).

ort-sparse (`SparseToDenseMatMulPass`): com.microsoft SparseToDenseMatMul(A, B) = A B, where A
must be a *sparse tensor run-time input* (a 2-D COO or CSR `sparse_tensor(float)`; ONNX Runtime
rejects sparse initializers and Constant sparse_value there, because it densifies them) and B
is dense and 2-D; the CPU kernel is single-threaded Eigen (CSR) or a scalar loop (COO), with
no other execution provider. So y^T = SparseToDenseMatMul(W^T, x2, transB=1), and W^T is a
sparse graph input whose default value is stored in the file (`sg.onnx.Session` feeds it).

ort-native (`NativeSparseMatMulPass`): the custom op sparsegraph.SparseLinear(x, values, crow, col[, bias])
runs sparsegraph's native CPU kernels inside ONNX Runtime (`native.py`, the library built against
ONNX Runtime's C API header). W (K, N) is stored as the kernels' block-sparse B: output block-rows
over N, each nonzero b x b block as it sits in W, so y = x W reads only the nonzero blocks, any M.
`NativeSparseConvPass` turns a 2-D Conv with a block-sparse W (out, C, kh, kw) into
sparsegraph.SparseConv(x, values, crow, col[, bias]): W blocked as the (out, C kh kw) matrix, the kernels'
direct convolution (or, for a 1x1 kernel without padding, their cols kernel on the positions it reads).

All three record their per-weight choices under metadata_props["sparsegraph.lowering"].
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..masks import parse_mask
from ..plan import plan_of
from .rewrite import (LOWERING_KEY, MS_DOMAIN, Builder, Namer, add_initializer, cleanup, const_array,
                           gemm_operands, infer_shapes, is_constant, opset_of, redirect, weight_source,
                           weight_value)

BLOCK_SIZES = (64, 32, 16, 8)  # tried largest first when neither the caller nor the plan names one
LAYOUTS = ("rows", "blocks", "column")  # ort-block's three formulations (module docstring)
DEFAULT_MAX_DENSITY = 0.5  # lower a layer only if its padded block density (ort-block) or density is at most this


def _candidates(model: ir.Model):
    """(node, x, W (K, N) float, weight name, alpha, C or None) for every MatMul/Gemm x @ W with a
    constant 2-D W (possibly through Transpose views)."""
    for node in list(model.graph):
        if node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
            continue
        operands = gemm_operands(node)
        if operands is None or not np.issubdtype(operands[0].dtype, np.floating):
            continue
        W, alpha, C = operands
        x = node.inputs[0]
        if x.shape is None or len(x.shape) < 1:
            continue
        name = weight_source(node.inputs[1])[0].name
        yield node, x, W, name, alpha, C


class _Shapes:
    """x (..., K) -> (M, K) and (M, N) -> (..., N), with run-time leading sizes where they are symbolic."""

    def __init__(self, b: Builder, x: ir.Value, K: int, N: int, opset: int):
        self.b, self.x, self.K, self.N, self.opset = b, x, K, N, opset
        self.lead = list(x.shape)[:-1]

    @property
    def rows(self) -> int | None:
        """M, when the leading sizes are static."""
        return int(np.prod(self.lead)) if all(isinstance(d, int) for d in self.lead) else None

    def flat(self) -> ir.Value:
        if len(self.x.shape) == 2:
            return self.x
        return self.b.op("Reshape", [self.x, self.b.const("shape_in", [-1, self.K], np.int64)])

    def transpose(self, v: ir.Value, shape_after: list[int]) -> ir.Value:
        """A 2-D transpose; a Reshape (no copy) when one side is a single row (M = 1)."""
        if self.rows == 1:
            return self.b.op("Reshape", [v, self.b.const("as_column", shape_after, np.int64)])
        return self.b.op("Transpose", [v], {"perm": [1, 0]})

    def unflat(self, y2: ir.Value) -> ir.Value:
        if len(self.x.shape) == 2:
            return y2
        b = self.b
        if all(isinstance(d, int) for d in self.lead):
            return b.op("Reshape", [y2, b.const("shape_out", [*self.lead, self.N], np.int64)])
        rank = len(self.x.shape)
        if self.opset >= 15:
            lead = b.op("Shape", [self.x], {"start": 0, "end": rank - 1})
        else:
            lead = b.op("Slice", [b.op("Shape", [self.x]), b.const("zero", [0], np.int64),
                                  b.const("end", [rank - 1], np.int64)])
        shape = b.op("Concat", [lead, b.const("n", [self.N], np.int64)], {"axis": 0})
        return b.op("Reshape", [y2, shape])


def _add_bias(b: Builder, y: ir.Value, C: np.ndarray | None, dtype) -> ir.Value:
    if C is not None:
        y = b.op("Add", [y, b.const("bias", C.astype(dtype))])
    return y


def _record(model: ir.Model, choices: dict) -> None:
    old = json.loads(model.metadata_props.get(LOWERING_KEY, "{}"))
    old.update(choices)
    model.metadata_props[LOWERING_KEY] = json.dumps(old, sort_keys=True)


def _lowered(model: ir.Model, choices: dict, domain: str | None = None) -> ir.passes.PassResult:
    """A lowering pass's result: if it lowered anything, its op domain imported, the replaced nodes
    removed and its per-weight choices recorded."""
    if choices:
        if domain:
            model.opset_imports.setdefault(domain, 1)
        cleanup(model)
        _record(model, choices)
    return ir.passes.PassResult(model, bool(choices))


def _plan_block(model: ir.Model) -> int | None:
    plan = plan_of(model)
    if plan is None:
        return None
    kind = parse_mask(plan.mask)
    return kind.block if kind.name in ("block", "balanced_block") else None


def _block_sizes(block: int | None, plan_block: int | None, K: int, N: int) -> list[int]:
    """The block sizes to try for a (K, N) weight: the caller's, else `BLOCK_SIZES` and the plan's."""
    sizes = [block] if block else sorted({*BLOCK_SIZES, *([plan_block] if plan_block else [])}, reverse=True)
    return [b for b in sizes if b <= max(K, N)]


def _pick_block(densities: dict[int, float], plan_block: int | None, max_density: float) -> int | None:
    """Among block sizes with their densities (the fraction of W's FLOPs a lowering computes), the plan's
    mask block if it is within 10% of the best, else the largest such; None if none, or if the pick
    computes more than `max_density`."""
    if not densities:
        return None
    best = min(densities.values())
    good = [b for b, d in densities.items() if d <= best * 1.1]
    b = plan_block if plan_block in good else max(good)
    return b if densities[b] <= max_density else None


def pad_to_blocks(W: np.ndarray, b: int) -> np.ndarray:
    """W (K, N) with zero rows and columns appended up to multiples of b."""
    K, N = W.shape
    Kp, Np = -(-K // b) * b, -(-N // b) * b
    return W if (Kp, Np) == (K, N) else np.pad(W, ((0, Kp - K), (0, Np - N)))


def block_layout(W: np.ndarray, b: int) -> tuple[np.ndarray, int]:
    """(idx (Nb, r), r): the nonzero b x b blocks of every block-column of W (K, N; multiples of b),
    padded with blocks the column does not use (zero in W) up to the largest count r."""
    K, N = W.shape
    Kb, Nb = K // b, N // b
    occupied = np.abs(W).reshape(Kb, b, Nb, b).max(axis=(1, 3)) > 0  # (Kb, Nb)
    r = int(occupied.sum(axis=0).max()) if occupied.size else 0
    idx = np.zeros((Nb, max(r, 1)), np.int64)
    for n in range(Nb):
        rows = np.flatnonzero(occupied[:, n])
        idx[n, :len(rows)] = rows
        if len(rows) < r:  # pad with blocks this column does not use (they are zero in W)
            free = np.flatnonzero(~occupied[:, n])[:r - len(rows)]
            idx[n, len(rows):r] = free  # never short: r <= Kb
    return idx, r


def pack_blocks(W: np.ndarray, idx: np.ndarray, b: int) -> np.ndarray:
    """Wp (Nb, r*b, b): Wp[n, j*b:(j+1)*b, :] = W[idx[n, j] block, n block] (the rows layout's weight;
    the column layout uses its transpose, (Nb, b, r*b))."""
    K, N = W.shape
    Nb, r = idx.shape
    blocks = W.reshape(K // b, b, N // b, b).transpose(2, 0, 1, 3)  # (Nb, Kb, b_in, b_out)
    picked = blocks[np.arange(Nb)[:, None], idx]  # (Nb, r, b_in, b_out)
    return np.ascontiguousarray(picked.reshape(Nb, r * b, b))


def auto_layout(rows: int | None, r: int) -> str:
    """The layout `BlockSparseMatMulPass(layout="auto")` uses for M rows (None: unknown) and r blocks
    per output block-column: column for a single static row, blocks when every output block reads one
    input block, rows otherwise (see the module docstring for the measurements behind this).

    >>> auto_layout(1, 3), auto_layout(64, 1), auto_layout(None, 4)
    ('column', 'blocks', 'rows')
    """
    if rows == 1:
        return "column"
    return "blocks" if r == 1 else "rows"


def _slice_columns(bld: Builder, y: ir.Value, n: int, axis: int) -> ir.Value:
    """y[..., :n] along `axis` (ragged edges: the padded outputs dropped)."""
    return bld.op("Slice", [y, bld.const("start", [0], np.int64), bld.const("end", [n], np.int64),
                            bld.const("axis", [axis], np.int64)])


def _padded_rows(bld: Builder, shapes: "_Shapes", Kp: int) -> ir.Value:
    """x as (M, Kp): flattened, zero columns appended up to a multiple of the block."""
    x2 = shapes.flat()
    if Kp != shapes.K:
        x2 = bld.op("Pad", [x2, bld.const("pad_in", [0, 0, 0, Kp - shapes.K], np.int64)])
    return x2


def _input_blocks(bld: Builder, shapes: "_Shapes", K: int, b: int) -> ir.Value:
    """x (M, K) as (M, Kb, b), zero-padded to whole blocks."""
    Kp = -(-K // b) * b
    return bld.op("Reshape", [_padded_rows(bld, shapes, Kp), bld.const("blocks_in", [-1, Kp // b, b], np.int64)])


def _output_rows(bld: Builder, yb: ir.Value, N: int, Np: int) -> ir.Value:
    """The block-major output yb (Nb, M, b) as y (M, N), Np = Nb * b columns before the slice."""
    yb = bld.op("Transpose", [yb], {"perm": [1, 0, 2]})  # (M, Nb, b)
    y = bld.op("Reshape", [yb, bld.const("blocks_out", [-1, Np], np.int64)])  # (M, Np)
    return _slice_columns(bld, y, N, 1) if Np != N else y


def _rows_layout(bld: Builder, shapes: "_Shapes", index: ir.Value, wp: np.ndarray, K: int, N: int,
                 b: int) -> ir.Value:
    Nb, rb, _ = wp.shape
    g = bld.op("Gather", [_input_blocks(bld, shapes, K, b), index], {"axis": 1})  # (M, Nb, r, b)
    g = bld.op("Reshape", [g, bld.const("gathered", [-1, Nb, rb], np.int64)])  # (M, Nb, r*b)
    g = bld.op("Transpose", [g], {"perm": [1, 0, 2]})  # (Nb, M, r*b): ONNX Runtime fuses it into the MatMul
    return _output_rows(bld, bld.op("MatMul", [g, bld.const("blocks", wp)]), N, Nb * b)  # (Nb, M, b)


def _blocks_layout(bld: Builder, shapes: "_Shapes", index: ir.Value, wp: np.ndarray, K: int, N: int,
                   b: int) -> ir.Value:
    Nb, rb, _ = wp.shape
    r = rb // b
    xt = bld.op("Transpose", [_input_blocks(bld, shapes, K, b)], {"perm": [1, 0, 2]})  # (Kb, M, b), contiguous
    g = bld.op("Gather", [xt, index], {"axis": 0})  # (Nb, M, b) for r = 1, else (Nb, r, M, b)
    if r == 1:
        yb = bld.op("MatMul", [g, bld.const("blocks", wp)])  # (Nb, M, b)
    else:
        p = bld.op("MatMul", [g, bld.const("blocks", wp.reshape(Nb, r, b, b))])  # (Nb, r, M, b)
        yb = bld.op("ReduceSum", [p, bld.const("slots", [1], np.int64)], {"keepdims": 0})  # (Nb, M, b)
    return _output_rows(bld, yb, N, Nb * b)


def _column_layout(bld: Builder, shapes: "_Shapes", index: ir.Value, wp: np.ndarray, K: int, N: int,
                   b: int) -> ir.Value:
    Nb, rb, _ = wp.shape
    Kp, Np = -(-K // b) * b, Nb * b
    xt = shapes.transpose(shapes.flat(), [K, 1])  # (K, M)
    if Kp != K:
        xt = bld.op("Pad", [xt, bld.const("pad_in", [0, 0, Kp - K, 0], np.int64)])  # (Kp, M)
    xb = bld.op("Reshape", [xt, bld.const("blocks_in", [Kp // b, -1], np.int64)])  # (Kb, b*M)
    g = bld.op("Gather", [xb, index], {"axis": 0})  # (Nb, r, b*M)
    g = bld.op("Reshape", [g, bld.const("gathered", [Nb, rb, -1], np.int64)])  # (Nb, r*b, M)
    wt = np.ascontiguousarray(wp.transpose(0, 2, 1))  # (Nb, b, r*b)
    yb = bld.op("MatMul", [bld.const("blocks", wt), g])  # (Nb, b, M)
    yt = bld.op("Reshape", [yb, bld.const("blocks_out", [Np, -1], np.int64)])  # (Np, M)
    if Np != N:
        yt = _slice_columns(bld, yt, N, 0)  # (N, M)
    return shapes.transpose(yt, [1, N])  # (M, N)


ELEMENTWISE = {"Relu", "Gelu", "Tanh", "Sigmoid", "Erf", "Neg", "Abs", "Exp", "Softplus", "Softsign", "LeakyRelu",
               "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Mish", "Identity"}
_BINARY = {"Add", "Sub", "Mul", "Div"}


def feature_chain(x: ir.Value, K: int, stop) -> tuple[list[ir.Node], ir.Node] | None:
    """The nodes between a layer's input x and the node `stop(node)` accepts, walking back through
    Reshapes, unary elementwise ops and binary ops with a constant scalar or per-feature operand
    (a bias, GELU, a scale), every value read once and the feature axis (K) last throughout:
    (chain from x backwards, the stop node), or None."""
    chain, v = [], x
    while True:
        node = v.producer()
        if node is None or len(v.uses()) != 1 or v.is_graph_output() or node.domain not in ("", "ai.onnx"):
            return None
        if stop(node):
            return chain, node
        if v.shape is None or not v.shape.dims or v.shape[-1] != K:
            return None
        if node.op_type in _BINARY and len(node.inputs) == 2:
            consts = [const_array(i) if is_constant(i) else None for i in node.inputs]
            if sum(c is None for c in consts) != 1:
                return None
            c = next(c for c in consts if c is not None)
            if c.size != 1 and (c.shape[-1:] != (K,) or c.size != K):
                return None  # only scalars and per-feature vectors keep their meaning in block layout
            v = node.inputs[consts.index(None)]
        elif node.op_type == "Reshape" or node.op_type in ELEMENTWISE:
            v = node.inputs[0]
        else:
            return None
        chain.append(node)


def _is_block_transpose(node: ir.Node, blocks_out: dict) -> bool:
    perm = node.attributes.get("perm")
    return (node.op_type == "Transpose" and perm is not None and list(perm.value) == [1, 0, 2]
            and id(node.inputs[0]) in blocks_out)


def hand_over_blocks(graph: ir.Graph, namer: Namer, x: ir.Value, gather: ir.Node, blocks_out: dict, K: int,
                     b: int) -> str | None:
    """A blocks-layout layer whose input x comes from another lowered layer's block-major output
    yb (Nb, M, b) through a `feature_chain`: the chain is rebuilt on yb itself (per-feature
    constants as (Nb, 1, b)) and the Gather reads it, so neither the producer's output Transpose
    nor this layer's input Transpose runs. Returns the producer's weight name, or None (nothing
    changed)."""
    found = feature_chain(x, K, lambda n: _is_block_transpose(n, blocks_out))
    if found is None or blocks_out[id(found[1].inputs[0])][1:] != (K, b):
        return None
    chain, transpose = found
    cur = transpose.inputs[0]  # yb (Nb, M, b)
    new = []
    for node in reversed(chain):
        if node.op_type == "Reshape":
            continue
        inputs = [cur]
        if node.op_type in _BINARY:
            inputs = []
            for i in node.inputs:
                c = const_array(i) if is_constant(i) else None
                if c is None:
                    inputs.append(cur)
                else:
                    c = c.reshape(()) if c.size == 1 else c.reshape(K // b, 1, b)
                    inputs.append(add_initializer(graph, namer, f"{node.name or node.op_type}/blocks", c))
        out = ir.Value(name=namer(f"{node.name or node.op_type}/blocks_out"))
        new.append(ir.node(node.op_type, inputs, {a.name: a for a in node.attributes.values()}, domain=node.domain,
                           outputs=[out], name=namer(f"{node.name or node.op_type}/blocks"),
                           metadata_props=dict(node.metadata_props)))
        cur = out
    if new:
        graph.insert_before(gather, new)
    gather.replace_input_with(0, cur)
    return blocks_out[id(transpose.inputs[0])][0]


@dataclass
class _Layer:
    """One MatMul/Gemm the ort-block pass lowers, and how."""
    node: ir.Node
    x: ir.Value
    W: np.ndarray  # (K, N)
    name: str
    alpha: float
    C: np.ndarray | None
    b: int
    idx: np.ndarray
    r: int
    layout: str
    rows: int | None  # M when the leading sizes are static


class BlockSparseMatMulPass(ir.passes.InPlacePass):
    """ort-block: MatMul/Gemm with a block-sparse constant weight -> Gather + batched MatMul over the
    nonzero blocks (see the module docstring). `block`: the block size (default: the plan's block
    mask, else the largest of 64/32/16/8 whose padded density is within 10% of the best);
    layers whose padded block density exceeds `max_density` stay dense; `layout`: one of `LAYOUTS`,
    "auto" choosing per layer (`auto_layout`)."""

    def __init__(self, block: int | None = None, max_density: float | None = None, layout: str = "auto"):
        super().__init__()
        if block is not None and (not isinstance(block, int) or block < 1):
            raise ValueError(f"block must be a positive integer, got {block!r}")
        if layout != "auto" and layout not in LAYOUTS:
            raise ValueError(f"layout must be 'auto' or one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
        self.block, self.layout = block, layout
        self.max_density = DEFAULT_MAX_DENSITY if max_density is None else float(max_density)

    def choose(self, W: np.ndarray, plan_block: int | None) -> tuple[int, np.ndarray, int] | None:
        """(block size, idx, r) for W, or None to keep it dense (`_pick_block` on the padded density:
        the fraction of the dense FLOPs the batched MatMul does)."""
        K, N = W.shape
        options = {}
        for b in _block_sizes(self.block, plan_block, K, N):
            idx, r = block_layout(pad_to_blocks(W, b), b)
            if r > 0:
                options[b] = (r * b / K, idx, r)
        b = _pick_block({b: o[0] for b, o in options.items()}, plan_block, self.max_density)
        return None if b is None else (b, *options[b][1:])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        infer_shapes(model)
        plan_block = _plan_block(model)
        namer = Namer(model.graph)
        opset = opset_of(model)
        plans: list[_Layer] = []
        for node, x, W, name, alpha, C in _candidates(model):
            if np.count_nonzero(W) > self.max_density * W.size:  # cannot pass: skip the block analysis
                continue
            chosen = self.choose(W, plan_block)
            if chosen is None:
                continue
            b, idx, r = chosen
            rows = _Shapes(None, x, *W.shape, opset).rows
            layout = self.layout if self.layout != "auto" else auto_layout(rows, r)
            plans.append(_Layer(node, x, W, name, alpha, C, b, idx, r, layout, rows))
        if self.layout == "auto":  # a layer fed by another's block-major output reads it as it is
            block_major = {id(p.node): p for p in plans if p.layout != "column" and p.W.shape[1] % p.b == 0}
            for p in plans:
                if p.layout != "rows" or p.W.shape[0] % p.b or p.rows is None:
                    continue
                found = feature_chain(p.x, p.W.shape[0], lambda n: id(n) in block_major)
                if found is not None and block_major[id(found[1])].b == p.b:
                    p.layout = "blocks"
        choices = {}
        blocks_out: dict[int, tuple[str, int, int]] = {}  # id(yb) -> (weight, N, b)
        blocks_in: list[tuple[str, ir.Value, ir.Node, int, int]] = []  # (weight, x, Gather, K, b)
        for p in plans:
            node, x, W, name, alpha, C, b, idx, r, layout = (p.node, p.x, p.W, p.name, p.alpha, p.C, p.b, p.idx, p.r,
                                                             p.layout)
            K, N = W.shape
            Wp = pad_to_blocks(W.astype(np.float64), b)  # ragged edges: zero rows/columns up to (Kp, Np)
            Kp, Np = Wp.shape
            Kb, Nb = Kp // b, Np // b
            dtype = W.dtype
            bld = Builder(model.graph, namer, node.name or name, node.metadata_props)
            shapes = _Shapes(bld, x, K, N, opset)
            wp = pack_blocks(Wp, idx, b) * alpha  # (Nb, r*b, b)
            index = idx[:, 0] if layout == "blocks" and r == 1 else idx  # (Nb,): one block each, no sum
            emit = {"rows": _rows_layout, "column": _column_layout, "blocks": _blocks_layout}[layout]
            y = emit(bld, shapes, bld.const("block_index", index, np.int64), wp.astype(dtype), K, N, b)
            if layout != "column" and Np == N:  # y reads yb (Nb, M, b) through Transpose [1, 0, 2]
                out_transpose = next(n for n in reversed(bld.nodes) if n.op_type == "Transpose")
                blocks_out[id(out_transpose.inputs[0])] = (name, N, b)
            if layout == "blocks" and Kp == K:  # the Gather reads x as (Kb, M, b)
                blocks_in.append((name, x, next(n for n in bld.nodes if n.op_type == "Gather"), K, b))
            y = _add_bias(bld, y, C, dtype)
            y = shapes.unflat(y)
            bld.insert_after(node)
            redirect(model.graph, node.outputs[0], y)
            choices[name] = {"target": "ort-block", "layout": layout, "block": b, "blocks_per_column": r, "k_blocks": Kb,
                             "n_blocks": Nb, "density": r * b / K, "weight_density": float(np.count_nonzero(W)) / W.size,
                             "shape": [K, N], "node": node.name}
        if blocks_in and blocks_out:
            cleanup(model)  # shapes of the new values: the hand-over follows the feature axis
        for name, x, gather, K, b in blocks_in:
            source = hand_over_blocks(model.graph, Namer(model.graph), x, gather, blocks_out, K, b)
            if source is not None:
                choices[name]["input_from"] = source
        return _lowered(model, choices)


class SparseToDenseMatMulPass(ir.passes.InPlacePass):
    """ort-sparse: MatMul/Gemm with a constant weight of density <= `max_density` -> com.microsoft
    SparseToDenseMatMul with W^T as a sparse-tensor graph input (its default value is the weight)."""

    def __init__(self, max_density: float | None = None):
        super().__init__()
        self.max_density = DEFAULT_MAX_DENSITY if max_density is None else float(max_density)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        infer_shapes(model)
        namer = Namer(model.graph)
        opset = opset_of(model)
        choices = {}
        for node, x, W, name, alpha, C in _candidates(model):
            density = float(np.count_nonzero(W)) / W.size
            if density > self.max_density or W.dtype != np.float32:
                continue
            K, N = W.shape
            wt = np.ascontiguousarray(W.T)  # (N, K): A of A @ x^T
            input_name = namer(f"{name}.sparse")
            a = ir.Value(name=input_name, shape=ir.Shape([N, K]), type=ir.SparseTensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(wt, name=input_name))
            model.graph.inputs.append(a)
            model.graph.register_initializer(a)
            bld = Builder(model.graph, namer, node.name or name, node.metadata_props)
            shapes = _Shapes(bld, x, K, N, opset)
            xt = shapes.transpose(shapes.flat(), [K, 1])  # (K, M): the op's shape inference
            yt = bld.op("SparseToDenseMatMul", [a, xt], {"alpha": float(alpha)}, domain=MS_DOMAIN)  # ignores transB
            rows = shapes.rows
            yt.shape, yt.type = ir.Shape([N, rows if rows is not None else "M"]), ir.TensorType(ir.DataType.FLOAT)
            y = shapes.transpose(yt, [1, N])  # (M, N)
            y = _add_bias(bld, y, C, W.dtype)
            y = shapes.unflat(y)
            bld.insert_after(node)
            redirect(model.graph, node.outputs[0], y)
            choices[name] = {"target": "ort-sparse", "input": input_name, "density": density, "shape": [K, N],
                             "node": node.name}
        return _lowered(model, choices, MS_DOMAIN)


def block_mask(W: np.ndarray, b: int) -> np.ndarray:
    """(ceil(K/b), ceil(N/b)) bool: which b x b blocks of W (K, N) hold a nonzero."""
    Wp = pad_to_blocks(W, b)
    return np.abs(Wp).reshape(Wp.shape[0] // b, b, Wp.shape[1] // b, b).max(axis=(1, 3)) != 0


def bsr_of(W: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values (nnzb, b, b), crow, col): W (K, N) as the native kernels' block-sparse B, output
    block-rows over N, each block stored (in, out) as it sits in W, zero-padded at ragged edges."""
    Wp = pad_to_blocks(W, b)
    nz = block_mask(W, b).T  # (Nb, Kb): the nonzero input blocks of each output block-row
    rows, cols = np.nonzero(nz)  # row-major: each row's blocks sorted by column
    blocks = Wp.reshape(Wp.shape[0] // b, b, Wp.shape[1] // b, b).transpose(2, 0, 1, 3)  # (Nb, Kb, b, b)
    crow = np.concatenate([[0], np.cumsum(nz.sum(axis=1))])
    return np.ascontiguousarray(blocks[rows, cols]), crow.astype(np.int32), cols.astype(np.int32)


def conv_bsr_of(W: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values (nnzb, b, b), crow, col): a Conv weight W (out, C, kh, kw) as SparseConv takes it, the
    (out, C kh kw) matrix in W's (c, kh, kw) order, output block-rows over out, each block stored (out, in)."""
    values, crow, col = bsr_of(W.reshape(W.shape[0], -1).T, b)
    return np.ascontiguousarray(values.transpose(0, 2, 1)), crow, col


class NativeSparseMatMulPass(ir.passes.InPlacePass):
    """ort-native: MatMul/Gemm with a block-sparse float32 constant weight -> the custom op
    sparsegraph.SparseLinear(x, values, crow, col[, bias]) (the native CPU kernels in ONNX Runtime,
    `sparsegraph.onnx.native`). `block`: the block size (default: the plan's block mask if its stored
    density is within 10% of the best of 64/32/16/8, else the largest such); layers storing more than
    `max_density` of W stay dense. Gemm's alpha is folded into the blocks, a per-column C into the op."""

    def __init__(self, block: int | None = None, max_density: float | None = None):
        super().__init__()
        self.block = block
        self.max_density = DEFAULT_MAX_DENSITY if max_density is None else float(max_density)

    def choose(self, W: np.ndarray, plan_block: int | None) -> int | None:
        """The block size for W, or None to keep it dense (`_pick_block` on the stored density)."""
        K, N = W.shape
        stored = {b: block_mask(W, b).sum() * b * b / (K * N) for b in _block_sizes(self.block, plan_block, K, N)}
        return _pick_block(stored, plan_block, self.max_density)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from .native import DOMAIN, OP

        infer_shapes(model)
        plan_block = _plan_block(model)
        namer = Namer(model.graph)
        choices = {}
        for node, x, W, name, alpha, C in _candidates(model):
            if W.dtype != np.float32 or np.count_nonzero(W) > self.max_density * W.size:
                continue
            b = self.choose(W, plan_block)
            if b is None:
                continue
            K, N = W.shape
            values, crow, col = bsr_of(W * np.float32(alpha), b)
            fuse = C is not None and C.size == N and C.shape in ((N,), (1, N))  # a bias per output
            bld = Builder(model.graph, namer, node.name or name, node.metadata_props)
            inputs = [x, bld.const("values", values), bld.const("crow", crow), bld.const("col", col)]
            y = bld.op(OP, inputs + ([bld.const("bias", C.reshape(N).astype(np.float32))] if fuse else []),
                       {"n": N, "block": b}, domain=DOMAIN)
            y.shape, y.type = ir.Shape([*x.shape[:-1], N]), ir.TensorType(ir.DataType.FLOAT)
            y = _add_bias(bld, y, None if fuse else C, np.float32)
            bld.insert_after(node)
            redirect(model.graph, node.outputs[0], y)
            choices[name] = {"target": "ort-native", "op": OP, "block": b, "blocks": int(len(col)),
                             "density": float(len(col) * b * b) / (K * N),
                             "weight_density": float(np.count_nonzero(W)) / W.size, "shape": [K, N], "node": node.name}
        return _lowered(model, choices, DOMAIN)


def _conv_candidates(model: ir.Model):
    """(node, x, W (out, C, kh, kw) float32, weight name, bias or None, kernel, stride, padding, dilation) for
    every 2-D Conv with a constant W, one group, padding the same before and after (or VALID) and a constant
    bias if any: what sparsegraph.SparseConv takes."""
    for node in list(model.graph):
        if node.domain != "" or node.op_type != "Conv":
            continue
        W, bias = weight_value(node.inputs[1]), None
        if W is None or W.ndim != 4 or W.dtype != np.float32 or node.attributes.get_int("group", 1) != 1:
            continue
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = const_array(node.inputs[2])
            if bias is None:
                continue  # a run-time bias
        auto = node.attributes.get_string("auto_pad", "NOTSET")
        pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
        if auto not in ("NOTSET", "VALID") or pads[:2] != pads[2:]:
            continue
        pairs = [list(node.attributes.get_ints(k, [1, 1])) for k in ("strides", "dilations")]
        name = weight_source(node.inputs[1])[0].name
        yield node, node.inputs[0], W, name, bias, list(W.shape[2:]), pairs[0], pads[:2], pairs[1]


class NativeSparseConvPass(NativeSparseMatMulPass):
    """ort-native: 2-D Conv with a block-sparse float32 constant weight (one group, the same padding before
    and after) -> the custom op sparsegraph.SparseConv(x, values, crow, col[, bias]): sparsegraph's direct
    convolution kernels in ONNX Runtime. W (out, C, kh, kw) is blocked as the (out, C kh kw) matrix in W's
    (c, kh, kw) order, each block stored (out, in); the block and `max_density` as for MatMul."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from .native import CONV_OP, DOMAIN

        infer_shapes(model)
        plan_block = _plan_block(model)
        namer = Namer(model.graph)
        choices = {}
        for node, x, W, name, bias, kernel, stride, padding, dilation in _conv_candidates(model):
            if np.count_nonzero(W) > self.max_density * W.size:
                continue
            n = W.shape[0]
            b = self.choose(W.reshape(n, -1).T, plan_block)  # on the (in, out) view, as for MatMul
            if b is None:
                continue
            values, crow, col = conv_bsr_of(W, b)
            bld = Builder(model.graph, namer, node.name or name, node.metadata_props)
            inputs = [x, bld.const("values", values), bld.const("crow", crow), bld.const("col", col)]
            inputs += [bld.const("bias", bias.reshape(n).astype(np.float32))] if bias is not None else []
            y = bld.op(CONV_OP, inputs, {"n": n, "block": b, "kernel": kernel, "stride": stride, "padding": padding,
                                         "dilation": dilation}, domain=DOMAIN)
            y.shape, y.type = node.outputs[0].shape, ir.TensorType(ir.DataType.FLOAT)
            bld.insert_after(node)
            redirect(model.graph, node.outputs[0], y)
            choices[name] = {"target": "ort-native", "op": CONV_OP, "block": b, "blocks": int(len(col)),
                             "density": float(len(col) * b * b) / W.size,
                             "weight_density": float(np.count_nonzero(W)) / W.size, "shape": list(W.shape),
                             "node": node.name}
        return _lowered(model, choices, DOMAIN)


__all__ = ["BlockSparseMatMulPass", "SparseToDenseMatMulPass", "NativeSparseMatMulPass", "NativeSparseConvPass",
           "block_layout", "conv_bsr_of", "pack_blocks",
           "auto_layout", "block_mask", "bsr_of", "BLOCK_SIZES", "LAYOUTS"]
