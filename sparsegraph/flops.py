"""FLOP analysis: dense and sparse FLOPs per op and per layer, parameters, roles -> a Report.

The formulas are PyTorch's own (`torch.utils.flop_counter`), applied to the ModelGraph's
canonical ops so ONNX graphs and rewritten shapes are counted exactly as `FlopCounterMode`
counts the PyTorch model (multiply-accumulate = 2 FLOPs; elementwise ops are not counted).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, conv_flop_count, mm_flop, sdpa_flop_count

from .graph import Layer, ModelGraph, Op

ShapeOf = Callable[[str], tuple[int, ...]]


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def op_flops(g: ModelGraph, op: Op, shape: ShapeOf | None = None) -> int:
    """Dense FLOPs of one op; `shape` maps a value name to its (possibly rewritten) shape."""
    shape = shape or g.shape
    if op.op == "linear":
        x, w = shape(op.ref("input")), shape(op.ref("weight"))
        return int(mm_flop((_prod(x[:-1]), x[-1]), (w[1], w[0])))
    if op.op == "addmm":
        return int(mm_flop(shape(op.ref("mat1")), shape(op.ref("mat2"))))
    if op.op == "matmul":
        a, b, y = shape(op.ref("self")), shape(op.ref("other")), shape(op.outputs[0])
        k = a[-1]
        n = a[-2] if len(a) > 1 else 1
        m = b[-1] if len(b) > 1 else 1
        batch = _prod(y) // (n * m) if n * m else 0
        return int(bmm_flop((batch, n, k), (batch, k, m)))
    if op.op == "convolution":
        return int(conv_flop_count(list(shape(op.ref("input"))), list(shape(op.ref("weight"))),
                                   list(shape(op.outputs[0])), bool(op.args.get("transposed"))))
    if op.op == "baddbmm":  # the product only, as torch's baddbmm formula (the addend is elementwise)
        return int(bmm_flop(shape(op.ref("batch1")), shape(op.ref("batch2"))))
    if op.op == "grouped_mm":
        return grouped_mm_flop(shape(op.ref("input")), shape(op.ref("weight")))
    if op.op == "scaled_dot_product_attention":  # (..., heads, length, head_dim)
        q, k, v = (_as_bhsd(shape(op.ref(n))) for n in ("query", "key", "value"))
        return int(sdpa_flop_count(q, k, v))
    return int(op.flops or 0)


def grouped_mm_flop(x_shape, w_shape, *args, **kwargs) -> int:
    """MoE experts (`aten._grouped_mm`, transformers' `grouped_mm_fallback`): every row of x (S, K) is
    multiplied by its own group's (K, N) matrix, so 2·S·K·N, whatever the split of rows between groups
    (the sum of the per-expert products `x_e @ W_e` an eager loop over experts runs)."""
    if len(x_shape) == 3:  # (G, M, K) @ (G, K, N): a plain batched product
        return int(bmm_flop(x_shape, w_shape))
    s, k = x_shape[-2], x_shape[-1]
    return 2 * int(s) * int(k) * int(w_shape[-1])


def _grouped_mm_targets() -> list:
    aten = torch.ops.aten  # FlopCounterMode looks formulas up by op packet
    targets = [aten._grouped_mm] if hasattr(aten, "_grouped_mm") else []
    try:
        targets.append(torch.ops.transformers.grouped_mm_fallback)  # registered by transformers
    except (AttributeError, RuntimeError):
        pass
    return targets


def flop_counter(display: bool = False) -> FlopCounterMode:
    """`torch.utils.flop_counter.FlopCounterMode` that also counts the grouped matmuls of MoE experts,
    for which PyTorch has no formula (it counts them as 0): the reference these FLOP counts are
    checked against. Run models under `sdpa_kernel(SDPBackend.MATH)` on CPU, whose fused attention
    kernels FlopCounterMode cannot see either."""
    return FlopCounterMode(display=display, custom_mapping={t: _counted(grouped_mm_flop)
                                                            for t in _grouped_mm_targets()})


def _counted(formula):
    def count(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return formula(x_shape, w_shape)
    return count


def _as_bhsd(t: tuple[int, ...]) -> list[int]:
    t = list(t)
    return [_prod(t[:-3]), *t[-3:]] if len(t) >= 4 else [t[0], 1, *t[1:]] if len(t) == 3 else [1, 1, *t]


@dataclass
class LayerRow:
    name: str
    op: str
    kind: str
    role: str
    weight: str
    shape: list[int]
    params: int
    density: float
    dense_flops: int
    sparse_flops: int
    family: str = ""


@dataclass
class Report:
    """The result of `sg.analyze`: per-layer and total FLOPs, parameters, roles and groups."""

    model: str
    frontend: str
    layers: list[LayerRow]
    dense_flops: int
    sparse_flops: int
    params: int
    nonzero_params: int
    other_flops: int  # FLOPs of ops without weights (attention score/value products ...)
    groups: list[dict] = field(default_factory=list)
    unknown_ops: list[str] = field(default_factory=list)
    spectral: list[dict] = field(default_factory=list)
    plan: dict | None = None
    graph: ModelGraph | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "graph"}
        d["layers"] = [asdict(r) for r in self.layers]
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, max_rows: int = 60):
        """A rich renderable: per-layer table and totals."""
        from rich.console import Group
        from rich.table import Table

        t = Table(title=f"{self.model} ({self.frontend})", show_lines=False, header_style="bold")
        for col, just in (("layer", "left"), ("kind", "left"), ("role", "left"), ("weight shape", "left"),
                          ("params", "right"), ("density", "right"), ("dense FLOPs", "right"),
                          ("sparse FLOPs", "right")):
            t.add_column(col, justify=just)
        rows = self.layers if len(self.layers) <= max_rows else self.layers[:max_rows // 2] + [None] + self.layers[-max_rows // 2:]
        for r in rows:
            if r is None:
                t.add_row(f"... {len(self.layers) - max_rows} more", *[""] * 7)
                continue
            t.add_row(r.name, r.kind + (f"/{r.family}" if r.family else ""), r.role, "×".join(map(str, r.shape)),
                      human(r.params), f"{r.density:.3f}", human(r.dense_flops), human(r.sparse_flops))
        totals = Table.grid(padding=(0, 2))
        totals.add_row("dense FLOPs", human(self.dense_flops), f"({self.dense_flops:,})")
        totals.add_row("sparse FLOPs", human(self.sparse_flops), f"({self.sparse_flops:,})")
        totals.add_row("non-weight FLOPs", human(self.other_flops), "(attention products etc., dense)")
        totals.add_row("parameters", human(self.params), f"nonzero {human(self.nonzero_params)}")
        widen = [g for g in self.groups if not g["fixed"]]
        totals.add_row("dimension groups", f"{len(self.groups)}", f"{len(widen)} widenable")
        parts = [t, totals]
        if self.unknown_ops:
            parts.append(f"[yellow]ops without dimension rules (axes kept fixed): {', '.join(self.unknown_ops)}")
        if self.spectral:
            s = Table(title="mask spectra", header_style="bold")
            for col in ("layer", "d_left", "d_right", "mu", "ramanujan gap", "weighted gap"):
                s.add_column(col, justify="left" if col == "layer" else "right")
            for r in self.spectral:
                s.add_row(r["layer"], f"{r['d_left']:.1f}", f"{r['d_right']:.1f}", f"{r['mu']:.3f}",
                          f"{r['ramanujan_gap']:.3f}", f"{r['weighted_gap']:.3f}")
            parts.append(s)
        return Group(*parts)

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, file=io.StringIO(), color_system=None)
        console.print(self.table())
        return console.file.getvalue()


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def layer_density(g: ModelGraph, layer: Layer) -> float:
    """Density of a layer's weight: from its mask buffer (weight * mask in the graph), else 1."""
    op = g.ops[layer.op]
    spec_key = {"linear": "weight", "addmm": "mat2", "convolution": "weight", "matmul": "other",
                "grouped_mm": "weight"}.get(op.op)
    ref = op.ref(spec_key) if spec_key else None
    seen = 0
    while ref and seen < 8:
        prod = g.producer(ref)
        if prod is None:
            break
        if prod.op == "mask_mul":
            mask = g.values[prod.ref("mask")]
            tensor = g.tensor(mask.param)
            if tensor is not None and not tensor.is_meta:
                return float(tensor.count_nonzero()) / max(tensor.numel(), 1)
            break
        ref = prod.inputs[0] if prod.inputs else None
        seen += 1
    return 1.0
