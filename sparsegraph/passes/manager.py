"""A small pass infrastructure for fx.GraphModule rewrites.

A pass is a callable `(module) -> PassResult(module, modified)` with a `name` and an `in_place`
flag. The manager runs passes in order, lints and recompiles the graph after each one, and
names the failing pass in errors.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch.fx as fx

from ..graph import SparsegraphError


class PassResult(NamedTuple):
    module: fx.GraphModule
    modified: bool


class PassError(SparsegraphError):
    pass


@dataclass
class Pass:
    name: str
    fn: Callable[[fx.GraphModule], PassResult]
    in_place: bool = True

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.fn(gm)


def graph_pass(name: str, in_place: bool = True):
    """Decorator: turn `fn(gm) -> (gm, modified)` into a named Pass."""
    def wrap(fn):
        return Pass(name, fn, in_place)
    return wrap


class PassManager:
    def __init__(self, passes: list[Pass], copy_input: bool = False):
        self.passes = passes
        self.copy_input = copy_input  # run on a deep copy so the caller's module is untouched

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if self.copy_input:
            gm = copy.deepcopy(gm)
        modified = False
        for p in self.passes:
            try:
                gm, changed = p(gm)
                gm.graph.lint()
                gm.recompile()
            except SparsegraphError as e:
                raise PassError(f"pass {p.name}: {e}") from e
            except Exception as e:  # noqa: BLE001 - name the pass that broke the graph
                raise PassError(f"pass {p.name} failed: {type(e).__name__}: {e}") from e
            modified |= changed
        return PassResult(gm, modified)
