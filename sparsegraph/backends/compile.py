"""`torch.compile(model, backend="sparsegraph")`: lower masked products, hand the rest to Inductor.

Registered through the `torch_dynamo_backends` entry point, so no import is needed. For each
graph Dynamo captures:

1. the graph is re-traced to aten ops (`make_fx`, pre-dispatch, inside Dynamo's own fake mode on
   its fake inputs, so dynamic shapes stay symbolic); parameters and buffers stay graph inputs,
   named through their Dynamo sources (or, when Dynamo made them graph attributes, as it does
   under `torch._inductor.config.freezing`, through its name map);
2. `passes.lower.lower_graph` finds `linear/addmm/mm/matmul/conv2d(x, weight * mask)`, reads the
   masks (they arrive as real tensors), and rewrites the layers the cost model picks into
   `values = pack(weight * mask)` + `sparsegraph::sparse_linear` (index tensors become constants);
   packing is differentiable, so the weight's gradient is the SDDMM's, scattered onto the blocks;
   an already lowered model (`sg.lower`'s module form) arrives with the op in the graph;
3. the result goes to Inductor (`compile_fx`: AOTAutograd, so training works too). The op is a
   custom op with a fake kernel, so Inductor calls it as an extern kernel and fuses everything
   around it: LayerNorm, GELU, bias and residual adds, softmax, and the packing itself, which in
   a masked-dense model reads the widened weight once per call.

Freezing (inference): an inference graph (grad off when it is compiled) can be compiled with the
parameters and buffers as constants, as Inductor's CPU freezing does: the packing of every
masked weight is folded away (it is done once, at compile time), CPU products take W's blocks
transposed once, as the kernel reads them (`sparsegraph::sparse_linear_packed`, `pretranspose`:
0.5-0.8x the op's time at 1-8 rows on GPT-2 and Llama layers, Zen 3), and the remaining dense weights
are pre-packed (fp32 linear layers for MKL's sgemm when the batch is static, for oneDNN when it is
dynamic; a sparse layer is lowered only if predicted faster than the one that will run, see
`cost_model`). `make_backend(freeze=...)` and `torch.compile(..., options={"freezing":
True | False | "auto"})` choose; "auto" (the default) freezes when no parameter requires grad
(e.g. after `model.requires_grad_(False)`). Frozen tensors are watched like masks (identity and
version counter, a few hundred nanoseconds each per call): an in-place update of a weight (an
optimizer step, `load_state_dict`) is seen, and the graph then runs eagerly with one warning
(writes through `.data` bypass the version counter and are not seen). Other `options`, and `mode`,
are Inductor config patches, as for `backend="inductor"`.

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
import contextlib
import functools
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture import _dynamo_state, _first_line, _free_path, _get_attr
from ..passes.lower import InputResolver, LayerChoice, lower_graph, rewrite_inputs, summary
from . import cost_model as cm

FREEZE = ("auto", True, False)
# the last compilations (for inspection and tests): {"lowered": aten GraphModule handed on,
# "lowering": plan-style summary, "frozen": how many parameters and buffers became constants,
# "compiled": the graphs Inductor compiled (AOT forward/backward, or the frozen inference graph;
# none when AOTAutograd's cache served the compilation), "pretransposed": how many sparse products of
# a frozen graph take W's blocks transposed at compile time (`pretranspose`)}
LOG: collections.deque = collections.deque(maxlen=16)


def _fakes(gm: fx.GraphModule, example_inputs: list) -> list:
    out = []
    for node, real in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs):
        val = node.meta.get("example_value", node.meta.get("val"))
        out.append(val if val is not None else real)
    return out


def _attributes(gm: fx.GraphModule) -> list[tuple[str, str, torch.Tensor]]:
    """(attribute, fqn, tensor) of each tensor a Dynamo graph reads with get_attr. Dynamo installs
    parameters and buffers this way, instead of passing them as inputs, when Inductor freezing is
    on (`torch._inductor.config.freezing`) and grad is off."""
    fqn = gm.meta.get("dynamo_flat_name_to_original_fqn", {})
    out, seen = [], set()
    for node in gm.graph.find_nodes(op="get_attr"):
        if node.target in seen:
            continue
        seen.add(node.target)
        t = _get_attr(gm, node.target)
        if isinstance(t, torch.Tensor):
            out.append((node.target, fqn.get(node.target, node.target), t))
    return out


def _to_aten(gm: fx.GraphModule, fakes: list, attrs: list) -> fx.GraphModule:
    """`gm` re-traced to aten ops on Dynamo's fake inputs; the tensors in `attrs` become trailing
    inputs. Traced inside the inputs' own fake mode, so what Dynamo knows about them (e.g. the
    value of a Python float it passes as a tensor, like LayerNorm's eps under dynamic=True) holds."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = next((a.fake_mode for a in fakes if isinstance(a, FakeTensor)), None) or detect_fake_mode(fakes)
    names, n = [a for a, _, _ in attrs], len(fakes)
    args = list(fakes) + [mode.from_tensor(t, static_shapes=True) for *_, t in attrs]

    def lifted(*flat):
        return torch.func.functional_call(gm, dict(zip(names, flat[n:])), tuple(flat[:n]))

    with warnings.catch_warnings(), (mode or contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        return make_fx(lifted if attrs else gm, pre_dispatch=True, tracing_mode="real" if mode else "fake")(*args)


def _as_attributes(gm: fx.GraphModule, which: dict[int, tuple[str, torch.Tensor]]) -> None:
    """Placeholder i of `gm` becomes a get_attr of tensor `which[i]` (registered as a parameter or
    buffer under a name derived from `which[i][0]`): what Inductor freezing folds into constants."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for i, (name, t) in sorted(which.items()):
        attr = _free_path(gm, name.replace(".", "_"))
        if isinstance(t, nn.Parameter):
            gm.register_parameter(attr, t)
        else:
            gm.register_buffer(attr, t)
        with gm.graph.inserting_before(first):
            node = gm.graph.get_attr(attr)
        placeholders[i].replace_all_uses_with(node)
        gm.graph.erase_node(placeholders[i])
    gm.graph.lint()
    gm.recompile()


def _mutated(gm: fx.GraphModule) -> set[int]:
    """Indices of the placeholders an op of `gm` writes to: arguments its schema marks as written,
    and the running statistics of a batch norm in training mode (which its schema does not mark)."""
    index = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    out = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        given = dict(zip((a.name for a in schema.arguments), node.args)) | node.kwargs
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if given.get("training") is True:
            written += ["running_mean", "running_var"]
        out.update(index[given[w]] for w in written if given.get(w) in index)
    return out


def lower_dynamo_graph(gm: fx.GraphModule, example_inputs: list, target: str = "auto",
                       fakes: list | None = None, state: dict | None = None, frozen: bool = False
                       ) -> tuple[fx.GraphModule, list[LayerChoice], list[int | torch.Tensor]]:
    """(lowered aten graph, choices, the masks it lowered: a placeholder index for a mask passed as
    input, the tensor itself for one the graph reads as an attribute). The aten graph takes the
    same inputs as `gm`. `state` is `_dynamo_state(gm)`: read it while Dynamo's placeholder
    metadata is there (it is dropped later). `frozen`: the graph will be compiled frozen, so a
    linear layer whose batch is dynamic must beat oneDNN's pre-packed dense one (`lower_graph`)."""
    state = state if state is not None else _dynamo_state(gm)
    fakes = fakes if fakes is not None else _fakes(gm, example_inputs)
    attrs, n = _attributes(gm), len(example_inputs)
    aten_gm = _to_aten(gm, fakes, attrs)
    state = {**state, **{n + j: (fqn, isinstance(t, nn.Parameter)) for j, (_, fqn, t) in enumerate(attrs)}}
    inputs = list(example_inputs) + [t for *_, t in attrs]
    choices = lower_graph(aten_gm, InputResolver(aten_gm, state, inputs), target, rewrite_inputs, frozen=frozen)
    names = {c.mask for c in choices if c.format != "dense"}
    masks = [i if i < n else inputs[i] for i in sorted(state) if state[i][0] in names]
    if attrs:
        _as_attributes(aten_gm, {n + j: (attr, t) for j, (attr, _, t) in enumerate(attrs)})
    return aten_gm, choices, masks


def pretranspose(gm: fx.GraphModule) -> int:
    """A frozen graph's CPU `sparse_linear(x, values, ...)` (last axis, impl "auto" / "cpu", blocks a
    multiple of the vector width) whose values come from constants only becomes
    `sparse_linear_packed(x, values.transpose(1, 2).contiguous(), ...)`: Inductor's constant folding
    makes that transposed copy once, at compile time, and no call transposes W's blocks again (the op
    does, from 2 rows; at 1 row it takes dot products, slower than the packed kernel on most layers).
    Returns how many products it rewrote."""
    from . import cpu

    lib = cpu.library()
    if lib is None:
        return 0
    lanes = lib.vector_bytes // 4  # float32's (a multiple of it is one of float64's too)
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and all(a in const for a in node.all_input_nodes)):
            const.add(node)
    done = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.sparsegraph.sparse_linear.default)):
        args = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        a = args.kwargs if args is not None else {}
        crow = a.get("crow")
        if (not a or a["values"] not in const or a.get("dim", -1) != -1 or a.get("impl", "auto") not in ("auto", "cpu")
                or a["block"] % lanes or crow.op != "get_attr" or not _get_attr(gm, crow.target).is_cpu):
            continue
        with gm.graph.inserting_before(node):
            t = gm.graph.call_function(torch.ops.aten.transpose.int, (a["values"], 1, 2))  # (nnzb, in, out)
            t = gm.graph.call_function(torch.ops.aten.clone.default, (t,), {"memory_format": torch.contiguous_format})
            new = gm.graph.call_function(torch.ops.sparsegraph.sparse_linear_packed.default,
                                         (a["x"], t, a["crow"], a["col"], a["bias"], a["n"], a["k"], a["block"]))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return done


