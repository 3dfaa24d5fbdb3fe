"""SμPar for training: annotate a sparsegraph model, initialise it, and build optimizer groups.

Everything is read from the model's plan (`sg.plan_of(model)`), so it survives `sg.save`/`sg.load`,
`copy.deepcopy`, `load_state_dict` and DDP wrapping. See `sparsegraph.passes.supar` for the table.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=1, n_embd=32, n_head=2)
    >>> model = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, width=2.0)
    >>> model = sg.supar.annotate(model, "supar")
    >>> model = sg.supar.init_(model)
    >>> groups = sg.supar.param_groups(model, lr=1e-2, weight_decay=0.1, optimizer="adamw")
    >>> opt = torch.optim.AdamW(groups)
    >>> w = model.plan.weight("h.0.mlp.c_fc.weight").supar      # m_d = 2, m_rho = 0.25
    >>> w["class"], w["lr"]["adamw"]                            # lr = 1e-2 * 1 / (2 * 0.25)
    ('hidden', [1.0, 0.5])
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from ..backends.sparse_linear import block_rows
from ..io import sync_config
from ..masks import layer_seed
from ..passes.lower import pack_weight
from ..passes.manager import PassManager
from ..passes.supar import HOLDER, PARAMETERIZATIONS, PRESETS, SuparError, annotate_plan, supar_pass
from ..passes.supar_module import apply_supar_module, forward_sites
from ..plan import SparsityPlan, plan_of
from ..unwrap import unwrap, unwrapped_name

OPTIMIZERS = ("adamw", "adam", "sgd")


def make_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    """The torch optimizer `name` (one of OPTIMIZERS, any case) over `param_groups(...)`'s groups."""
    name = check_optimizer(name)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, lr=lr)


