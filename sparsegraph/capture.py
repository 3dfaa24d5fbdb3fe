"""Capture: any PyTorch model (or Dynamo FX graph) -> trainable aten-level fx.GraphModule -> ModelGraph.

Main path: `torch.export.export(strict=False)` with every input axis dynamic where the model allows,
so batch and sequence stay free and the graph runs at any batch size. Fallback: `fx.symbolic_trace`
re-traced to aten ops with `make_fx`. The result is canonicalised into a plain, trainable
`fx.GraphModule`: parameters keep their fully-qualified names, BatchNorm and dropout become
submodules that follow `.train()` / `.eval()`, and export's guard and assert nodes are dropped.
ONNX files are handled by `onnx/capture.py`.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import operator
import os
import re
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.operator_schemas import normalize_function
from torch.utils._pytree import tree_flatten

from .graph import CaptureError, ModelGraph, Op, Ref, Value

# ---------------------------------------------------------------------------------------------
# aten -> canonical vocabulary (see dims.RULES for what each canonical op means)
# ---------------------------------------------------------------------------------------------
_CANON: dict[str, tuple[str, ...]] = {
    "linear": ("linear",),
    "addmm": ("addmm",),
    "matmul": ("matmul", "mm", "bmm"),
    "convolution": ("conv1d", "conv2d", "conv3d", "convolution", "_convolution",
                    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
    "embedding": ("embedding",),
    "batch_norm": ("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"),
    "layer_norm": ("layer_norm", "native_layer_norm"),
    "group_norm": ("group_norm", "native_group_norm"),
    "rms_norm": ("rms_norm",),
    "reshape": ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze",
                "view_as", "reshape_as"),
    "permute": ("permute", "transpose", "t", "swapaxes", "movedim", "numpy_T", "mT", "adjoint"),
    "cat": ("cat", "concat", "concatenate"),
    "split": ("split", "split_with_sizes", "chunk", "tensor_split", "unbind", "unsafe_split"),
    "scaled_dot_product_attention": ("scaled_dot_product_attention",),
    "reduction": ("mean", "sum", "amax", "amin", "var", "std", "var_mean", "logsumexp", "norm",
                  "linalg_vector_norm", "max", "min"),
    "pool": ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
             "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
             "adaptive_max_pool2d", "max_pool2d_with_indices"),
    "expand": ("expand", "expand_as", "broadcast_to"),
    "slice": ("slice", "narrow"),
    "select": ("select",),
    "elementwise": (
        "add", "sub", "mul", "div", "rsub", "where", "maximum", "minimum", "pow", "masked_fill",
        "relu", "gelu", "silu", "tanh", "sigmoid", "exp", "log", "neg", "abs", "sqrt", "rsqrt",
        "erf", "sin", "cos", "clamp", "clamp_min", "clamp_max", "hardtanh", "hardswish",
        "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "reciprocal", "square",
        "softmax", "log_softmax", "_softmax", "_log_softmax", "dropout", "native_dropout",
        "contiguous", "clone", "alias", "detach", "to", "_to_copy", "type_as", "lift_fresh_copy",
        "copy", "fill", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
        "randn_like", "bernoulli", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
        "logical_not", "bitwise_and", "bitwise_or", "bitwise_not", "__and__", "__or__", "floor",
        "ceil", "round", "sign", "tril", "triu", "floor_divide", "remainder", "fmod", "isinf",
        "isnan", "nan_to_num", "_assert_tensor_metadata_passthrough"),
    "const": ("arange", "full", "zeros", "ones", "empty", "new_ones", "new_zeros", "new_full",
              "new_empty", "scalar_tensor", "tensor", "rand", "randn", "randint", "linspace",
              "_tensor_constant", "lift_fresh"),
    "baddbmm": ("baddbmm",),
    "grouped_mm": ("_grouped_mm", "grouped_mm", "grouped_mm_fallback"),
    "repeat": ("repeat",),
    "repeat_interleave": ("repeat_interleave",),
    "stack": ("stack",),
    "index_tensor": ("index",),
    "index_select": ("index_select",),
    "index_put": ("index_put", "_index_put_impl"),
    "scan": ("cumsum", "cumprod"),
    "sort": ("topk", "sort"),
    "index": ("gather", "diff", "any", "all", "argmax", "argmin", "nonzero", "masked_select", "histc",
              "bincount", "one_hot", "scatter", "scatter_add", "index_add", "searchsorted", "bucketize"),
}
ATEN_TO_CANON = {aten: canon for canon, names in _CANON.items() for aten in names}
_SKIP = {"sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata", "_assert_scalar",
         "_assert_async", "sym_constrain_range", "sym_constrain_range_for_size", "_guards_fn",
         "scalar_tensor_assert"}
_SYM_OPS = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
            operator.mod, operator.neg, operator.pow)


def aten_name(target: Any) -> str:
    """Packet name of an aten op overload, e.g. `aten.add_.Tensor` -> `add` (in-place folded)."""
    packet = getattr(target, "overloadpacket", None)
    name = packet.__name__ if packet is not None else getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.startswith("_") and name[:-1] in ATEN_TO_CANON:
        name = name[:-1]
    return name


# ---------------------------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------------------------
def _as_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return tuple(example_inputs)


def _dynamic_shapes(args: tuple) -> tuple:
    """Batch (axis 0) of every input and sequence (axis 1) of integer token inputs stay dynamic."""
    auto = torch.export.Dim.AUTO

    def spec(a):
        if isinstance(a, torch.Tensor):
            if a.dim() == 0:
                return None
            axes = [0, 1] if a.dim() >= 2 and not a.is_floating_point() else [0]
            return {i: auto for i in axes}
        if isinstance(a, (list, tuple)):
            return type(a)(spec(x) for x in a)
        if isinstance(a, dict):
            return {k: spec(v) for k, v in a.items()}
        return None

    return tuple(spec(a) for a in args)


def trace(model: nn.Module, example_inputs: Any, *, dynamic: bool = True,
          name: str | None = None) -> fx.GraphModule:
    """Trace `model` to a canonical, trainable, aten-level `fx.GraphModule`.

    >>> import torch
    >>> from sparsegraph.capture import trace
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = trace(m, (torch.randn(2, 4),))
    >>> gm(torch.randn(5, 4)).shape  # any batch size
    torch.Size([5, 2])
    """
    if isinstance(model, fx.GraphModule) and _is_aten(model.graph) and all(
            n.op != "call_function" or "val" in n.meta for n in model.graph.nodes):
        return model  # already captured (rewritten modules lack shape metadata: they are re-exported)
    if not isinstance(model, nn.Module):
        raise CaptureError(f"cannot capture {type(model).__name__}: expected a torch.nn.Module")
    args = _as_tuple(example_inputs)
    if not args:
        raise CaptureError(f"cannot capture {type(model).__name__}: example inputs are required")
    check_inputs(model, args, name)
    errors, ep = [], None
    for dyn in ([True, False] if dynamic else [False]):
        try:
            with quiet(), no_kv_cache(model):
                ep = torch.export.export(model, args, strict=False,
                                         dynamic_shapes=_dynamic_shapes(args) if dyn else None)
            break
        except torch._dynamo.exc.UserError as e:  # noqa: PERF203 - dynamic shapes refused: retry static
            errors.append(f"torch.export (dynamic): {_first_line(e)}")
        except Exception as e:  # noqa: BLE001 - every cause is reported below
            errors.append(f"torch.export: {_first_line(e)}")
            break
    if ep is not None:
        return canonicalize(ep.module(), training=model.training)
    try:
        with quiet(), no_kv_cache(model):
            gm = aten_graph(fx.symbolic_trace(model), args)
    except Exception as e:  # noqa: BLE001
        errors.append(f"fx.symbolic_trace: {_first_line(e)}")
        raise CaptureError(f"cannot capture {type(model).__name__}: " + "; ".join(errors)) from None
    warnings.warn(f"torch.export failed on {type(model).__name__} ({errors[-1]}); captured with "
                  "fx.symbolic_trace, specialised to the example input shapes", stacklevel=2)
    return canonicalize(gm, training=model.training)


@contextlib.contextmanager
def no_kv_cache(model: nn.Module):
    """Key/value caches off while tracing: every config of `model` (a Hugging Face model's
    `config.use_cache`, its sub-models' too) says `use_cache=False`, and is restored on exit.
    A cache object (`DynamicCache`) is state a graph cannot return, and a capture is a full forward.

    >>> import types, torch
    >>> m = torch.nn.Linear(2, 2); m.config = types.SimpleNamespace(use_cache=True)
    >>> with no_kv_cache(m):
    ...     m.config.use_cache
    False
    >>> m.config.use_cache
    True
    """
    saved, seen = [], set()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is None or id(cfg) in seen or not isinstance(getattr(cfg, "use_cache", None), bool):
            continue
        seen.add(id(cfg))
        saved.append((cfg, cfg.use_cache))
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg, value in saved:
            cfg.use_cache = value


@contextlib.contextmanager
def quiet():
    """Tracers' own output off: warnings, and the graphs torch.export prints to stdout/stderr when
    it fails (the caller reports the failure in one line)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes some libraries put in messages


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a `raise ... from` chain (what a wrapping library caught)."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e


# ---------------------------------------------------------------------------------------------
# example inputs: checked before tracing, so a mistake is reported in terms of the inputs
# ---------------------------------------------------------------------------------------------
def describe_inputs(args: tuple) -> str:
    """'int64[2, 3, 64], float32[3]': each input's dtype and shape (other values by type)."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}"
        if isinstance(a, (list, tuple)):
            return "(" + ", ".join(one(x) for x in a) + ")"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in a.items()) + "}"
        return type(a).__name__
    return ", ".join(one(a) for a in args) or "none"


def _where(e: BaseException) -> str:
    """' (at file.py:LINE)' for the innermost frame of `e`'s traceback outside torch itself."""
    tb, last = e.__traceback__, None
    torch_dir = os.path.dirname(torch.__file__)
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith(torch_dir) and filename != __file__:
            last = tb
        tb = tb.tb_next
    if last is None:
        return ""
    return f" (at {os.path.basename(last.tb_frame.f_code.co_filename)}:{last.tb_lineno})"


def _parameters(sig: inspect.Signature) -> str:
    """'x, *args, **kwargs': a signature's parameter names, without annotations."""
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return ", ".join(stars.get(p.kind, "") + p.name for p in sig.parameters.values())


def _on_meta(model: nn.Module, args: tuple) -> bool:
    tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
    return any(t.is_meta for t in tensors) or any(p.is_meta for p in model.parameters()) \
        or any(b.is_meta for b in model.buffers())


def check_inputs(model: nn.Module, args: tuple, label: str | None = None) -> None:
    """Raise `CaptureError` unless `model(*args)` takes and runs on these inputs: a wrong count is
    named against `forward`'s signature, a wrong shape or dtype by the error the model raised and
    where. The run is in eval mode without gradients (nothing in the model changes), and skipped
    for models or inputs on the meta device."""
    label = label or type(model).__name__
    what = describe_inputs(args)
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no signature to check against
        sig = None
    if sig is not None:
        try:
            sig.bind(*args)
        except TypeError as e:
            raise CaptureError(f"{label}.forward({_parameters(sig)}) does not take the example inputs ({what}): "
                               f"{e}") from None
    if _on_meta(model, args):
        return
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception as e:  # noqa: BLE001 - the model's own error, reported with the inputs
        raise CaptureError(f"{label} does not run on its example inputs ({what}): {_first_line(e)}{_where(e)}") \
            from None
    finally:
        for m, training in modes:
            m.training = training


def _is_aten(graph: fx.Graph) -> bool:
    return all(n.op != "call_module" and n.op != "call_method" and
               (n.op != "call_function" or isinstance(n.target, torch._ops.OpOverload)
                or n.target is operator.getitem or n.target in _SYM_OPS)
               for n in graph.nodes)


def _dynamo_state(gm: fx.GraphModule) -> dict[int, tuple[str, bool]]:
    """Placeholders of a Dynamo graph that are module parameters/buffers: index -> (fqn, is_param)."""
    out = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        source, parts, kind = getattr(node.meta.get("grapharg"), "source", None), [], None
        while source is not None and type(source).__name__ != "LocalSource":
            member = getattr(source, "member", None)
            if member in ("_parameters", "_buffers"):
                kind = member
            elif member is not None and member != "_modules":
                parts.append(member)
            if type(source).__name__ == "DictGetItemSource":
                parts.append(str(source.index))
            source = getattr(source, "base", None)
        if kind:
            out[i] = (".".join(reversed(parts)), kind == "_parameters")
    return out


def aten_graph(gm: fx.GraphModule, args: tuple) -> fx.GraphModule:
    """Re-trace any fx graph (symbolic_trace or Dynamo) into aten ops, keeping parameter names.

    Parameters and buffers (the module's own, or a Dynamo graph's lifted ones) become `get_attr`s
    under their fully-qualified names; what remains are the real inputs.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    state = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    lifted = _dynamo_state(gm)
    names = list(state) + [lifted[i][0] for i in sorted(lifted)]
    values = list(state.values()) + [args[i] for i in sorted(lifted)]
    is_param = [isinstance(v, nn.Parameter) for v in state.values()] + [lifted[i][1] for i in sorted(lifted)]
    inputs = [a for i, a in enumerate(args) if i not in lifted]

    def f(*flat):
        own = dict(zip(names[:len(state)], flat[:len(state)]))
        lifted_vals, real = iter(flat[len(state):len(names)]), iter(flat[len(names):])
        full = [next(lifted_vals) if i in lifted else next(real) for i in range(len(args))]
        return torch.func.functional_call(gm, own, tuple(full))

    with torch._guards.tracing(None), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = make_fx(f, pre_dispatch=True, tracing_mode="fake")(*values, *inputs)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    root = nn.Module()
    for name, value, param, node in zip(names, values, is_param, placeholders[:len(names)]):
        value = value.detach()
        _set_attr(root, name, nn.Parameter(value, requires_grad=value.requires_grad or param) if param else value,
                  is_param=param)
        with traced.graph.inserting_before(node), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ga = traced.graph.get_attr(name)
        ga.meta = dict(node.meta)
        node.replace_all_uses_with(ga)
        traced.graph.erase_node(node)
    return fx.GraphModule(root, traced.graph)


# ---------------------------------------------------------------------------------------------
# canonicalisation: a plain GraphModule that trains and switches train/eval
# ---------------------------------------------------------------------------------------------
class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over dim 1 of any rank (the op export records for BatchNorm1d/2d/3d)."""

    def _check_input_dim(self, input):  # noqa: D401 - any rank with channels at dim 1
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _get_attr(root: nn.Module, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(root: nn.Module, path: str, value: Any, is_param: bool | None = None) -> None:
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, nn.Module):
        mod.add_module(leaf, value)
    elif is_param or isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
    elif isinstance(value, torch.Tensor):
        mod.register_buffer(leaf, value)
    else:
        setattr(mod, leaf, value)


def _has_attr(root: nn.Module, path: str) -> bool:
    try:
        _get_attr(root, path)
        return True
    except AttributeError:
        return False


def _pop_attr(root: nn.Module, path: str) -> Any:
    *parent, leaf = path.split(".")
    owner = _get_attr(root, ".".join(parent)) if parent else root
    value = getattr(owner, leaf)
    delattr(owner, leaf)
    return value


def _free_path(root: nn.Module, want: str) -> str:
    path, i = want, 0
    while True:
        try:
            _get_attr(root, path)
        except AttributeError:
            return path
        i += 1
        path = f"{want}_{i}"


def _canonical_names(src: nn.Module) -> dict[str, str]:
    """Every name of a tied tensor -> its first name in `named_parameters()` / `named_buffers()` order.

    A tied weight (T5's and BART's `shared.weight`, read as `encoder.embed_tokens.weight`,
    `decoder.embed_tokens.weight` and `lm_head.weight`) may reach the graph under any of its names;
    it is one parameter, named as PyTorch's own deduplicating `named_parameters()` names it.
    """
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in [*src.named_parameters(remove_duplicate=False), *src.named_buffers(remove_duplicate=False)]:
        out[name] = first.setdefault(id(t), name)
    return out


def canonicalize(src: fx.GraphModule, training: bool = True) -> fx.GraphModule:
    graph = src.graph
    root = nn.Module()
    names = _canonical_names(src)
    for node in graph.nodes:  # a tied tensor is read under its one canonical name
        if node.op == "get_attr" and names.get(node.target, node.target) != node.target:
            node.target = names[node.target]
    for node in graph.nodes:  # carry every referenced tensor over under its own name
        if node.op == "get_attr":
            val = _get_attr(src, node.target)
            if isinstance(val, torch.Tensor):
                is_param = isinstance(val, nn.Parameter)
                _set_attr(root, node.target, val if is_param else val, is_param=is_param)
            else:
                _set_attr(root, node.target, val)
    dropped: set[float] = set()
    for node in list(graph.nodes):
        name = aten_name(node.target) if node.op == "call_function" else ""
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and name in _SKIP and not node.users:
            graph.erase_node(node)
        elif name == "batch_norm":
            _bn_to_module(root, graph, node)
        elif name == "dropout":
            _dropout_to_module(root, graph, node)
        elif name == "scaled_dot_product_attention":
            dropped.add(_no_attention_dropout(node))
    if dropped - {0.0}:
        warnings.warn(f"attention dropout (scaled_dot_product_attention dropout_p={max(dropped)}) is not kept "
                      "in the captured graph: the graph form trains without it (the module form keeps it)",
                      stacklevel=3)
    for node in list(graph.nodes):
        for rule in REWRITES:
            if node.op == "call_function" and rule(root, graph, node):
                break
    # remove the num_batches_tracked increments left by train-mode export of BatchNorm
    for node in list(graph.nodes):
        if (node.op == "call_function" and aten_name(node.target) == "add" and not node.users
                and node.args and getattr(node.args[0], "op", None) == "get_attr"
                and str(node.args[0].target).endswith("num_batches_tracked")):
            graph.erase_node(node)
    gm = fx.GraphModule(root, graph, class_name="SparseGraphModule")
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):  # drop get_attrs no longer used (moved into BN modules)
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    _prune_unused(gm)
    gm._tracer_cls = gm.graph._tracer_cls = None  # pickling re-traces with a plain fx.Tracer, not export's
    gm._tracer_extras = {}
    gm.recompile()
    gm.train(training)
    return gm


