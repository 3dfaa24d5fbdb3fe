"""`sg.supar`: SμPar, μP and standard parameterisation for sparsegraph models, and the coordinate check.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=1, n_embd=32, n_head=2)
    >>> model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, width=2.0)
    >>> model = sg.supar.annotate(model, "supar", sigma_base=0.02)
    >>> model = sg.supar.init_(model)
    >>> opt = torch.optim.AdamW(sg.supar.param_groups(model, lr=3e-3, weight_decay=0.1))

The coordinate check trains every (parameterisation, width, sparsity) for a few steps and records
the RMS of every layer's output and its change since step 0:

    >>> cc = sg.supar.coord_check(spec.model, spec.example_inputs, widths=(1, 2), sparsities=(0.0, 0.75),
    ...                           parameterizations=("sp", "supar"), steps=2)
    >>> sorted({r["parameterization"] for r in cc.rows})
    ['sp', 'supar']
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .passes.supar import ATTENTION_RULES, HOLDER, PARAMETERIZATIONS, PRESETS, SuparError, _weight_op
from .plan import plan_of
from .train.supar import (OPTIMIZERS, annotate, check_graph, check_optimizer, init_, make_optimizer, multipliers,
                          param_groups, table)

__all__ = ["annotate", "init_", "param_groups", "multipliers", "table", "check_graph", "coord_check",
           "CoordCheck", "PARAMETERIZATIONS", "PRESETS", "OPTIMIZERS", "ATTENTION_RULES", "SuparError"]


# ---------------------------------------------------------------------------------------------
# coordinate check
# ---------------------------------------------------------------------------------------------
def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the outputs of the watched nodes (autograd flows through)."""

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, str]):
        super().__init__(gm)
        self.watch, self.seen = watch, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch and isinstance(out, torch.Tensor):
            self.seen[self.watch[n]] = out.detach()
        return out


def _watched(gm: fx.GraphModule) -> tuple[dict[fx.Node, str], dict[str, str]]:
    """Every op that reads a planned weight (after its α_in multiplier, if any): node -> label, label -> class."""
    plan = plan_of(gm)
    by_name = {w.name: w for w in plan.weights}
    shapes = {w.name: w.shape for w in plan.weights}
    ops = [op for op in (_weight_op(n, shapes) for n in gm.graph.nodes) if op is not None]
    uses: dict[str, int] = {}
    for op in ops:
        uses[op.weight] = uses.get(op.weight, 0) + 1
    watch, classes = {}, {}
    for op in ops:
        node = op.node
        users = list(node.users)
        if len(users) == 1 and any(a.op == "get_attr" and str(a.target).startswith(HOLDER + ".")
                                   for a in users[0].all_input_nodes):
            node = users[0]  # the input layer's output as the network sees it (× α_in)
        kind = "embedding" if op.embedding else "matmul"
        label = op.weight if uses[op.weight] == 1 else f"{op.weight}[{kind}]"
        cls = by_name[op.weight].supar.get("class", "?")
        if uses[op.weight] > 1:  # a tied embedding: its lookup is the input layer, its matmul the readout
            cls = "input" if op.embedding else "output"
        watch[node] = label
        classes[label] = cls
    return watch, classes


def _default_data(model: nn.Module, example_inputs: tuple, seed: int):
    """Fixed inputs (the example inputs) and fixed random class targets of the output's shape."""
    with torch.no_grad():
        out = model(*example_inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    gen = torch.Generator().manual_seed(seed + 10_007)  # not the stream the example inputs may come from
    targets = torch.randint(0, out.shape[-1], out.shape[:-1], generator=gen)
    return lambda step: (example_inputs, targets)


def _default_loss(out, targets):
    out = out[0] if isinstance(out, (tuple, list)) else out
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), targets.reshape(-1))


