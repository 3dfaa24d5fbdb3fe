"""SparsityPlan: the planning result as pure, versioned, JSON-serialisable data.

The plan is the single place where a rewrite's decisions live: per dimension group its new size,
per weight its family, shapes, role, density, mask and FLOPs, the constants patched in the
graph, totals, and (filled by later passes) SμPar multipliers, dynamic-sparsity history and
lowering choices. Emitters only apply it; the CLI prints it; checkpoints and ONNX metadata carry it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch.nn as nn

SCHEMA_VERSION = 1
FAMILIES = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")


@dataclass
class GroupPlan:
    id: int
    sizes: list[list[int]]  # [[old, new], ...] for every distinct member size
    factor: float  # achieved widening of the group's unit
    unit: list[int]  # [old, new]: every member size is a multiple (its scale) of the unit
    params: list[str]  # "fqn[axis]" of the parameter axes in the group


@dataclass
class WeightPlan:
    name: str  # parameter fqn in the rewritten model
    source: str  # parameter fqn in the original model it replaces or widens
    layer: str  # layer display name (module path)
    op: str  # op node (in the captured original graph) that reads the weight
    family: str  # sparse_wide | sparse_parallel | sparse_factorized | sparse_doped | dense
    part: str  # weight | branch<i> | u | v | s | bias | norm | embedding | other
    role: str  # stem | hidden | head | embedding | norm | bias | other
    kind: str  # linear | conv | embedding | norm | bias | other
    shape: list[int]
    orig_shape: list[int]
    out_axis: int | None
    in_axes: list[int]
    fan_in: int  # new fan-in (product of in axes) and the original layer's fan-in
    orig_fan_in: int
    fan_out: int
    orig_fan_out: int
    density: float
    mask: str  # mask kind, or "none" for dense weights
    seed: int
    dense_flops: int  # FLOPs of the products this weight takes part in, dense
    sparse_flops: int  # the same with the mask's density
    supar: dict = field(default_factory=dict)  # SμPar multipliers (filled by the SμPar pass)
    batch_axes: list[int] = field(default_factory=list)  # axes of independent matrices (MoE experts): each
    #                                                     slice is masked on its own, at the same density
    base_init: dict = field(default_factory=dict)  # the dense original's init of the source weight, read
    #                                              from its values: {"dist": normal|uniform|zeros|ones|..., "std"}

    @property
    def sparse(self) -> bool:
        return self.mask != "none"


@dataclass
class SparsityPlan:
    model: str
    transform: str
    sparsity: float  # as requested
    sparsity_used: float  # hidden-layer sparsity after the iso-FLOP search (Sparse Wide)
    mask: str
    seed: int
    options: dict
    groups: list[GroupPlan]
    weights: list[WeightPlan]
    patches: list[dict]  # {"op", "key", "index", "old", "new"}
    totals: dict  # original_dense_flops, dense_flops, sparse_flops, params, nonzero_params, ...
    version: int = SCHEMA_VERSION
    notes: list[str] = field(default_factory=list)
    supar: dict = field(default_factory=dict)  # base hyperparameters and parameterisation
    history: list[dict] = field(default_factory=list)  # dynamic sparse training mask updates
    lowering: dict = field(default_factory=dict)  # per-layer kernel choices
    source: dict = field(default_factory=dict)  # recipe of the dense original (sparsegraph.io.source_of)
    tables: list[dict] = field(default_factory=list)  # size-derived buffers recomputed at their new size:
    #                      {"name", "rule", "params", "orig_shape", "shape"} (see sparsegraph/tables.py)

    # -- queries ------------------------------------------------------------------------------
    def weight(self, name: str) -> WeightPlan:
        for w in self.weights:
            if w.name == name:
                return w
        raise KeyError(name)

    @property
    def sparse_weights(self) -> list[WeightPlan]:
        return [w for w in self.weights if w.sparse]

    @property
    def flops_ratio(self) -> float:
        return self.totals["sparse_flops"] / self.totals["original_dense_flops"]

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparsityPlan:
        version = d.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"sparsity plan schema version {version} is not supported (expected {SCHEMA_VERSION})")
        d = dict(d)
        d["groups"] = [GroupPlan(**g) for g in d["groups"]]
        d["weights"] = [WeightPlan(**w) for w in d["weights"]]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> SparsityPlan:
        return cls.from_dict(json.loads(text))

    def table(self, max_rows: int = 60):
        """A rich renderable: per-weight shapes before/after, density, FLOPs, and the totals."""
        from rich.console import Group
        from rich.table import Table

        from .flops import human

        t = Table(title=f"{self.model}: {self.transform}, sparsity {self.sparsity:g}, mask {self.mask}",
                  header_style="bold")
        for col, just in (("weight", "left"), ("part", "left"), ("role", "left"), ("shape", "left"),
                          ("was", "left"), ("density", "right"), ("dense FLOPs", "right"),
                          ("sparse FLOPs", "right")):
            t.add_column(col, justify=just)
        rows = [w for w in self.weights if w.kind in ("linear", "conv")]
        shown = rows if len(rows) <= max_rows else rows[:max_rows // 2] + [None] + rows[-max_rows // 2:]
        for w in shown:
            if w is None:
                t.add_row(f"... {len(rows) - max_rows} more", *[""] * 7)
                continue
            t.add_row(w.name, w.part if w.family != "dense" else "dense", w.role, "×".join(map(str, w.shape)),
                      "×".join(map(str, w.orig_shape)), f"{w.density:.4f}", human(w.dense_flops),
                      human(w.sparse_flops))
        tot = self.totals
        totals = Table.grid(padding=(0, 2))
        totals.add_row("original dense FLOPs", f"{tot['original_dense_flops']:,}")
        totals.add_row("rewritten sparse FLOPs", f"{tot['sparse_flops']:,}", f"({self.flops_ratio:.4f}x original)")
        totals.add_row("rewritten dense FLOPs", f"{tot['dense_flops']:,}")
        totals.add_row("parameters", f"{tot['params']:,}", f"nonzero {tot['nonzero_params']:,}; "
                       f"original {tot['original_params']:,}")
        totals.add_row("hidden sparsity used", f"{self.sparsity_used:.4f}")
        parts = [t, totals]
        if self.groups:
            grp = Table(title="widened dimension groups", header_style="bold")
            for col in ("group", "sizes", "parameters"):
                grp.add_column(col)
            for gp in self.groups:
                grp.add_row(f"g{gp.id}", ", ".join(f"{a}->{b}" for a, b in gp.sizes),
                            ", ".join(gp.params[:3]) + (f" +{len(gp.params) - 3}" if len(gp.params) > 3 else ""))
            parts.append(grp)
        parts += [f"note: {n}" for n in self.notes]
        return Group(*parts)

    def summary(self) -> str:
        t = self.totals
        return (f"{self.model} {self.transform} s={self.sparsity:g} (hidden s used {self.sparsity_used:.4f}): "
                f"sparse FLOPs {t['sparse_flops']:,} vs original dense {t['original_dense_flops']:,} "
                f"({self.flops_ratio:.4f}x), params {t['params']:,} ({t['nonzero_params']:,} nonzero)")


# ---------------------------------------------------------------------------------------------
# the plan travels with its model: a submodule whose extra state is the plan's JSON, so
# state_dict, torch.save, copy.deepcopy and DistributedDataParallel all carry it
# ---------------------------------------------------------------------------------------------
PLAN_MODULE = "sparsegraph_plan"


def branch_norm_path(path: str, branch: int) -> str:
    """Module path of Sparse Parallel branch `branch`'s own copy of the BatchNorm at `path` (branch 0 keeps it)."""
    return path if branch == 0 else f"{path}.branch{branch}"


