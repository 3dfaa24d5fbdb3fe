"""Weight-bearing layers of a ModelGraph and their roles (stem, hidden, head, embedding, norm)."""
from __future__ import annotations

from collections import deque

from .graph import Layer, ModelGraph, Op

# canonical op -> (weight arg, bias arg, out axis, in axes) of the weight tensor; one line each
LAYER_SPECS = {
    "linear": ("weight", "bias", 0, (1,)),  # W (out, in)
    "addmm": ("mat2", "input", 1, (0,)),  # HF Conv1D: bias + x @ W, W (in, out)
    "embedding": ("weight", None, 1, (0,)),  # E (vocab, dim)
    "batch_norm": ("weight", "bias", 0, ()),
    "layer_norm": ("weight", "bias", 0, ()),
    "rms_norm": ("weight", None, 0, ()),
    "group_norm": ("weight", "bias", 0, ()),
}
NORMS = ("batch_norm", "layer_norm", "rms_norm", "group_norm")
MATMULS = ("linear", "addmm", "matmul", "convolution", "grouped_mm")


def _weight_spec(g: ModelGraph, op: Op):
    if op.op in LAYER_SPECS:
        return LAYER_SPECS[op.op]
    if op.op == "convolution":
        w = g.values[op.ref("weight")]
        rest = tuple(range(2, len(w.shape)))
        return ("weight", "bias", 1, (0, *rest)) if op.args.get("transposed") else ("weight", "bias", 0, (1, *rest))
    if op.op == "grouped_mm":  # MoE experts: W (E, K, N) as the op reads it; axis 0 is the expert
        return ("weight", None, 2, (1,))
    if op.op == "matmul":  # x @ W or W @ x with a 2-D parameter
        if g.param_value(op.ref("other")) is not None and len(g.shape(op.ref("other"))) == 2:
            return ("other", None, 1, (0,))
        if g.param_value(op.ref("self")) is not None and len(g.shape(op.ref("self"))) == 2:
            return ("self", None, 0, (1,))
    return None


def _axes_through_view(g: ModelGraph, value: str, out_axis: int, in_axes: tuple[int, ...],
                       batch_axes: tuple[int, ...] = ()):
    """Map weight axes as the op sees them back to the parameter's own axes (through `t`/permute)."""
    prod = g.producer(value)
    if prod is None or prod.op not in ("permute",):
        return out_axis, in_axes, batch_axes
    dims = prod.args["dims"]
    return _axes_through_view(g, prod.inputs[0], dims[out_axis], tuple(dims[a] for a in in_axes),
                              tuple(dims[a] for a in batch_axes))


def find_layers(g: ModelGraph) -> list[Layer]:
    layers: list[Layer] = []
    for op in g:
        spec = _weight_spec(g, op)
        if spec is None:
            continue
        wkey, bkey, out_axis, in_axes = spec
        wref = op.ref(wkey)
        wval = g.param_value(wref) if wref else None
        if wval is None or wval.kind != "param":
            continue
        batch = tuple(a for a in range(len(g.shape(wref))) if a != out_axis and a not in in_axes) \
            if op.op == "grouped_mm" else ()
        out_axis, in_axes, batch = _axes_through_view(g, wref, out_axis, in_axes, batch)
        bval = g.param_value(op.ref(bkey)) if bkey and op.ref(bkey) else None
        kind = "norm" if op.op in NORMS else ("embedding" if op.op == "embedding" else
                                              "conv" if op.op == "convolution" else "linear")
        name = op.module or wval.param.rsplit(".", 1)[0]
        if op.op in MATMULS and op.module and "." in wval.param and not wval.param.startswith(op.module):
            name = f"{op.module}:{op.name}"  # e.g. a tied head read through another module
        layers.append(Layer(name, op.name, kind, wval.param, bval.param if bval else None,
                            out_axis, tuple(in_axes), role=kind if kind in ("norm", "embedding") else "hidden",
                            batch_axes=batch))
    _assign_roles(g, layers)
    return layers


def _assign_roles(g: ModelGraph, layers: list[Layer]) -> None:
    """Stem: a matmul/conv layer reached from a model input without passing another weight layer.
    Head: one that reaches a model output without passing another weight layer."""
    weight_ops = {l.op for l in layers if l.kind in ("linear", "conv", "embedding")}
    by_op = {l.op: l for l in layers}

    def first_weight_ops(start: list[str], forward: bool) -> set[str]:
        found, seen = set(), set()
        queue = deque(start)
        while queue:
            v = queue.popleft()
            ops = g.consumers(v) if forward else [p for p in [g.producer(v)] if p is not None]
            for op in ops:
                if op.name in seen:
                    continue
                seen.add(op.name)
                if op.name in weight_ops:
                    found.add(op.name)
                    continue
                nxt = op.outputs if forward else [i for i in op.inputs if g.values[i].kind == "activation"
                                                  or g.values[i].kind == "input"]
                queue.extend(nxt)
        return found

    for name in first_weight_ops(list(g.inputs), forward=True):
        if by_op[name].kind in ("linear", "conv"):
            by_op[name].role = "stem"
    # a model output that the graph also reads (an encoder's last hidden state, feeding the decoder's
    # cross-attention) is a by-product, not a readout: only outputs nothing else consumes find heads
    readouts = [v for v in g.outputs if not g.consumers(v)] or list(g.outputs)
    for name in first_weight_ops(readouts, forward=False):
        if by_op[name].kind in ("linear", "conv"):
            by_op[name].role = "head"
    for l in layers:
        if l.kind == "linear" and l.role == "hidden" and _is_router(g, g.ops[l.op]):
            l.role = "router"


# ops a router's scores pass through on their way to the expert choice (casts, softmax, reshapes)
_ROUTE_THROUGH = ("elementwise", "alias", "reshape", "permute")


def _is_router(g: ModelGraph, op: Op, depth: int = 8) -> bool:
    """An MoE router: its output reaches a top-k (the expert choice) through elementwise ops only."""
    frontier, seen = list(op.outputs), set()
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for c in g.consumers(v):
                if c.name in seen:
                    continue
                seen.add(c.name)
                if c.op == "sort" and "topk" in c.target.lower():
                    return True
                if c.op in _ROUTE_THROUGH:
                    nxt.extend(c.outputs)
        frontier = nxt
    return False


def param_roles(g: ModelGraph, layers: list[Layer]) -> dict[str, str]:
    """Role of every parameter: embedding, stem, hidden, head, router, norm, bias or other."""
    roles: dict[str, str] = {}
    for l in layers:
        if l.kind == "embedding":
            roles[l.weight] = "embedding"  # a tied head keeps the embedding role
        elif l.kind == "norm":
            roles[l.weight] = "norm"
            if l.bias:
                roles[l.bias] = "norm"
        else:
            roles.setdefault(l.weight, l.role)
            if l.bias:
                roles[l.bias] = "bias"
    for fqn, v in g.params.items():
        if g.values[v].kind == "param":
            roles.setdefault(fqn, "other")
    return roles