def _matmul_weight_t(root: nn.Module, graph: fx.Graph, node: fx.Node) -> bool:
    """`matmul(x, W.T)` / `mm(x, W.T)`, W a 2-D parameter read only here  =>  `linear(x, W)`."""
    if aten_name(node.target) not in ("matmul", "mm") or len(node.args) != 2 or node.kwargs:
        return False
    x, wt = node.args
    if not (isinstance(wt, fx.Node) and wt.op == "call_function" and len(wt.users) == 1
            and aten_name(wt.target) in ("numpy_T", "t", "mT", "transpose")):
        return False
    w = wt.args[0]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(_get_attr(root, w.target), nn.Parameter)
            and _get_attr(root, w.target).dim() == 2):
        return False
    if aten_name(wt.target) == "transpose" and {d % 2 for d in wt.args[1:3]} != {0, 1}:
        return False
    with graph.inserting_before(node):
        lin = graph.call_function(torch.ops.aten.linear.default, (x, w))
    lin.meta = dict(node.meta)
    node.replace_all_uses_with(lin)
    graph.erase_node(node)
    graph.erase_node(wt)
    return True


# Exact rewrites applied once at capture, (pattern -> replacement) each, so that every analysis and
# pass sees one spelling of a computation:
REWRITES: tuple[Callable[[nn.Module, fx.Graph, fx.Node], bool], ...] = (
    _matmul_weight_t,  # x @ W.T, W a 2-D parameter (Falcon's FalconLinear: aten.numpy_T)  =>  linear(x, W)
)