def check_optimizer(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise SuparError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return name.lower()
def _plan(model: nn.Module, annotated: bool = True) -> SparsityPlan:
    if not isinstance(model, nn.Module):
        raise SuparError(f"expected a torch.nn.Module, got {type(model).__name__}")
    plan = plan_of(model)
    if plan is None:
        raise SuparError(f"{type(model).__name__} has no sparsity plan: sg.supar works on models made by "
                         "sg.sparsify (or loaded with sg.load); for a dense model use "
                         "sg.sparsify(model, inputs, 'sparse_wide', 0.0, width=1.0)")
    if annotated and not (plan.supar or {}).get("parameterization"):
        raise SuparError(f"{plan.model}: the plan has no SμPar annotation; call sg.supar.annotate(model) first")
    return plan


def annotate(model: nn.Module, parameterization: str | None = "supar", *, sigma_base: float | None = None,
             alpha_in: float | None = None, alpha_out: float | None = None, alpha_attn: float | None = None,
             eta_base: float | None = None, preset: str | None = None, example_inputs=None) -> nn.Module:
    """Annotate `model` (in place) for "supar", "mup" or "sp" and rewrite its graph; returns it.

    Writes per-weight multipliers into the plan (`plan.weight(name).supar`) and the base
    hyperparameters into `plan.supar`, then inserts the forward multipliers (input ops × α_in,
    readout input × α_out/m_d) and sets every attention logit scale to α_attn/d_head ("sp" inserts
    nothing and restores the original scales). `sigma_base=None` means PyTorch's default
    initialisation of the base (dense, un-widened) model; `preset` fills unset base hyperparameters
    from `PRESETS` ("cerebras-gpt", "btlm"). `parameterization=None` re-applies the settings already
    in the plan (e.g. to a fresh model that received an annotated state_dict with strict=False).
    `example_inputs` (default: `model.example_inputs`, which `copy.deepcopy` of a GraphModule drops)
    are run on fake tensors to read d_head for the attention scale.

    >>> import sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=1, n_embd=32, n_head=2)
    >>> m = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.5, width=2.0)
    >>> m = sg.supar.annotate(m, "mup", alpha_out=2.0)
    >>> [f["value"] for f in m.plan.supar["forward"] if f["site"] == "output"]   # alpha_out / m_d
    [1.0]
    """
    gm = unwrap(model)
    plan = _plan(gm, annotated=parameterization is None)
    if preset is not None:
        if preset not in PRESETS:
            raise SuparError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        p = PRESETS[preset]
        sigma_base = p["sigma_base"] if sigma_base is None else sigma_base
        eta_base = p["eta_base"] if eta_base is None else eta_base
        alpha_in = p["alpha_in"] if alpha_in is None else alpha_in
        alpha_out = p["alpha_out"] if alpha_out is None else alpha_out
    if parameterization is None:
        hp = plan.supar
        parameterization, sigma_base, eta_base = hp["parameterization"], hp["sigma_base"], hp["eta_base"]
        alpha_in, alpha_out, alpha_attn = hp["alpha_in"], hp["alpha_out"], hp["alpha_attn"]
    alpha_in, alpha_out, alpha_attn = (1.0 if a is None else a for a in (alpha_in, alpha_out, alpha_attn))
    annotate_plan(plan, parameterization, sigma_base, alpha_in, alpha_out, alpha_attn, eta_base)
    if plan.history and parameterization == "supar":  # known limit (DESIGN.md section 4)
        note = (f"{len(plan.history)} dynamic-sparsity mask update(s) in the plan: SμPar assumes random static "
                "masks; masks chosen by magnitude or gradient (RigL, GMP) are not random and SμPar over-corrects")
        plan.supar["notes"] = [note]
        warnings.warn(note)
    apply_forward(gm, example_inputs)
    sync_config(gm)  # a Hugging Face config carries the annotated plan
    return model


def apply_forward(model: nn.Module, example_inputs=None) -> None:
    """Apply the plan's SμPar forward part: rewrite the graph form, or hook the module form
    (decided on its graph and verified against it: `passes/supar_module.py`)."""
    from ..capture import _as_tuple

    gm = unwrap(model)
    plan = _plan(gm)
    inputs = _as_tuple(example_inputs) if example_inputs is not None else getattr(gm, "example_inputs", None)
    if isinstance(gm, fx.GraphModule):
        PassManager([supar_pass(plan, inputs)])(gm)
    else:
        apply_supar_module(gm, plan, inputs)


def check_graph(model: nn.Module) -> None:
    """Fail loudly if the graph's forward multipliers disagree with the plan (a fresh model that
    received an annotated plan through load_state_dict(strict=False) but was never annotated)."""
    gm = unwrap(model)
    plan = _plan(gm)
    if not isinstance(gm, fx.GraphModule):
        have = {(f["site"], f["weight"]): f["value"] for f in forward_sites(gm)}
        for site in plan.supar.get("forward", []):
            value = have.get((site["site"], site["weight"]))
            if value is None or not math.isclose(value, site["value"], rel_tol=1e-6):
                raise SuparError(f"{plan.model}: the plan asks for a forward multiplier {site['value']:g} at "
                                 f"{site['weight']} but the model has {'none' if value is None else value}; "
                                 "call sg.supar.annotate(model, None) to apply the plan's parameterisation")
        return
    for site in plan.supar.get("forward", []):
        try:
            buf = gm.get_buffer(site["buffer"])
        except AttributeError:
            buf = None
        if buf is None or not math.isclose(float(buf), site["value"], rel_tol=1e-6):
            raise SuparError(f"{plan.model}: the plan asks for a forward multiplier {site['value']:g} at "
                             f"{site['weight']} but the graph has {'none' if buf is None else float(buf)}; "
                             "call sg.supar.annotate(model, None) to apply the plan's parameterisation")


def init_(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Re-initialise every planned parameter with its SμPar/μP/SP distribution (in place).

    Each parameter draws from its own generator, seeded from (seed or plan seed, name), so the
    result does not depend on parameter order and is the same on every rank. A weight `sg.lower`
    stores as blocks (`<name>_values`) draws the same numbers and keeps those on its stored blocks,
    so the masked and the lowered form of a model initialise alike.

    >>> import sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=1, n_embd=32, n_head=2)
    >>> m = sg.supar.annotate(sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, width=1.0),
    ...                       sigma_base=0.02)
    >>> m = sg.supar.init_(m)
    >>> round(m.plan.weight("h.0.attn.c_attn.weight").supar["init"]["std"], 4)   # 0.02 / sqrt(0.25)
    0.04
    """
    gm = unwrap(model)
    plan = _plan(gm)
    check_graph(gm)
    base_seed = plan.seed if seed is None else seed
    with torch.no_grad():
        for w in plan.weights:
            init = w.supar.get("init", {"dist": "keep"})
            if init["dist"] == "keep":
                continue
            lowered = _lowered(gm, w.name)
            p = gm.get_parameter(w.name) if lowered is None else lowered[0]
            shape = tuple(w.shape) if lowered is not None else p.shape
            gen = torch.Generator().manual_seed(layer_seed(base_seed, w.name + ":supar"))
            if init["dist"] == "ones":
                t = torch.ones(shape)
            elif init["dist"] == "zeros":
                t = torch.zeros(shape)
            elif init["dist"] == "normal":
                t = torch.randn(shape, generator=gen) * init["std"]
            else:  # uniform with standard deviation std: U(±√3·std)
                t = (torch.rand(shape, generator=gen) * 2 - 1) * (math.sqrt(3) * init["std"])
            if lowered is not None:  # the stored blocks of t's matrix view (padding at ragged edges stays zero)
                values, crow, col = lowered
                t = pack_weight(t, block_rows(crow), col.long().cpu(), values.shape[-1], transpose=w.out_axis == 1)
            p.copy_(t.to(p.dtype))
    return model


def _lowered(gm: nn.Module, name: str) -> tuple[nn.Parameter, torch.Tensor, torch.Tensor] | None:
    """(values, crow, col) of plan weight `name` if `sg.lower` stored it as blocks, else None."""
    try:
        return gm.get_parameter(name + "_values"), gm.get_buffer(name + "_crow"), gm.get_buffer(name + "_col")
    except AttributeError:
        return None


def param_groups(model: nn.Module, lr: float | None = None, weight_decay: float = 0.0,
                 optimizer: str = "adamw", decay_1d: bool = False) -> list[dict]:
    """Optimizer parameter groups with per-parameter SμPar learning rates and weight decays.

    Adam/AdamW: hidden weights η/(m_d·m_ρ); SGD: hidden η·(m_out/m_in)/m_ρ, vector-like η·m_d.
    Weight decay is multiplied by the factor that divides the learning rate (as mup does), so the
    decoupled decay per step lr·wd does not change with width or density. Parameters of at most one
    dimension (biases, norm gains) get no weight decay, as in nanoGPT and Hugging Face's `Trainer`;
    `decay_1d=True` decays them too (as mup's optimizers do). Every group carries the parameter
    names under "names". `lr=None` uses the plan's eta_base. A weight `sg.lower` stores as blocks
    (`<name>_values`) gets the multipliers of its plan weight `<name>`.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=1, n_embd=32, n_head=2)
    >>> m = sg.supar.annotate(sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.5, width=2.0))
    >>> groups = sg.supar.param_groups(m, lr=1e-3, weight_decay=0.1)
    >>> opt = torch.optim.AdamW(groups)
    >>> sorted({g["lr"] for g in groups})   # hidden: 1e-3 / (2 * 0.5); everything else 1e-3
    [0.001]
    """
    optimizer = check_optimizer(optimizer)
    plan = _plan(unwrap(model))
    check_graph(model)
    if lr is None:
        lr = plan.supar.get("eta_base")
        if lr is None:
            raise SuparError("param_groups needs lr (the plan has no eta_base)")
    for name, v in (("lr", lr), ("weight_decay", weight_decay)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise SuparError(f"{name} must be a non-negative number, got {v!r}")
    by_name = {w.name: w for w in plan.weights}
    groups: dict[tuple[float, float], dict] = {}
    unplanned = []
    for full, p in model.named_parameters():
        name = unwrapped_name(full)
        w = by_name.get(name)
        if w is None and name.endswith("_values"):  # a lowered weight's stored blocks
            w = by_name.get(name.removesuffix("_values"))
        if w is None:
            unplanned.append(name)
            num, den = 1.0, 1.0
        else:
            num, den = w.supar["lr"][optimizer]
        wd = weight_decay if decay_1d or p.dim() >= 2 else 0.0  # biases and norm gains: no decay by default
        key = ((lr * num) / den, (wd * den) / num)  # lr·num/den, wd·den/num: mup's arithmetic
        g = groups.setdefault(key, {"params": [], "lr": key[0], "weight_decay": key[1], "names": []})
        g["params"].append(p)
        g["names"].append(name)
    if unplanned:
        warnings.warn(f"{len(unplanned)} parameter(s) not in the plan use the base learning rate: "
                      f"{', '.join(unplanned[:5])}" + (" ..." if len(unplanned) > 5 else ""))
    return list(groups.values())


def multipliers(model: nn.Module) -> list[dict]:
    """One row per planned parameter: class, m_d, m_ρ, init std, LR factors (for tables and tests)."""
    plan = _plan(unwrap(model))
    rows = []
    for w in plan.weights:
        s = w.supar
        rows.append({"name": w.name, "class": s["class"], "m_d": s["m_d"], "m_rho": s["m_rho"],
                     "init": s["init"]["dist"], "init_std": s["init"]["std"],
                     "adam_lr": s["lr"]["adam"][0] / s["lr"]["adam"][1],
                     "sgd_lr": s["lr"]["sgd"][0] / s["lr"]["sgd"][1]})
    return rows


def table(model: nn.Module):
    """A rich table of `multipliers(model)` and the forward multipliers."""
    from rich.console import Group
    from rich.table import Table

    plan = _plan(unwrap(model))
    hp = plan.supar
    t = Table(title=f"{plan.model}: {hp['parameterization']} (σ_base {hp['sigma_base']}, α_in {hp['alpha_in']:g}, "
                    f"α_out {hp['alpha_out']:g})", header_style="bold")
    for col in ("parameter", "class", "m_d", "m_ρ", "init", "init std", "Adam LR ×", "SGD LR ×"):
        t.add_column(col, justify="left" if col in ("parameter", "class", "init") else "right",
                     no_wrap=col == "parameter")
    for r in multipliers(model):
        t.add_row(r["name"], r["class"], f"{r['m_d']:.4g}", f"{r['m_rho']:.4g}", r["init"], f"{r['init_std']:.4g}",
                  f"{r['adam_lr']:.4g}", f"{r['sgd_lr']:.4g}")
    fwd = Table(title="forward multipliers", header_style="bold")
    for col in ("site", "weight", "value"):
        fwd.add_column(col)
    for f in hp.get("forward", []):
        fwd.add_row(f["site"], f["weight"], f"{f['value']:.4g}")
    for a in hp.get("attention", []):
        fwd.add_row(f"attention ({a['rule']})", f"d_head {a['d_head']}", f"{a['new']:.4g} (was {a['old']})")
    return Group(t, fwd)


__all__ = ["OPTIMIZERS", "PARAMETERIZATIONS", "PRESETS", "SuparError", "annotate", "check_graph", "init_",
           "param_groups", "multipliers", "table", "HOLDER"]
