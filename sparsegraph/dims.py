"""Dimension groups: which tensor axes must change size together when a model is widened.

Every (value, axis) of the ModelGraph is a variable. Each op ties variables that must scale by the
same factor (a linear ties x[..., in] to W[:, in]; an add ties both operands' axes; a reshape ties a
merged axis to the one factor that may grow). Connected components are the groups. A group is
*fixed* when it touches a model input or output, a dynamic (batch/sequence) or spatial axis, a
head count, a vocabulary, a buffer we cannot regenerate, or an op we have no rule for; every
other group is *widenable*. Integer constants that spell a widenable size (view shapes, split
sizes, normalized_shape, depthwise `groups`, SDPA `scale`) are recorded as patches.

The op rules form one table, `RULES`: canonical op name -> function(builder, op).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import reduce
from typing import Callable

import networkx as nx

from . import tables
from .graph import ModelGraph, Op, Ref

Var = tuple[str, int]  # (value name, axis)


@dataclass(frozen=True)
class Patch:
    """A constant of op `op` at `args[key][index]` that must follow a group's new size.

    new value = new_size(var) * num / den   (fn="size")
              = 1 / sqrt(new_size(var))     (fn="inv_sqrt", SDPA scale, baddbmm alpha)
              = new_size(var)               (fn="groups", depthwise conv)
    """

    op: str
    key: str
    index: int | None
    var: Var
    num: int = 1
    den: int = 1
    fn: str = "size"


@dataclass
class DimGroup:
    id: int
    members: list[Var]
    sizes: dict[Var, int]
    fixed: bool
    reasons: list[str]
    multiple_of: int  # every member's new size must divide by its own multiple (folded into `step`)
    step: int  # the group's unit must be a multiple of this
    unit: int  # gcd of member sizes: member size = scale * unit
    params: list[tuple[str, int]]  # (parameter fqn, axis)
    patches: list[Patch] = field(default_factory=list)

    @property
    def size(self) -> int:
        """The most common member size (for display: d_model, a stage's channels ...)."""
        counts: dict[int, int] = {}
        for s in self.sizes.values():
            counts[s] = counts.get(s, 0) + 1
        return max(counts, key=lambda s: (counts[s], s))

    @property
    def widenable(self) -> bool:
        return not self.fixed

    def scale(self, var: Var) -> int:
        return self.sizes[var] // self.unit

    def label(self) -> str:
        sizes = sorted(set(self.sizes.values()))
        head = ", ".join(f"{p}[{a}]" for p, a in self.params[:3])
        more = f" +{len(self.params) - 3}" if len(self.params) > 3 else ""
        return f"g{self.id} size={'/'.join(map(str, sizes))} {head}{more}"


class DimGroups:
    """Result of the analysis: groups, the var -> group map and the patches."""

    def __init__(self, graph: ModelGraph, groups: list[DimGroup], of: dict[Var, int],
                 unknown: list[Op], ties: nx.Graph, tables: dict[str, tuple[str, dict]] | None = None):
        self.graph = graph
        self.groups = groups
        self.of = of  # var -> group id
        self.unknown = unknown
        self.ties = ties  # the tie graph itself, for inspection
        self.tables = tables or {}  # size-derived buffers (fqn -> (rule, parameters)), regenerated when widened

    def __iter__(self):
        return iter(self.groups)

    def __len__(self):
        return len(self.groups)

    def group(self, value: str, axis: int) -> DimGroup:
        rank = len(self.graph.values[value].shape)
        return self.groups[self.of[(value, axis % rank)]]

    def param_group(self, fqn: str, axis: int) -> DimGroup:
        return self.group(self.graph.params[fqn], axis)

    @property
    def widenable(self) -> list[DimGroup]:
        return [g for g in self.groups if g.widenable and g.params]

    def summary(self) -> list[dict]:
        return [{"id": g.id, "sizes": sorted(set(g.sizes.values())), "fixed": g.fixed,
                 "reasons": sorted(set(g.reasons))[:4], "params": [f"{p}[{a}]" for p, a in g.params],
                 "patches": len(g.patches)} for g in self.groups
                if g.params and "parameter only" not in g.reasons]


class _Builder:
    def __init__(self, g: ModelGraph):
        self.g = g
        self.uf = nx.utils.UnionFind()
        self.ties = nx.Graph()
        self.fixed: dict[Var, str] = {}
        self.multiples: dict[Var, int] = {}
        self.patches: list[Patch] = []
        self.unknown: list[Op] = []
        self.fixed_roots: set[Var] = set()
        self.tables: dict[str, tuple[str, dict]] = {}  # buffer fqn -> (tables rule, parameters)
        for v in g.values.values():
            for a in range(len(v.shape)):
                self.uf[(v.name, a)]  # register
                self.ties.add_node((v.name, a))

    # -- primitives --------------------------------------------------------------------------
    def v(self, value: str | Ref | None, axis: int) -> Var | None:
        if value is None or str(value) not in self.g.values:
            return None
        rank = len(self.g.values[str(value)].shape)
        if not -rank <= axis < rank:
            return None
        return (str(value), axis % rank)

    def size(self, var: Var) -> int:
        return self.g.values[var[0]].shape[var[1]]

    def tie(self, a: Var | None, b: Var | None) -> None:
        if a is None or b is None or a == b:
            return
        fixed = self.uf[a] in self.fixed_roots or self.uf[b] in self.fixed_roots
        self.uf.union(a, b)
        self.ties.add_edge(a, b)
        if fixed:
            self.fixed_roots.add(self.uf[a])

    def fix(self, var: Var | None, reason: str) -> None:
        if var is not None:
            self.fixed.setdefault(var, reason)
            self.fixed_roots.add(self.uf[var])

    def fix_value(self, value: str | None, reason: str) -> None:
        if value is not None and value in self.g.values:
            for a in range(len(self.g.values[value].shape)):
                self.fix((value, a), reason)

    def is_fixed(self, var: Var) -> bool:
        return self.uf[var] in self.fixed_roots  # a former root never becomes a root again

    def reasons(self, var: Var) -> set[str]:
        """Why var's group is fixed (the reasons given to its members so far)."""
        root = self.uf[var]
        return {r for v, r in self.fixed.items() if self.uf[v] == root}

    def tie_same(self, a: str, b: str, skip: set[int] = frozenset()) -> None:
        """Tie axis i of a to axis i of b (same rank), except axes in skip."""
        ra, rb = len(self.g.shape(a)), len(self.g.shape(b))
        for i in range(min(ra, rb)):
            if i not in skip:
                self.tie((a, i), (b, i))

    def broadcast(self, values: list[str], out: str) -> None:
        """Right-aligned broadcasting: equal sizes (> 1) tie to the output axis."""
        ro = len(self.g.shape(out))
        for v in values:
            shp = self.g.shape(v)
            for j in range(1, len(shp) + 1):
                if j <= ro and shp[-j] == self.g.shape(out)[-j] and shp[-j] != 1:
                    self.tie((v, len(shp) - j), (out, ro - j))

    def patch(self, op: Op, key: str, index: int | None, var: Var | None, **kw) -> None:
        if var is not None:
            self.patches.append(Patch(op.name, key, index, var, **kw))


# ---------------------------------------------------------------------------------------------
# op rules
# ---------------------------------------------------------------------------------------------
def _out(op: Op) -> str:
    return op.outputs[0]


def _linear(b: _Builder, op: Op) -> None:
    x, w, bias, y = op.ref("input"), op.ref("weight"), op.ref("bias"), _out(op)
    b.tie(b.v(x, -1), b.v(w, 1))
    b.tie(b.v(y, -1), b.v(w, 0))
    b.tie(b.v(y, -1), b.v(bias, -1))
    for i in range(len(b.g.shape(y)) - 1):
        b.tie((x, i), (y, i))


def _addmm(b: _Builder, op: Op) -> None:  # bias + mat1 @ mat2, mat2 = W^T (HF Conv1D)
    bias, m1, m2, y = op.ref("input"), op.ref("mat1"), op.ref("mat2"), _out(op)
    b.tie(b.v(m1, 1), b.v(m2, 0))
    b.tie((y, 1), b.v(m2, 1))
    b.tie((y, 0), b.v(m1, 0))
    if bias:
        b.broadcast([bias], y)


def _matmul(b: _Builder, op: Op) -> None:
    a, c, y = op.ref("self"), op.ref("other"), _out(op)
    ra, rc, ry = (len(b.g.shape(t)) for t in (a, c, y))
    b.tie(b.v(a, -1), b.v(c, -2 if rc > 1 else 0))
    if ra > 1:
        b.tie(b.v(a, -2), b.v(y, -2 if rc > 1 else -1))
    if rc > 1:
        b.tie(b.v(c, -1), b.v(y, -1))
    nb = ry - (ra > 1) - (rc > 1)  # broadcast batch dims
    for t, rt in ((a, ra), (c, rc)):
        tb = rt - 2 if rt > 1 else 0
        for j in range(1, min(tb, nb) + 1):
            if b.g.shape(t)[tb - j] == b.g.shape(y)[nb - j] != 1:
                b.tie((t, tb - j), (y, nb - j))


def _conv(b: _Builder, op: Op) -> None:
    x, w, bias, y = op.ref("input"), op.ref("weight"), op.ref("bias"), _out(op)
    g = int(op.args.get("groups") or 1)
    cin = b.g.shape(x)[1]
    b.tie((x, 0), (y, 0))
    for t in (x, y, w):
        for a in range(2, len(b.g.shape(t))):
            b.fix((t, a), "spatial")
    b.tie((y, 1), b.v(bias, 0))
    if op.args.get("transposed"):
        if g != 1:
            b.fix((x, 1), "grouped transposed conv")
            b.fix((y, 1), "grouped transposed conv")
        b.tie((x, 1), (w, 0))
        b.tie((y, 1), (w, 1))
    elif g == 1:
        b.tie((x, 1), (w, 1))
        b.tie((y, 1), (w, 0))
    elif g == cin:  # depthwise: channels in -> multiplier * channels out; `groups` follows
        b.tie((x, 1), (w, 0))
        b.tie((y, 1), (w, 0))
        b.fix((w, 1), "depthwise kernel")
        b.patch(op, "groups", None, (x, 1), fn="groups")
    else:  # grouped: group count kept, channels per group grow
        b.tie((x, 1), (w, 1))
        b.tie((y, 1), (w, 0))
        b.multiples[(x, 1)] = g
        b.multiples[(y, 1)] = g


def _embedding(b: _Builder, op: Op) -> None:
    w, idx, y = op.ref("weight"), op.ref("indices"), _out(op)
    b.fix(b.v(w, 0), "vocabulary")
    b.tie(b.v(y, -1), b.v(w, 1))
    for i in range(len(b.g.shape(idx))):
        b.tie((idx, i), (y, i))


def _batch_norm(b: _Builder, op: Op) -> None:
    x, y = op.ref("input"), _out(op)
    b.tie_same(x, y)
    for key in ("weight", "bias", "running_mean", "running_var"):
        b.tie((x, 1), b.v(op.ref(key), 0))


def _layer_norm(b: _Builder, op: Op) -> None:  # also rms_norm
    x, y = op.ref("input"), _out(op)
    b.tie_same(x, y)
    shape = op.args.get("normalized_shape") or []
    k = len(shape)
    for j in range(k):
        var = (x, len(b.g.shape(x)) - k + j)
        for key in ("weight", "bias"):
            b.tie(var, b.v(op.ref(key), j))
        if isinstance(shape, list):
            b.patch(op, "normalized_shape", j, var)


def _group_norm(b: _Builder, op: Op) -> None:
    x, y = op.ref("input"), _out(op)
    b.tie_same(x, y)
    for key in ("weight", "bias"):
        b.tie((x, 1), b.v(op.ref(key), 0))
    b.multiples[(x, 1)] = int(op.args.get("num_groups") or 1)


def _permute(b: _Builder, op: Op) -> None:
    x, y = op.ref("input"), _out(op)
    for i, d in enumerate(op.args["dims"]):
        b.tie((x, d), (y, i))


def _cat(b: _Builder, op: Op) -> None:
    y = _out(op)
    for t in op.args.get("tensors", []):
        if isinstance(t, Ref) and len(b.g.shape(t)) == len(b.g.shape(y)):
            b.tie_same(str(t), y)  # along `dim` the parts scale with the whole


def _split(b: _Builder, op: Op) -> None:
    x = op.ref("input")
    d = int(op.args.get("dim", 0)) % len(b.g.shape(x))
    for i, out in enumerate(op.outputs):
        if len(b.g.shape(out)) == len(b.g.shape(x)):
            b.tie_same(x, out)
            if "split_sizes" in op.args:
                b.patch(op, "split_sizes", i, (out, d))
        else:  # unbind removes the axis
            b.fix((x, d), "unbind")
    if "split_size" in op.args and op.outputs:
        sizes = [b.g.shape(o)[d] for o in op.outputs]
        if len(set(sizes)) == 1:
            b.patch(op, "split_size", None, (op.outputs[0], d))
        else:  # ragged last piece: the size cannot scale
            for o in op.outputs:
                b.fix((o, d), "ragged split")


def _sdpa(b: _Builder, op: Op) -> None:
    q, k, v, mask = (op.ref(n) for n in ("query", "key", "value", "attn_mask"))
    y = _out(op)
    b.tie(b.v(q, -1), b.v(k, -1))  # head_dim of q and k
    b.tie(b.v(v, -1), b.v(y, -1))  # head_dim of v and of the output
    b.tie(b.v(q, -2), b.v(y, -2))  # query length
    b.tie(b.v(k, -2), b.v(v, -2))  # key length
    rq = len(b.g.shape(q))
    for i in range(rq - 2):  # batch and heads (GQA: key/value heads may be fewer)
        b.tie((q, i), (y, i))
        if b.g.shape(k)[i] == b.g.shape(q)[i]:
            b.tie((q, i), (k, i))
        b.tie((k, i), (v, i))
    if mask:  # broadcast against the scores (..., heads, L_q, L_k): never against a head_dim
        sm, sq, sk = b.g.shape(mask), b.g.shape(q), b.g.shape(k)
        scores = [*sq[:-1], sk[-2]]
        owners = [(q, i) for i in range(len(sq) - 1)] + [(k, len(sk) - 2)]
        for j in range(1, min(len(sm), len(scores)) + 1):
            if sm[-j] == scores[-j] != 1:
                b.tie((mask, len(sm) - j), owners[-j])
    scale = op.args.get("scale")
    if isinstance(scale, float) and math.isclose(scale, b.g.shape(q)[-1] ** -0.5, rel_tol=1e-6):
        b.patch(op, "scale", None, b.v(q, -1), fn="inv_sqrt")


def _baddbmm(b: _Builder, op: Op) -> None:
    """beta * input + alpha * (batch1 @ batch2): a batched product plus a broadcast addend (Bloom's
    ALiBi scores); an alpha of 1/sqrt(head_dim) is a softmax scale and follows the head dimension."""
    b1, b2, y = op.ref("batch1"), op.ref("batch2"), _out(op)
    b.tie((b1, 0), (y, 0))
    b.tie((b2, 0), (y, 0))
    b.tie((b1, 2), (b2, 1))
    b.tie((b1, 1), (y, 1))
    b.tie((b2, 2), (y, 2))
    if op.ref("input"):
        b.broadcast([op.ref("input")], y)
    alpha = op.args.get("alpha")
    if isinstance(alpha, float) and math.isclose(alpha, b.g.shape(b1)[-1] ** -0.5, rel_tol=1e-6):
        b.patch(op, "alpha", None, (b1, 2), fn="inv_sqrt")


def _grouped_mm(b: _Builder, op: Op) -> None:
    """Rows of x (S, K) grouped by expert, weight (E, K, N): y (S, N) = x_rows @ W[e] for each group."""
    x, w, y = op.ref("input"), op.ref("weight"), _out(op)
    b.tie((x, 0), (y, 0))
    b.tie((x, 1), (w, 1))
    b.tie((y, 1), (w, 2))
    b.fix((w, 0), "experts")
    b.fix_value(op.ref("offs"), "expert offsets")
    if op.ref("bias"):
        b.tie(b.v(op.ref("bias"), -1), (y, 1))


def _repeat(b: _Builder, op: Op) -> None:
    """Tiling: an axis repeated once keeps its size and ties; a tiled axis is fixed."""
    x, y = op.ref("input"), _out(op)
    reps = list(op.args.get("repeats") or [])
    rx, ry = len(b.g.shape(x)), len(b.g.shape(y))
    for j in range(ry):
        i = j - (ry - rx)
        if i >= 0 and j < len(reps) and reps[j] == 1:
            b.tie((x, i), (y, j))
        else:
            b.fix((y, j), "repeat")
            if i >= 0:
                b.fix((x, i), "repeat")


def _repeat_interleave(b: _Builder, op: Op) -> None:
    """Every element repeated r times along dim: that axis scales with the input's (r times its size)."""
    x, y = op.ref("input"), _out(op)
    if not isinstance(op.args.get("repeats"), int) or op.args.get("dim") is None:
        _fixed("repeat_interleave")(b, op)
        return
    b.tie_same(x, y)


def _stack(b: _Builder, op: Op) -> None:
    """stack(tensors, dim): every input's axes tie to the output's around the new axis, which is fixed."""
    y = _out(op)
    ry = len(b.g.shape(y))
    d = int(op.args.get("dim", 0)) % ry
    b.fix((y, d), "stacked axis")
    for t in op.args.get("tensors", []):
        if isinstance(t, Ref):
            for i in range(len(b.g.shape(t))):
                b.tie((str(t), i), (y, i + (i >= d)))


def _index_tensor(b: _Builder, op: Op) -> None:
    """x[..., idx, ...] (aten.index: None = a whole axis): the axes not indexed keep their order and tie;
    indexed axes (and the index tensors) are fixed. Adjacent index tensors put their broadcast shape
    where they stood, separated ones put it first (NumPy's advanced-indexing rule)."""
    x, y = op.ref("input"), _out(op)
    idx = list(op.args.get("indices") or [])
    if not all(i is None or isinstance(i, Ref) for i in idx) or not any(i is not None for i in idx):
        _fixed("indexing")(b, op)
        return
    rx, ry = len(b.g.shape(x)), len(b.g.shape(y))
    idx += [None] * (rx - len(idx))
    pos = [i for i, t in enumerate(idx) if t is not None]
    nb = ry - (rx - len(pos))  # rank of the broadcast index shape
    first = pos[0] if pos == list(range(pos[0], pos[-1] + 1)) else 0
    j = 0
    for i in range(rx):
        if idx[i] is not None:
            b.fix((x, i), "indexed axis")
            continue
        if j == first:
            j += nb
        b.tie((x, i), (y, j))
        j += 1
    for j in range(first, first + nb):
        b.fix((y, j), "indexed axis")
    for t in idx:
        if t is not None:
            b.fix_value(str(t), "index")


def _index_select(b: _Builder, op: Op) -> None:
    x, y = op.ref("input"), _out(op)
    d = int(op.args.get("dim", 0)) % len(b.g.shape(x))
    b.tie_same(x, y, skip={d})
    b.fix((x, d), "indexed axis")
    b.fix((y, d), "indexed axis")
    b.fix_value(op.ref("index"), "index")


def _index_put(b: _Builder, op: Op) -> None:
    """x[idx] = values: the result is x; the indexed leading axes are fixed, the rest tie with values."""
    x, y, vals = op.ref("input"), _out(op), op.ref("values")
    idx = op.args.get("indices") or []
    b.tie_same(x, y)
    for i in range(len(idx)):
        b.fix((x, i), "indexed axis")
    for i in idx:
        if isinstance(i, Ref):
            b.fix_value(str(i), "index")
    if vals:
        rx, rv = len(b.g.shape(x)), len(b.g.shape(vals))
        for j in range(1, min(rv, rx - len(idx)) + 1):
            b.tie((vals, rv - j), (x, rx - j))


def _along_dim(reason: str) -> Callable[[_Builder, Op], None]:
    """cumsum/cumprod, topk/sort: every other axis ties to each output; the axis itself is fixed."""
    def rule(b: _Builder, op: Op) -> None:
        x = op.ref("input")
        d = int(op.args.get("dim", -1)) % len(b.g.shape(x))
        b.fix((x, d), reason)
        for y in op.outputs:
            if len(b.g.shape(y)) == len(b.g.shape(x)):
                b.tie_same(x, y, skip={d})
                b.fix((y, d), reason)
    return rule


def _reduction(b: _Builder, op: Op) -> None:
    x, y = op.ref("input"), _out(op)
    r = len(b.g.shape(x))
    dims = op.args.get("dim")
    dims = list(range(r)) if dims is None or dims == [] else ([dims] if isinstance(dims, int) else dims)
    dims = {d % r for d in dims}
    keep = bool(op.args.get("keepdim", False)) or len(b.g.shape(y)) == r
    j = 0
    for i in range(r):
        if i in dims:
            j += keep
            continue
        b.tie((x, i), (y, j))
        j += 1


def _pool(b: _Builder, op: Op) -> None:
    x, y = op.ref("input"), _out(op)
    r = len(b.g.shape(x))
    lead = r - 2 if r >= 3 else r - 1  # (N, C, *spatial) or (C, *spatial)
    for i in range(lead):
        b.tie((x, i), (y, i))
    for t in (x, y):
        for a in range(lead, len(b.g.shape(t))):
            b.fix((t, a), "spatial")


def _expand(b: _Builder, op: Op) -> None:
    x, y = op.ref("input"), _out(op)
    b.broadcast([x], y)
    size = op.args.get("size")
    if isinstance(size, list):
        for i, s in enumerate(size):
            if type(s) is int and s != -1:
                b.patch(op, "size", i, (y, i))


def _slice(b: _Builder, op: Op) -> None:
    x, y = op.ref("input"), _out(op)
    d = int(op.args.get("dim", 0)) % len(b.g.shape(x))
    b.tie_same(x, y, skip={d})
    n, m = b.g.shape(x)[d], b.g.shape(y)[d]
    start, end, step = op.args.get("start") or 0, op.args.get("end"), op.args.get("step") or 1
    open_end = type(end) is int and end >= n  # x[..., k:] (end = sys.maxsize): stays open
    end = min(end, n) if type(end) is int else end
    if m == n:
        b.tie((x, d), (y, d))
    elif (type(start) is int and type(end) is int and step == 1 and 0 <= start < end <= n
          and start % math.gcd(n, end - start) == 0):
        # a piece whose bounds are whole units of gcd(whole, piece) scales with the whole: rotate_half's
        # halves, a partial rotary split [:r] / [r:] (GPT-NeoX, StableLM), the bounds patched in proportion
        b.tie((x, d), (y, d))
        b.patch(op, "start", None, (x, d), num=start, den=n)
        if not open_end:
            b.patch(op, "end", None, (x, d), num=end, den=n)
    elif type(start) is int and type(step) is int and step > 1 and 0 <= start < step and n % step == 0 \
            and (open_end or end == n) and m * step == n:
        b.tie((x, d), (y, d))  # every step-th element (GPT-J's x[..., ::2], x[..., 1::2]): 1/step of the whole
    else:
        b.fix((x, d), "slice")
        b.fix((y, d), "slice")


def _select(b: _Builder, op: Op) -> None:
    x, y = op.ref("input"), _out(op)
    d = int(op.args.get("dim", 0)) % len(b.g.shape(x))
    b.fix((x, d), "select")
    for i in range(len(b.g.shape(y))):
        b.tie((x, i + (i >= d)), (y, i))


def _elementwise(b: _Builder, op: Op) -> None:
    for y in op.outputs:
        b.broadcast(op.inputs, y)


def _alias(b: _Builder, op: Op) -> None:
    b.tie_same(op.inputs[0], op.outputs[0])


def _mask_mul(b: _Builder, op: Op) -> None:
    b.tie_same(op.ref("weight"), op.ref("mask"))
    b.tie_same(op.ref("weight"), _out(op))


def _fixed(reason: str) -> Callable[[_Builder, Op], None]:
    def rule(b: _Builder, op: Op) -> None:
        for v in op.inputs + op.outputs:
            b.fix_value(v, reason)
    return rule


def _unknown(b: _Builder, op: Op) -> None:
    b.unknown.append(op)
    _fixed(f"unknown op {op.target}")(b, op)


RULES: dict[str, Callable[[_Builder, Op], None]] = {
    "linear": _linear,  # y = x W^T + b: x[-1] ~ W[1], y[-1] ~ W[0] ~ b
    "addmm": _addmm,  # y = input + mat1 @ mat2 (Conv1D: M = W^T): x[1] ~ M[0], y[1] ~ M[1] ~ b
    "matmul": _matmul,  # (..., n, k) @ (..., k, m): contraction, rows, cols, broadcast batch
    "convolution": _conv,  # channels tie, spatial fixed, groups kept (depthwise: groups follow)
    "embedding": _embedding,  # vocabulary fixed, y[-1] ~ W[1]
    "batch_norm": _batch_norm,  # channel axis 1 ~ weight, bias, running stats
    "layer_norm": _layer_norm,  # trailing axes ~ weight, bias; normalized_shape patched
    "rms_norm": _layer_norm,  # as layer_norm
    "group_norm": _group_norm,  # channels ~ weight, bias; channels stay a multiple of groups
    "permute": _permute,  # y[i] ~ x[dims[i]]
    "cat": _cat,  # parts scale with the whole along dim; other axes tie
    "split": _split,  # pieces scale with the whole; split sizes patched
    "alias": _alias,  # getitem of a multi-output op: identity
    "scaled_dot_product_attention": _sdpa,  # head_dim q~k, v~y; heads kept; scale 1/sqrt(d) patched
    "reduction": _reduction,  # kept axes tie in order
    "pool": _pool,  # batch and channels tie, spatial fixed
    "expand": _expand,  # broadcast; size entries patched
    "slice": _slice,  # full or aligned slices tie; anything else fixed
    "select": _select,  # the selected axis is fixed, the rest tie
    "elementwise": _elementwise,  # right-aligned broadcasting
    "mask_mul": _mask_mul,  # weight * mask: same shape
    "baddbmm": _baddbmm,  # beta*input + alpha*(b1 @ b2): batched product, broadcast addend; alpha 1/sqrt(d) patched
    "grouped_mm": _grouped_mm,  # MoE experts: x[1] ~ W[1], y[1] ~ W[2], rows tie, the expert axis fixed
    "repeat": _repeat,  # axes repeated once tie, tiled axes fixed
    "repeat_interleave": _repeat_interleave,  # the repeated axis scales with the input's
    "stack": _stack,  # inputs tie around the new axis (fixed)
    "index_tensor": _index_tensor,  # x[idx]: trailing axes tie, indexed axes fixed
    "index_select": _index_select,  # every axis but dim ties
    "index_put": _index_put,  # result ~ x, values tie to x's trailing axes
    "scan": _along_dim("scan axis"),  # cumsum/cumprod: other axes tie
    "sort": _along_dim("sort axis"),  # topk/sort: other axes tie to values and indices
    "const": _fixed("constant created in the graph"),
    "index": _fixed("indexing"),
    # "reshape" is resolved after all other ties, see _resolve_reshapes
}


def _blocks(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Match the axes of a reshape: contiguous blocks with equal products (size-1 axes skipped)."""
    i = j = 0
    blocks = []
    a = [k for k, s in enumerate(src) if s != 1]
    c = [k for k, s in enumerate(dst) if s != 1]
    while i < len(a) or j < len(c):
        if i >= len(a) or j >= len(c):
            return None
        bi, bj = [a[i]], [c[j]]
        pi, pj = src[a[i]], dst[c[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(a):
                pi *= src[a[i]]
                bi.append(a[i])
                i += 1
            elif pj < pi and j < len(c):
                pj *= dst[c[j]]
                bj.append(c[j])
                j += 1
            else:
                return None
        blocks.append((bi, bj))
    return blocks


def _resolve_reshapes(b: _Builder, ops: list[Op]) -> None:
    for op in ops:
        x, y = op.ref("input"), _out(op)
        sx, sy = b.g.shape(x), b.g.shape(y)
        blocks = _blocks(sx, sy)
        size = op.args.get("size")
        if blocks is None:
            b.fix_value(x, "reshape")
            b.fix_value(y, "reshape")
            continue
        for bi, bj in blocks:
            if len(bi) == 1 and len(bj) == 1:
                b.tie((x, bi[0]), (y, bj[0]))
                continue
            if len(bi) > 1 and len(bj) > 1:
                for k in bi:
                    b.fix((x, k), "reshape")
                for k in bj:
                    b.fix((y, k), "reshape")
                continue
            whole, parts = ((x, bi[0]), [(y, k) for k in bj]) if len(bi) == 1 else \
                ((y, bj[0]), [(x, k) for k in bi])
            grow = _growing_factor(b, parts)
            if b.is_fixed(whole) or grow is None:
                b.fix(whole, "reshape")
                for p in parts:
                    b.fix(p, "reshape")
                continue
            for p in parts:
                if p != grow and not b.is_fixed(p):
                    b.fix(p, "head count")
            b.tie(whole, grow)
        if isinstance(size, list):
            for i, s in enumerate(size):
                if type(s) is int and s != -1:
                    b.patch(op, "size", i, (y, i))
        sizes, dim = op.args.get("sizes"), op.args.get("dim")
        if isinstance(sizes, list) and isinstance(dim, int):  # unflatten(dim, sizes): sizes[j] is y[dim + j]
            d0 = dim % len(sx)
            for j, s in enumerate(sizes):
                if type(s) is int and s != -1:
                    b.patch(op, "sizes", j, (y, d0 + j))


def _growing_factor(b: _Builder, parts: list[Var]) -> Var | None:
    """Which factor of a split axis grows with the whole: the innermost (head_dim, with the head
    count kept, as Sparse Wide defines it), or an outer one when everything inside it is spatial
    (a flatten of channels x height x width, of GPT-J's stacked pairs). None: the innermost factor is fixed for another
    reason (e.g. a constant table of its size), so nothing may grow."""
    for i in range(len(parts) - 1, -1, -1):
        if not b.is_fixed(parts[i]):
            inner = parts[i + 1:]
            if all(b.reasons(p) <= {"spatial", "stacked axis"} for p in inner):  # C x H x W; (d, 2) pairs
                return parts[i]
            return None
    return None


def analyze_dims(g: ModelGraph) -> DimGroups:
    """Run the dimension-group analysis on a ModelGraph.

    >>> import torch, sparsegraph as sg
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> dims = sg.analyze_dims(sg.capture(m, (torch.randn(2, 8),)))
    >>> [sorted(set(grp.sizes.values())) for grp in dims.widenable]
    [[32]]
    """
    b = _Builder(g)
    for name in g.inputs + g.outputs:
        b.fix_value(name, "model input/output")
    for v in g.values.values():
        for a, sym in enumerate(v.symbolic):
            if sym:
                b.fix((v.name, a), "dynamic size")
        if v.kind == "const":
            b.fix_value(v.name, "constant")
        if v.kind == "buffer" and not all(
                (c.op == "batch_norm" and v.name in (c.ref("running_mean"), c.ref("running_var")))
                or (c.op == "mask_mul" and c.ref("mask") == v.name) for c in g.consumers(v.name)):
            table = tables.recognise(t) if (t := g.tensor(v.param)) is not None else None
            if table is None:
                b.fix_value(v.name, "buffer")
            else:  # a size-derived table (rotary frequencies): recomputed at the new size, not frozen
                b.tables[v.param] = table
    reshapes = []
    for op in g:
        if op.op == "reshape":
            reshapes.append(op)
        else:
            RULES.get(op.op, _unknown)(b, op)
    _resolve_reshapes(b, reshapes)
    g.unknown = b.unknown
    return _collect(g, b)


def _collect(g: ModelGraph, b: _Builder) -> DimGroups:
    comps: dict[Var, list[Var]] = {}
    for var in b.ties.nodes:
        comps.setdefault(b.uf[var], []).append(var)
    fixed_roots: dict[Var, list[str]] = {}
    for var, reason in b.fixed.items():
        fixed_roots.setdefault(b.uf[var], []).append(reason)
    groups: list[DimGroup] = []
    of: dict[Var, int] = {}
    for root, members in comps.items():
        members.sort()
        sizes = {m: g.values[m[0]].shape[m[1]] for m in members}
        params = sorted((g.values[v].param, a) for v, a in members
                        if g.values[v].kind == "param" and g.values[v].param)
        reasons = list(fixed_roots.get(root, []))
        if not any(g.values[v].kind == "activation" for v, _ in members):
            reasons.append("parameter only")
        if all(s == 1 for s in sizes.values()):  # a size-1 axis broadcasts (a gate's single output): not a width
            reasons.append("size 1")
        unit = reduce(math.gcd, sizes.values())
        step = 1
        for m in members:
            need = b.multiples.get(m, 1)
            scale = sizes[m] // unit if unit else 1
            step = math.lcm(step, need // math.gcd(need, scale))
        grp = DimGroup(len(groups), members, sizes, bool(reasons) or unit == 0, reasons,
                       max(b.multiples.get(m, 1) for m in members), step, unit or 1, params)
        for m in members:
            of[m] = grp.id
        groups.append(grp)
    for p in b.patches:
        groups[of[p.var]].patches.append(p)
    return DimGroups(g, groups, of, b.unknown, b.ties, b.tables)


def new_unit(group: DimGroup, k: float, multiple: int = 1) -> int:
    """The group's new unit when widened by factor k (a multiple of `multiple` too, e.g. so that
    sparse weights are whole blocks of a block mask).

    Reference rounding (Sparse-IFT): each dimension is truncated, int(k * size), then rounded up
    to the nearest valid size (a multiple of the head count, groups ...). ResNet-18 stage width
    64 -> 90 at k = sqrt(2); GPT-3 Small d_model 768 with 12 heads -> 1092.
    """
    step = math.lcm(group.step, multiple)
    smax = max(group.scale(m) for m in group.members)
    target = Fraction(math.floor(k * group.unit * smax + 1e-9), smax)
    units = math.ceil(target / step)
    return max(units * step, step)