ONNX_PLAN_KEY = "sparsegraph.plan"  # metadata_props key of ONNX models written by sparsegraph


class PlanHolder(nn.Module):
    def __init__(self, plan: SparsityPlan | None = None):
        super().__init__()
        self.plan = plan

    def forward(self, x):
        """Passes its input through: a root `nn.Sequential` runs every child in order, this one included."""
        return x

    def get_extra_state(self) -> str:
        return self.plan.to_json(indent=None) if self.plan is not None else ""

    def set_extra_state(self, state: str) -> None:
        self.plan = SparsityPlan.from_json(state) if state else None


def attach_plan(model, plan: SparsityPlan) -> None:
    """Attach `plan` to `model` (as `model.plan` and in its state_dict)."""
    holder = getattr(model, PLAN_MODULE, None)
    if not isinstance(holder, PlanHolder):
        model.add_module(PLAN_MODULE, PlanHolder(plan))
    else:
        holder.plan = plan
    model.plan = plan


def plan_of(model) -> SparsityPlan | None:
    """The plan of a sparsegraph model, also through DDP/compile wrappers and after load_state_dict."""
    from .unwrap import unwrap

    for m in (model, unwrap(model)) if isinstance(model, nn.Module) else (model,):
        holder = getattr(m, PLAN_MODULE, None)
        if isinstance(holder, PlanHolder) and holder.plan is not None:
            if getattr(m, "plan", None) is not holder.plan:
                object.__setattr__(m, "plan", holder.plan)
            return holder.plan
    meta = getattr(model, "metadata_props", None)  # an onnx_ir.Model: the plan travels in its metadata
    if isinstance(meta, dict) and ONNX_PLAN_KEY in meta:
        return SparsityPlan.from_json(meta[ONNX_PLAN_KEY])
    return getattr(model, "plan", None)