def _should_freeze(freeze: bool | str, state: dict, example_inputs: list) -> bool:
    """Compile the parameters and buffers in as constants? Only for an inference graph (grad off);
    "auto": when, besides, no parameter requires grad (a model set up for inference only) and none
    is an inference tensor (made under `torch.inference_mode()`: it has no version counter, so an
    in-place update could not be seen)."""
    if torch.is_grad_enabled() or not state:
        return False
    if freeze == "auto":  # and only tensors whose in-place changes the version counter shows
        return not any(example_inputs[i].requires_grad or example_inputs[i].is_inference() for i in state)
    return bool(freeze)


def _inductor_freezes() -> bool:
    """Inductor's own freezing is on (`torch._inductor.config.freezing`) for an inference graph."""
    return bool(torch._inductor.config.freezing) and not torch.is_grad_enabled()


class _Compiled:
    """The callable handed back to Dynamo: compiled graph + mask and frozen-weight change detection."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, target: str, compiler: Callable,
                 freeze: bool | str = "auto"):
        self.gm, self.target = gm, target
        self.fakes, self.state = _fakes(gm, example_inputs), _dynamo_state(gm)
        freezing = _should_freeze(freeze, self.state, example_inputs)
        lowered, choices, masks = lower_dynamo_graph(gm, example_inputs, target, self.fakes, self.state,
                                                     frozen=freezing or _inductor_freezes())
        entry = {"lowered": lowered, "lowering": summary(choices, target, cm.load()), "frozen": 0, "compiled": [],
                 "pretransposed": 0}
        graph, inputs, self.keep, frozen = (lowered if masks else gm), list(example_inputs), None, []
        if freezing:
            graph = lowered
            written = _mutated(lowered)  # e.g. BatchNorm statistics in train mode: stay inputs
            const = {i: (name, example_inputs[i]) for i, (name, _) in self.state.items() if i not in written}
            _as_attributes(lowered, const)
            entry["pretransposed"] = pretranspose(lowered)
            self.keep = [i for i in range(len(example_inputs)) if i not in const]
            inputs, frozen = [example_inputs[i] for i in self.keep], sorted(const)
            with torch._inductor.config.patch(freezing=True):
                self.fn = compiler(graph, inputs, entry["compiled"])
        else:
            if _inductor_freezes():
                frozen = [t for *_, t in _attributes(gm)]  # Dynamo made them attributes; Inductor folds them
                if graph is lowered:  # (Dynamo's own graph stays as it is: a re-lowering starts from it)
                    entry["pretransposed"] = pretranspose(graph)
            self.fn = compiler(graph, inputs, entry["compiled"])
        entry["frozen"] = len(frozen)
        LOG.append(entry)  # once compiled: Dynamo may restart the analysis from inside the compiler
        self.frozen = frozen
        self._watch(masks, example_inputs)
        self.warned = False

    @staticmethod
    def _key(t: torch.Tensor):
        return t.data_ptr(), (-1 if t.is_inference() else t._version)  # inference tensors keep no version

    @staticmethod
    def _tensor(ref: int | torch.Tensor, args) -> torch.Tensor:
        return args[ref] if isinstance(ref, int) else ref

    @staticmethod
    def _id(ref: int | torch.Tensor):
        return ref if isinstance(ref, int) else id(ref)

    def _watch(self, masks: list, args) -> None:
        """Remember the lowered masks' patterns and the keys of every tensor a change of which
        invalidates this compilation (the lowered masks and the tensors compiled in as constants)."""
        self.masks = {self._id(r): (r, self._tensor(r, args) != 0) for r in masks}
        refs = {self._id(r): r for r in [*masks, *self.frozen]}
        self.watched = [(r, self._key(self._tensor(r, args))) for r in refs.values()]

    def __call__(self, *args):
        for ref, key in self.watched:
            if self._key(self._tensor(ref, args)) != key:
                self._refresh(args)
                break
        return self.fn(*args) if self.keep is None else self.fn(*[args[i] for i in self.keep])

    def _refresh(self, args) -> None:
        ids = {self._id(r) for r in self.frozen}
        frozen = any(self._key(self._tensor(r, args)) != k for r, k in self.watched if self._id(r) in ids)
        changed = [r for r, pattern in self.masks.values() if not torch.equal(self._tensor(r, args) != 0, pattern)]
        if frozen or changed:
            if not self.warned:
                what = ("weights compiled in as constants (freezing) changed" if frozen else
                        "masks changed after compilation (e.g. dynamic sparse training)")
                warnings.warn(f"sparsegraph backend: {what}; re-lowered for the current masks, running eagerly "
                              "without Inductor until recompiled (torch._dynamo.reset())", RuntimeWarning,
                              stacklevel=3)
                self.warned = True
            try:
                lowered, choices, masks = lower_dynamo_graph(self.gm, list(args), self.target, self.fakes, self.state)
                LOG.append({"lowered": lowered, "lowering": summary(choices, self.target, cm.load()), "frozen": 0,
                            "compiled": [], "pretransposed": 0})
                self.fn = lowered
            except Exception:  # noqa: BLE001 - cannot re-lower: the masked-dense graph is always right
                self.fn, masks = self.gm, []
            self.keep, self.frozen = None, []
        else:
            masks = [r for r, _ in self.masks.values()]
        self._watch(masks, args)


def _inductor(gm: fx.GraphModule, example_inputs: list, record: list | None = None,
              config_patches: dict | None = None) -> Callable:
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner(graph, inputs, *args, **kwargs):
        if record is not None:
            record.append(graph)
        return compile_fx_inner(graph, inputs, *args, **kwargs)

    return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=config_patches)


def make_backend(target: str = "auto", compiler: Callable | None = None, freeze: bool | str = "auto") -> Callable:
    """A Dynamo backend lowering to `target` ("auto" | "cpu" | "triton" | "dense") and compiling the
    result with `compiler(gm, example_inputs, record)` (default Inductor, appending the graphs it
    compiles to `record`; pass e.g. `lambda gm, inputs, record: gm` to run the lowered graph eagerly).

    `freeze` ("auto" | True | False): compile inference graphs (grad off at compile time) with the
    parameters and buffers as constants (Inductor freezing); "auto" does it when no parameter
    requires grad. `torch.compile(..., options={"freezing": ...})` overrides it per call; other
    options, and `mode`, are Inductor config patches, as for `backend="inductor"`."""
    if freeze not in FREEZE:
        raise ValueError(f"freeze={freeze!r}: choose from {', '.join(map(repr, FREEZE))}")

    def backend(gm: fx.GraphModule, example_inputs: list, mode: str | None = None, options: dict | None = None,
                **kwargs: Any) -> Callable:
        patches = dict(options or {})
        frz = patches.pop("freezing", freeze)
        if frz not in FREEZE:
            raise ValueError(f"sparsegraph backend: options freezing={frz!r}; "
                             f"choose from {', '.join(map(repr, FREEZE))}")
        if mode is not None:
            from torch._inductor import list_mode_options

            patches = {**list_mode_options(mode), **patches}
        rest = compiler or functools.partial(_inductor, config_patches=patches or None)
        try:
            return _Compiled(gm, list(example_inputs), target, rest, frz)
        except torch._dynamo.exc.RestartAnalysis:  # Dynamo's own control flow (e.g. a float it must specialize)
            raise
        except Exception as e:  # noqa: BLE001 - any failure: run this graph eagerly, say why once
            warnings.warn(f"sparsegraph backend: cannot lower this graph ({_first_line(e)}); running it eagerly",
                          RuntimeWarning, stacklevel=2)
            return gm.forward

    backend.__name__ = f"sparsegraph_{target}"
    return backend


sparsegraph_backend = make_backend("auto")
sparsegraph_backend.__name__ = "sparsegraph"

__all__ = ["sparsegraph_backend", "make_backend", "lower_dynamo_graph", "pretranspose", "LOG", "FREEZE"]
