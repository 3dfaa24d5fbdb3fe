"""Size-derived constant tables: buffers computed from a width, recomputed when the width grows.

A buffer is normally a fixed constant of the model: the dimension analysis keeps every axis it
touches at its size. Some buffers are not data but a formula of a size; freezing them would freeze
that size (rotary tables would pin every attention head dimension). Each rule here recognises
such a buffer from its values and regenerates it at a new size with the same parameters, so the
dimension analysis may tie its axis to a width group and the emitter recomputes it.

`TABLE_RULES` is the table: name -> (recognise(tensor) -> params | None, make(params, shape) -> tensor).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def _rope_params(t: torch.Tensor) -> dict | None:
    """RoPE inverse frequencies (Su et al., RoFormer, eq. 15): θ_i = base^(-2i/d), i = 0 .. d/2 - 1,
    with d = 2·len (the rotary dimension). Recognised when every entry matches one base."""
    if t.dim() != 1 or t.numel() < 2 or not t.is_floating_point() or t.is_meta:
        return None
    v = t.detach().double().cpu()
    n = v.numel()
    if not math.isclose(float(v[0]), 1.0, rel_tol=1e-6) or not 0 < float(v[1]) < 1:
        return None
    base = float(v[1]) ** (-n)  # θ_1 = base^(-2/d) = base^(-1/n)
    want = _rope(base, 2 * n, n)
    if not torch.allclose(v, want, rtol=1e-4, atol=0):
        return None
    return {"base": base}


def _rope(base: float, dim: int, n: int) -> torch.Tensor:
    # the formula Hugging Face and the reference RoFormer code use: 1 / base^(arange(0, dim, 2) / dim)
    return 1.0 / (base ** (torch.arange(0, 2 * n, 2, dtype=torch.int64).double() / dim))


def _make_rope(params: dict, shape: tuple[int, ...], dtype=torch.float32, device="cpu") -> torch.Tensor:
    (n,) = shape
    return _rope(params["base"], 2 * n, n).to(dtype=dtype, device=device)


def _sincos_params(t: torch.Tensor) -> dict | None:
    """A rotary sin/cos table (GPT-J's `embed_positions`): row p = [sin(p·θ_i) ..., cos(p·θ_i) ...],
    θ_i = base^(-2i/d), i < d/2, d = the table's width (the rotary dimension)."""
    if t.dim() != 2 or t.shape[0] < 2 or t.shape[1] < 4 or t.shape[1] % 2 or not t.is_floating_point() or t.is_meta:
        return None
    v = t.detach().double().cpu()
    half = v.shape[1] // 2
    theta1 = math.atan2(float(v[1, 1]), float(v[1, half + 1]))  # θ_1 = base^(-2/d), in (0, 1]
    if not 0 < theta1 < 1:
        return None
    base = theta1 ** (-v.shape[1] / 2)
    if not torch.allclose(v, _sincos(base, v.shape[0], v.shape[1]), rtol=1e-4, atol=1e-5):
        return None
    return {"base": base}


def _sincos(base: float, positions: int, dim: int) -> torch.Tensor:
    # the formula of GPT-J's create_sinusoidal_positions: cat(sin(p θ), cos(p θ)), θ = 1 / base^(arange(0, d, 2) / d)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * _rope(base, dim, dim // 2)[None, :]
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)


def _make_sincos(params: dict, shape: tuple[int, ...], dtype=torch.float32, device="cpu") -> torch.Tensor:
    positions, dim = shape
    return _sincos(params["base"], positions, dim).to(dtype=dtype, device=device)


TABLE_RULES: dict[str, tuple[Callable[[torch.Tensor], dict | None], Callable[..., torch.Tensor]]] = {
    "rope_inv_freq": (_rope_params, _make_rope),  # RoPE θ_i = base^(-2i/d): regenerated for the new d, same base
    "rope_sincos": (_sincos_params, _make_sincos),  # [sin(p θ_i), cos(p θ_i)] per position p (GPT-J), same base
}


def recognise(t: torch.Tensor) -> tuple[str, dict] | None:
    """(rule name, parameters) of a size-derived buffer, or None for an ordinary constant."""
    for name, (match, _) in TABLE_RULES.items():
        params = match(t)
        if params is not None:
            return name, params
    return None


def make(rule: str, params: dict, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The table of rule `rule` with `params` at `shape`."""
    return TABLE_RULES[rule][1](params, tuple(shape), dtype=dtype, device=device)


__all__ = ["TABLE_RULES", "recognise", "make"]