@dataclass
class CoordCheck:
    """Rows: parameterization, width, sparsity, density, step, layer, class, act_rms, delta_rms."""
    rows: list[dict]
    steps: int
    png: str | None = None
    meta: dict = field(default_factory=dict)

    def summary(self, step: int | None = None) -> list[dict]:
        """Per (parameterisation, width, sparsity): mean activation / change RMS per layer class."""
        step = self.steps if step is None else step
        out: dict[tuple, dict] = {}
        for r in self.rows:
            if r["step"] != step:
                continue
            key = (r["parameterization"], r["width"], r["sparsity"])
            row = out.setdefault(key, {"parameterization": key[0], "width": key[1], "sparsity": key[2],
                                       "density": r["density"], "_acc": {}})
            acc = row["_acc"].setdefault(r["class"], [])
            acc.append((r["act_rms"], r["delta_rms"]))
        result = []
        for row in out.values():
            acc = row.pop("_acc")
            for cls, vals in sorted(acc.items()):
                row[f"{cls}_act"] = sum(v[0] for v in vals) / len(vals)
                row[f"{cls}_delta"] = sum(v[1] for v in vals) / len(vals)
            result.append(row)
        return result

    def table(self, step: int | None = None):
        from rich.table import Table

        rows = self.summary(step)
        t = Table(title=f"coordinate check: mean RMS per layer class after {self.steps if step is None else step} "
                        "step(s) (act = activation, Δ = change since step 0)", header_style="bold")
        cols = [c for c in rows[0] if c not in ("parameterization",)] if rows else []
        t.add_column("parameterization")
        for c in cols:
            t.add_column(c.replace("_delta", " Δ").replace("_act", " act"), justify="right")
        for r in rows:
            t.add_row(r["parameterization"], *[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
        return t

    def plot(self, path: str) -> str:
        """Hidden-layer activation RMS against sparsity and width, one panel per parameterisation and
        sweep, one line per training step (flat lines = the parameterisation holds)."""
        try:
            import matplotlib
        except ImportError as e:
            raise SuparError("the coordinate-check plot needs matplotlib (pip install matplotlib)") from e
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from .fsutil import atomic_write

        params = list(dict.fromkeys(r["parameterization"] for r in self.rows))
        widths = sorted({r["width"] for r in self.rows})
        sparsities = sorted({r["sparsity"] for r in self.rows})
        axes_spec = [("sparsity", widths[0], sparsities)] if len(sparsities) > 1 else []
        if len(widths) > 1:
            axes_spec.append(("width", sparsities[0], widths))
        if not axes_spec:
            axes_spec = [("sparsity", widths[0], sparsities)]
        fig, axes = plt.subplots(len(axes_spec), len(params), figsize=(4.2 * len(params), 3.4 * len(axes_spec)),
                                 squeeze=False, sharey="row")
        hidden = {r["class"] for r in self.rows}
        cls = "hidden" if "hidden" in hidden else sorted(hidden)[0]
        for i, (knob, fixed, xs) in enumerate(axes_spec):
            other = "width" if knob == "sparsity" else "sparsity"
            for j, p in enumerate(params):
                ax = axes[i][j]
                for step in range(self.steps + 1):
                    ys = []
                    for x in xs:
                        vals = [r["act_rms"] for r in self.rows if r["parameterization"] == p and r[knob] == x
                                and r[other] == fixed and r["step"] == step and r["class"] == cls]
                        ys.append(sum(vals) / len(vals) if vals else float("nan"))
                    ax.plot(xs, ys, marker="o", label=f"step {step}")
                ax.set_yscale("log")
                if knob == "width":
                    ax.set_xscale("log")
                    ax.set_xticks(xs, [f"{x:g}" for x in xs])
                    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_title(f"{p}: {knob} sweep ({other} {fixed:g})", fontsize=10)
                ax.set_xlabel(knob)
                if j == 0:
                    ax.set_ylabel(f"{cls} activation RMS")
                ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()

        def write(tmp):
            fig.savefig(tmp, dpi=110, format="png")
        atomic_write(path, write)
        plt.close(fig)
        self.png = path
        return path


def coord_check(model: nn.Module, example_inputs: Any, *, widths=(1, 2, 4), sparsities=(0.0, 0.5, 0.75, 0.875),
                parameterizations=("sp", "mup", "supar"), steps: int = 3, lr: float = 1e-2,
                optimizer: str = "adam", grid: bool = False, mask: str = "uniform", seed: int = 0,
                data: Callable[[int], tuple] | None = None, loss_fn: Callable | None = None,
                png: str | None = None, progress: bool = False, **annotate_kwargs) -> CoordCheck:
    """Coordinate check of a dense base model under each parameterisation.

    For every width (Sparse Wide `width=k`) and sparsity, and every parameterisation: rewrite,
    annotate, initialise, then take `steps` optimizer steps with learning rate `lr` on a fixed batch
    (`data(step) -> (inputs, targets)`, default: the example inputs and fixed random class targets,
    cross-entropy loss), recording the RMS of every weight-reading op's output and its change
    since step 0. By default the sweep is a cross (widths at sparsities[0], sparsities at widths[0]);
    `grid=True` runs every pair. Returns a `CoordCheck` (rows, `.table()`, `.plot(png)`).
    """
    from .capture import _as_tuple, capture
    from .sparsify import sparsify

    if steps < 1:
        raise SuparError(f"steps must be at least 1, got {steps}")
    for p in parameterizations:
        if p not in PARAMETERIZATIONS:
            raise SuparError(f"unknown parameterization {p!r}; choose from {', '.join(PARAMETERIZATIONS)}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise SuparError(f"lr must be a positive number, got {lr!r}")
    check_optimizer(optimizer)
    inputs = _as_tuple(example_inputs)
    points = [(w, s) for w in widths for s in sparsities] if grid else list(dict.fromkeys(
        [(w, sparsities[0]) for w in widths] + [(widths[0], s) for s in sparsities]))
    g = capture(model, inputs)
    rows: list[dict] = []
    total, done = len(points) * len(parameterizations), 0
    for width, sparsity in points:
        base = sparsify(model, inputs, "sparse_wide", sparsity, mask=mask, seed=seed, width=float(width), graph=g,
                        output="graph")  # the check watches graph nodes
        feed = data or _default_data(base, inputs, seed)
        lossf = loss_fn or _default_loss
        density = base.plan.sparse_weights[0].density if base.plan.sparse_weights else 1.0
        for p in parameterizations:
            m = annotate(copy.deepcopy(base), p, example_inputs=inputs, **annotate_kwargs)
            init_(m, seed=seed)
            opt = make_optimizer(optimizer, param_groups(m, lr, optimizer=optimizer), lr)
            watch, classes = _watched(m)
            first: dict[str, torch.Tensor] = {}
            for step in range(steps + 1):
                x, y = feed(step)
                rec = _Recorder(m, watch)
                out = rec.run(*_as_tuple(x))
                for label, act in rec.seen.items():
                    first.setdefault(label, act)
                    delta = _rms(act - first[label]) if act.shape == first[label].shape else float("nan")
                    rows.append({"parameterization": p, "width": width, "sparsity": sparsity, "density": density,
                                 "step": step, "layer": label, "class": classes[label], "act_rms": _rms(act),
                                 "delta_rms": delta})
                if step < steps:
                    opt.zero_grad(set_to_none=True)
                    loss = lossf(out, y)
                    if not torch.isfinite(loss):
                        raise SuparError(f"coord_check: loss is {float(loss.detach())} at step {step} ({p}, "
                                         f"width {width}, sparsity {sparsity}); lower lr")
                    loss.backward()
                    opt.step()
            done += 1
            if progress:
                print(f"coord-check {done}/{total}: {p} width {width:g} sparsity {sparsity:g}", file=sys.stderr)
    result = CoordCheck(rows, steps, meta={"lr": lr, "optimizer": optimizer, "mask": mask, "seed": seed,
                                           **{k: v for k, v in annotate_kwargs.items()}})
    if png:
        result.plot(png)
    return result