def _prune_unused(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used and not any(name.startswith(u + ".") for u in used):
            *parent, leaf = name.split(".")
            mod = _get_attr(gm, ".".join(parent)) if parent else gm
            if leaf in mod._parameters:
                del mod._parameters[leaf]
            elif leaf in mod._buffers:
                del mod._buffers[leaf]


def _bn_to_module(root: nn.Module, graph: fx.Graph, node: fx.Node) -> None:
    x, w, b, rm, rv, _training, momentum, eps, *_ = list(node.args) + [None] * 9
    kw = node.kwargs
    momentum, eps = kw.get("momentum", momentum), kw.get("eps", eps)
    refs = [a for a in (w, b, rm, rv) if isinstance(a, fx.Node)]
    if rm is None or not all(a.op == "get_attr" for a in refs):
        return  # no running statistics: always batch statistics, the functional op is exact
    prefix = rm.target.rsplit(".", 1)[0] if "." in rm.target else ""
    mean = _get_attr(root, rm.target)
    bn = BatchNorm(mean.shape[0], eps=eps, momentum=momentum, affine=w is not None,
                   track_running_stats=True, device=mean.device, dtype=mean.dtype)
    moved = {"running_mean": rm.target, "running_var": rv.target}
    if w is not None:
        moved |= {"weight": w.target, "bias": b.target}
    nbt = f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
    if _has_attr(root, nbt):
        moved["num_batches_tracked"] = nbt
    for key, path in moved.items():
        setattr(bn, key, _pop_attr(root, path))
    path = prefix or "batch_norm"
    if _has_attr(root, path):  # the container still holds other tensors: pick a fresh name
        holder = _get_attr(root, path)
        if not isinstance(holder, nn.Module) or holder._parameters or holder._buffers:
            path = _free_path(root, path)
        else:  # its submodules (a Sparse Parallel norm's `branch<i>` copies) move into the BatchNorm
            for name, child in _pop_attr(root, path).named_children():
                bn.add_module(name, child)
    _set_attr(root, path, bn)
    with graph.inserting_before(node):
        new = graph.create_node("call_module", path, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _dropout_to_module(root: nn.Module, graph: fx.Graph, node: fx.Node) -> None:
    x, p = node.args[0], node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    owner, typ = _module_of(node)
    path = _free_path(root, owner if "Dropout" in typ else f"{owner}.dropout" if owner else "dropout")
    _set_attr(root, path, nn.Dropout(p))
    with graph.inserting_before(node):
        new = graph.create_node("call_module", path, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _no_attention_dropout(node: fx.Node) -> float:
    """SDPA's dropout_p, recorded as a constant by a train-mode capture (Hugging Face passes
    `p if self.training else 0.0`), would drop attention in eval too: the graph keeps none of it.
    Returns the p removed (0.0 if none)."""
    p = node.kwargs["dropout_p"] if "dropout_p" in node.kwargs else node.args[4] if len(node.args) > 4 else 0.0
    if not isinstance(p, (int, float)) or p <= 0:
        return 0.0
    if "dropout_p" in node.kwargs:
        node.update_kwarg("dropout_p", 0.0)
    else:
        node.update_arg(4, 0.0)
    return float(p)


# ---------------------------------------------------------------------------------------------
# fx.GraphModule -> ModelGraph
# ---------------------------------------------------------------------------------------------
def _hint(s: Any) -> int:
    if isinstance(s, int):
        return s
    hint = s.node.hint if hasattr(s, "node") else None
    if hint is None:
        from torch.fx.experimental.symbolic_shapes import optimization_hint
        hint = optimization_hint(s)
    return int(hint)


def _value_from_meta(name: str, val: Any, kind: str, param: str | None = None) -> Value:
    shape = tuple(_hint(s) for s in val.shape)
    symbolic = tuple(not isinstance(s, int) for s in val.shape)
    return Value(name, shape, str(val.dtype).replace("torch.", ""), kind, param, symbolic)


def _module_of(node: fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    typ = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    return path, typ.rsplit(".", 1)[-1]


def _example_val(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def from_fx(gm: fx.GraphModule, name: str = "model") -> ModelGraph:
    """Build the ModelGraph of a canonical aten-level GraphModule (output of `trace`)."""
    g = ModelGraph("torch", gm, name)
    params = dict(gm.named_parameters())
    for node in gm.graph.nodes:
        val = _example_val(node)
        if node.op == "placeholder":
            if isinstance(val, torch.Tensor):
                g.add_value(_value_from_meta(node.name, val, "input"))
                g.inputs.append(node.name)
        elif node.op == "get_attr":
            attr = _get_attr(gm, node.target)
            if isinstance(attr, torch.Tensor):
                kind = "param" if node.target in params else ("buffer" if _is_buffer(gm, node.target) else "const")
                g.add_value(Value(node.name, tuple(attr.shape), str(attr.dtype).replace("torch.", ""),
                                  kind, node.target if kind != "const" else None))
        elif node.op == "call_module":
            _add_module_op(g, gm, node, val)
        elif node.op == "call_function":
            _add_function_op(g, node, val)
        elif node.op == "output":
            for o in tree_flatten(node.args)[0]:
                if isinstance(o, fx.Node) and o.name in g.values:
                    g.outputs.append(o.name)
    return g


def _is_buffer(gm: fx.GraphModule, target: str) -> bool:
    return target in dict(gm.named_buffers())


def _add_outputs(g: ModelGraph, node: fx.Node, val: Any) -> list[str]:
    if isinstance(val, torch.Tensor):
        g.add_value(_value_from_meta(node.name, val, "activation"))
        return [node.name]
    if isinstance(val, (tuple, list)):
        outs = []
        for i, v in enumerate(val):
            if isinstance(v, torch.Tensor):
                g.add_value(_value_from_meta(f"{node.name}.{i}", v, "activation"))
                outs.append(f"{node.name}.{i}")
        return outs
    return []


def _add_module_op(g: ModelGraph, gm: fx.GraphModule, node: fx.Node, val: Any) -> None:
    mod = _get_attr(gm, node.target)
    x = node.args[0]
    outs = _add_outputs(g, node, val)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        args: dict[str, Any] = {"input": Ref(x.name)}
        for key in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(mod, key, None)
            if t is not None:
                fqn = f"{node.target}.{key}"
                kind = "param" if key in ("weight", "bias") else "buffer"
                g.add_value(Value(fqn, tuple(t.shape), str(t.dtype).replace("torch.", ""), kind, fqn))
                args[key] = Ref(fqn)
        op = "batch_norm"
    elif isinstance(mod, nn.Dropout):
        args, op = {"input": Ref(x.name)}, "elementwise"
    else:
        args, op = {"input": Ref(x.name)}, "other"
    inputs = [str(v) for v in args.values()]
    g.add_op(Op(node.name, op, inputs, outs, args, target=type(mod).__name__,
                module=node.target, module_type=type(mod).__name__, source=node))


def _add_function_op(g: ModelGraph, node: fx.Node, val: Any) -> None:
    target = node.target
    if target is operator.getitem:
        src, idx = node.args
        key = f"{src.name}.{idx}"
        if key in g.values and isinstance(val, torch.Tensor):
            outs = _add_outputs(g, node, val)
            g.add_op(Op(node.name, "alias", [key], outs, {"input": Ref(key)}, target="getitem",
                        source=node))
        return
    if not isinstance(target, torch._ops.OpOverload):
        if isinstance(val, (torch.Tensor, tuple, list)):  # higher-order ops (e.g. set_grad_enabled regions)
            inputs = [a.name for a in tree_flatten((node.args, node.kwargs))[0]
                      if isinstance(a, fx.Node) and a.name in g.values]
            outs = _add_outputs(g, node, val)
            module, mtype = _module_of(node)
            g.add_op(Op(node.name, "other", inputs, outs, {}, target=getattr(target, "__name__", str(target)),
                        module=module, module_type=mtype, source=node, flops=0))
        return  # otherwise: symbolic integer arithmetic on sizes
    aname = aten_name(target)
    if aname in _SKIP:
        return
    canon = ATEN_TO_CANON.get(aname, "other")
    try:
        norm = normalize_function(target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        kwargs = dict(norm.kwargs) if norm is not None else {}
    except Exception:  # noqa: BLE001 - schema mismatch: fall back to positional
        kwargs = {}
    if not kwargs:
        kwargs = {f"arg{i}": a for i, a in enumerate(node.args)} | dict(node.kwargs)

    def conv(a):
        if isinstance(a, fx.Node):
            return Ref(a.name) if a.name in g.values else _symint(a)
        if isinstance(a, (list, tuple)):
            return [conv(x) for x in a]
        return a

    args = {k: conv(v) for k, v in kwargs.items()}
    args = _canonical_args(canon, aname, args, node)
    inputs = [str(a) for a in tree_flatten(list(args.values()))[0] if isinstance(a, Ref)]
    outs = _add_outputs(g, node, val)
    module, mtype = _module_of(node)
    op = Op(node.name, canon, inputs, outs, args, target=str(target), module=module,
            module_type=mtype, source=node)
    if canon == "elementwise" and aname == "mul" and _is_mask_mul(g, inputs):
        op.op = "mask_mul"
        op.args = {"weight": Ref(inputs[0]), "mask": Ref(inputs[1])}
    if canon in _NO_FORMULA:
        op.flops = _meta_flops(node)
    g.add_op(op)


# canonical ops whose FLOPs flops.op_flops has no formula for: counted as FlopCounterMode counts the aten op
_NO_FORMULA = ("other", "index", "repeat", "index_tensor", "index_select", "index_put", "scan", "sort",
               "repeat_interleave")


class SymSize(int):
    """An integer argument computed from dynamic input sizes (never patched by rewrites)."""


def _symint(node: fx.Node) -> SymSize:
    val = _example_val(node)
    try:
        return SymSize(_hint(val))
    except Exception:  # noqa: BLE001
        return SymSize(-1)


def _is_mask_mul(g: ModelGraph, inputs: list[str]) -> bool:
    if len(inputs) != 2:
        return False
    w, m = (g.values.get(v) for v in inputs)
    return (w is not None and m is not None and w.kind == "param" and m.kind == "buffer"
            and (m.param or "").endswith("_mask"))


def _canonical_args(canon: str, aname: str, args: dict, node: fx.Node) -> dict:
    """Rename a few aten spellings to the canonical argument names used by dims.RULES."""
    if canon == "matmul":
        return {"self": args.get("self", args.get("input")), "other": args.get("other", args.get("mat2"))}
    if canon == "convolution":
        groups = args.get("groups", 1)
        return {"input": args["input"], "weight": args["weight"], "bias": args.get("bias"),
                "stride": args.get("stride"), "padding": args.get("padding"),
                "dilation": args.get("dilation"), "groups": groups,
                "transposed": bool(args.get("transposed", "transpose" in aname))}
    if canon == "permute":
        return {"input": args.get("self", args.get("input")), "dims": _perm(aname, args, node)}
    if canon == "reshape":
        out = {"input": args.get("self", args.get("input"))}
        if aname in ("view", "reshape", "_unsafe_view"):
            out["size"] = args.get("size", args.get("shape"))
        elif aname == "unflatten":  # dim -> sizes: sizes[j] spells output axis dim + j
            out["dim"], out["sizes"] = args.get("dim"), args.get("sizes")
        return out
    if canon == "baddbmm":
        return {"input": args.get("self", args.get("input")), "batch1": args.get("batch1"),
                "batch2": args.get("batch2"), "beta": args.get("beta", 1), "alpha": args.get("alpha", 1)}
    if canon == "grouped_mm":  # (S, K) rows sorted by group, weight (G, K, N), offs (G,): cumulative row ends
        return {"input": args.get("input", args.get("self")), "weight": args.get("weight", args.get("mat2")),
                "offs": args.get("offs"), "bias": args.get("bias")}
    if canon == "expand":
        return {"input": args.get("self", args.get("input")), "size": args.get("size")}
    if canon == "split":
        out = {"input": args.get("self", args.get("input")), "dim": args.get("dim", 0)}
        if aname in ("split", "unsafe_split"):
            out["split_size"] = args.get("split_size")
        elif aname == "split_with_sizes":
            out["split_sizes"] = args.get("split_sizes")
        return out
    if canon == "slice":
        return {"input": args.get("self", args.get("input")), "dim": args.get("dim", 0),
                "start": args.get("start"), "end": args.get("end", args.get("length")),
                "step": args.get("step", 1)}
    if canon in ("select", "reduction", "pool", "elementwise", "index", "const", "other", "repeat", "index_tensor",
                 "index_select", "index_put", "scan", "sort", "repeat_interleave", "stack"):
        if "self" in args:
            args = {"input": args.pop("self"), **args}
        return args
    return args


def _perm(aname: str, args: dict, node: fx.Node) -> list[int]:
    rank = _example_val(node.args[0]).dim()
    if aname == "permute":
        return [d % rank for d in args["dims"]]
    perm = list(range(rank))
    if aname in ("t", "numpy_T"):
        return perm[::-1]
    if aname in ("mT", "adjoint"):
        return perm[:-2] + perm[:-3:-1]
    if aname == "movedim":
        src, dst = args["source"], args["destination"]
        src, dst = ([src], [dst]) if isinstance(src, int) else (src, dst)
        rest = [d for d in perm if d not in [s % rank for s in src]]
        out = [None] * rank
        for s_, d_ in zip(src, dst):
            out[d_ % rank] = s_ % rank
        it = iter(rest)
        return [o if o is not None else next(it) for o in out]
    a, b = (args.get("dim0", args.get("axis0")) % rank, args.get("dim1", args.get("axis1")) % rank)
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _meta_flops(node: fx.Node) -> int:
    """FLOPs of an op we have no formula for, as PyTorch's own FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    def meta(a):
        if isinstance(a, fx.Node):
            v = _example_val(a)
            if isinstance(v, torch.Tensor):
                return torch.empty([_hint(s) for s in v.shape], dtype=v.dtype, device="meta")
            return _hint(v) if v is not None and not isinstance(v, (tuple, list)) else v
        if isinstance(a, (list, tuple)):
            return type(a)(meta(x) for x in a)
        return a

    try:
        with FlopCounterMode(display=False) as fc:
            node.target(*meta(node.args), **{k: meta(v) for k, v in node.kwargs.items()})
        return int(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - ops that cannot run on meta count nothing, as in FlopCounterMode
        return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def capture(model: Any, example_inputs: Any = None, *, name: str | None = None,
            dynamic: bool = True) -> ModelGraph:
    """Capture a model into a `ModelGraph`.

    `model` is an `nn.Module` (with `example_inputs`), an aten-level `fx.GraphModule`, a Dynamo
    FX graph (with `example_inputs`), a path to an `.onnx` file, or an `onnx.ModelProto`.

    >>> import torch, sparsegraph as sg
    >>> g = sg.capture(torch.nn.Linear(16, 32), (torch.randn(2, 16),))
    >>> [op.op for op in g]
    ['linear']
    """
    if isinstance(model, (str, os.PathLike)) or type(model).__module__.startswith(("onnx", "onnx_ir")):
        from .onnx.capture import capture_onnx
        shapes = None
        if isinstance(example_inputs, dict):  # input name -> tensor or shape
            shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
                      for k, v in example_inputs.items()}
        return capture_onnx(model, name=name, input_shapes=shapes)
    if isinstance(model, ModelGraph):
        return model
    label = name or type(model).__name__
    if isinstance(model, fx.GraphModule) and not _is_aten(model.graph):
        args = _as_tuple(example_inputs)
        if not args:
            raise CaptureError(f"cannot capture FX graph {label}: example inputs are required")
        try:
            gm = canonicalize(aten_graph(model, args), training=model.training)
        except Exception as e:  # noqa: BLE001
            raise CaptureError(f"cannot capture FX graph {label}: {_first_line(e)}") from e
    else:
        gm = trace(model, example_inputs, dynamic=dynamic, name=name)
    return from_fx(gm, name=label)

