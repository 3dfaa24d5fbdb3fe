"""`torch.compile(model, backend="sparsegraph")`: lower masked products, hand the rest to Inductor.

Registered through the `torch_dynamo_backends` entry point, so no import is needed. For each
graph Dynamo captures:

1. the graph is re-traced to aten ops (`make_fx`, pre-dispatch, on Dynamo's own fake inputs, so
   dynamic shapes stay symbolic); parameters and buffers stay graph inputs, named through their
   Dynamo sources;
2. `passes.lower.lower_graph` finds `linear/addmm/mm/matmul/conv2d(x, weight * mask)`, reads the
   masks (they arrive as real tensors), and rewrites the layers the cost model picks into
   `values = pack(weight * mask)` + `sparsegraph::sparse_linear` (index tensors become constants);
   packing is differentiable, so the weight's gradient is the SDDMM's, scattered onto the blocks;
3. the result goes to Inductor (`compile_fx`: AOTAutograd, so training works too).

If lowering fails (a mask with values other than 0/1, a fake mask, ...) the graph runs eagerly,
with one warning naming the cause.

Masks that change after compilation (dynamic sparse training updates them in place): the
compiled function checks each lowered mask's identity and version counter on every call (a few
hundred nanoseconds); when one changed and its contents differ from the compiled pattern, the
graph is re-lowered for the new masks and that version runs eagerly (aten graph + sparse kernels,
no Inductor), with one warning. Results are therefore always those of the current masks; call
`torch._dynamo.reset()` and compile again to get Inductor back after the masks settle.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini", n_layer=2)
    >>> wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.9, mask="balanced_block:32")
    >>> fast = torch.compile(wide, backend="sparsegraph")
    >>> x = spec.example_inputs[0]
    >>> torch.allclose(fast(x), wide(x), atol=1e-4)
    True
"""
from __future__ import annotations

import collections
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from ..capture import _dynamo_state, _first_line
from ..passes.lower import InputResolver, LayerChoice, lower_graph, rewrite_inputs, summary
from . import cost_model as cm

# the last compilations (for inspection and tests): {"lowered": aten GraphModule handed on,
# "lowering": plan-style summary, "compiled": the graphs Inductor compiled (AOT forward/backward)}
LOG: collections.deque = collections.deque(maxlen=16)


def _fakes(gm: fx.GraphModule, example_inputs: list) -> list:
    out = []
    for node, real in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs):
        val = node.meta.get("example_value", node.meta.get("val"))
        out.append(val if val is not None else real)
    return out


def _to_aten(gm: fx.GraphModule, fakes: list) -> fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_fx(gm, pre_dispatch=True, tracing_mode="fake")(*fakes)


def lower_dynamo_graph(gm: fx.GraphModule, example_inputs: list, target: str = "auto",
                       fakes: list | None = None, state: dict | None = None
                       ) -> tuple[fx.GraphModule, list[LayerChoice], list[int]]:
    """(lowered aten graph, choices, placeholder indices of the masks it lowered). `state` is
    `_dynamo_state(gm)`: read it while Dynamo's placeholder metadata is there (it is dropped later)."""
    state = state if state is not None else _dynamo_state(gm)
    fakes = fakes if fakes is not None else _fakes(gm, example_inputs)
    aten_gm = _to_aten(gm, fakes)
    res = InputResolver(aten_gm, state, list(example_inputs))
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    choices = lower_graph(aten_gm, res, target, rewrite_inputs)
    names = {c.mask for c in choices if c.format != "dense"}
    lowered_masks = [i for i in range(len(placeholders)) if i in state and state[i][0] in names]
    return aten_gm, choices, lowered_masks


class _Compiled:
    """The callable handed back to Dynamo: compiled graph + mask change detection."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, target: str, compiler: Callable):
        self.gm, self.target = gm, target
        self.fakes, self.state = _fakes(gm, example_inputs), _dynamo_state(gm)
        lowered, choices, masks = lower_dynamo_graph(gm, example_inputs, target, self.fakes, self.state)
        entry = {"lowered": lowered, "lowering": summary(choices, target, cm.load()), "compiled": []}
        LOG.append(entry)
        self.mask_idx = masks
        self.fn = compiler(lowered if masks else gm, example_inputs, entry["compiled"])
        self.masks = {i: (example_inputs[i] != 0).clone() for i in masks}
        self.seen = {i: self._key(example_inputs[i]) for i in masks}
        self.warned = False

    @staticmethod
    def _key(t: torch.Tensor):
        return t.data_ptr(), t._version

    def __call__(self, *args):
        for i in self.mask_idx:
            t = args[i]
            if self._key(t) != self.seen[i]:
                self._refresh(args)
                break
        return self.fn(*args)

    def _refresh(self, args) -> None:
        changed = [i for i in self.mask_idx if not torch.equal(args[i] != 0, self.masks[i])]
        if changed:
            if not self.warned:
                warnings.warn("sparsegraph backend: masks changed after compilation (e.g. dynamic sparse training); "
                              "re-lowered for the new masks, running eagerly without Inductor until recompiled",
                              RuntimeWarning, stacklevel=3)
                self.warned = True
            try:
                lowered, choices, masks = lower_dynamo_graph(self.gm, list(args), self.target, self.fakes, self.state)
                LOG.append({"lowered": lowered, "lowering": summary(choices, self.target, cm.load()),
                            "compiled": []})
                self.fn, self.mask_idx = lowered, masks
            except Exception:  # noqa: BLE001 - cannot re-lower: the masked-dense graph is always right
                self.fn, self.mask_idx = self.gm, []
            self.masks = {i: (args[i] != 0).clone() for i in self.mask_idx}
        self.seen = {i: self._key(args[i]) for i in self.mask_idx}


def _inductor(gm: fx.GraphModule, example_inputs: list, record: list | None = None) -> Callable:
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner(graph, inputs, *args, **kwargs):
        if record is not None:
            record.append(graph)
        return compile_fx_inner(graph, inputs, *args, **kwargs)

    return compile_fx(gm, example_inputs, inner_compile=inner)


def make_backend(target: str = "auto", compiler: Callable | None = None) -> Callable:
    """A Dynamo backend lowering to `target` ("auto" | "cpu" | "triton" | "dense") and compiling the
    result with `compiler(gm, example_inputs, record)` (default Inductor, appending the graphs it
    compiles to `record`; pass e.g. `lambda gm, inputs, record: gm` to run the lowered graph eagerly)."""
    compile_rest = compiler or _inductor

    def backend(gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        try:
            return _Compiled(gm, list(example_inputs), target, compile_rest)
        except Exception as e:  # noqa: BLE001 - any failure: run this graph eagerly, say why once
            warnings.warn(f"sparsegraph backend: cannot lower this graph ({_first_line(e)}); running it eagerly",
                          RuntimeWarning, stacklevel=2)
            return gm.forward

    backend.__name__ = f"sparsegraph_{target}"
    return backend


sparsegraph_backend = make_backend("auto")
sparsegraph_backend.__name__ = "sparsegraph"

__all__ = ["sparsegraph_backend", "make_backend", "lower_dynamo_graph", "LOG"]
