"""Model specs the CLI understands, and the built-in models.

MODEL is one of:
  gpt-mini | resnet18 | resnet-mini        built-in (random init)
  torchvision:NAME                         e.g. torchvision:resnet18 (random init, no download)
  hf:ARCH                                  e.g. hf:gpt2, hf:bert, hf:llama (default config, random init;
                                           models over 1B parameters are built on the meta device)
  package.module:callable                  returns an nn.Module or (nn.Module, example_inputs)
  path/to/model.onnx                       an ONNX file
  path/to/model.sgm                        a model saved with sg.save
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..graph import SparsegraphError
from .gpt import GPT, GPTConfig
from .resnet import ResNet

DEFAULT_MODEL = "gpt-mini"
META_THRESHOLD = 1_000_000_000  # parameters; larger hf models are analysed without allocation


@dataclass
class ModelSpec:
    name: str
    model: Any  # nn.Module, or a path for ONNX files
    example_inputs: tuple = ()
    make_input: Callable[[tuple[int, ...]], tuple] | None = field(default=None, repr=False)
    kind: str = "torch"  # torch | onnx | saved


def _floats(shape, device="cpu") -> tuple:
    return (torch.randn(*shape, device=device),)


def _tokens(vocab: int, device="cpu"):
    def make(shape):
        if device == "meta":
            return (torch.empty(*shape, dtype=torch.long, device="meta"),)
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, vocab, tuple(shape), generator=g),)
    return make


BUILTINS: dict[str, Callable[[], ModelSpec]] = {
    # the default: 4-layer, d=128 character-level GPT
    "gpt-mini": lambda: ModelSpec("gpt-mini", GPT(GPTConfig()), _tokens(256)((2, 64)), _tokens(256)),
    # CIFAR ResNet-18: widths 64-128-256-512, 32x32 inputs, 10 classes
    "resnet18": lambda: ModelSpec("resnet18", ResNet(), _floats((2, 3, 32, 32)), _floats),
    # a small BN ResNet for 8x8 grey-scale digits (scikit-learn's bundled data set), upsampled to 16x16
    "resnet-mini": lambda: ModelSpec("resnet-mini", ResNet((16, 32, 64), (1, 1, 1), 10, 1),
                                     _floats((2, 1, 16, 16)), _floats),
}


def builtin(name: str, **overrides) -> ModelSpec:
    """A built-in model with its example inputs, e.g. `builtin("gpt-mini", n_layer=12)`."""
    if name not in BUILTINS:
        raise SparsegraphError(f"unknown built-in model {name!r}; choose from {', '.join(BUILTINS)}")
    spec = BUILTINS[name]()
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    if overrides and name == "gpt-mini":
        spec.model = GPT(_gpt_config(name, overrides))
    elif overrides:  # the ResNets: stage widths and blocks per stage, e.g. widths=(8, 16, 32) or "8,16,32"
        unknown = sorted(set(overrides) - {"widths", "blocks"})
        if unknown:
            raise SparsegraphError(f"built-in {name!r} takes the options widths and blocks, not {', '.join(unknown)}")
        base = spec.model
        widths = _ints(name, "widths", overrides.get("widths", [layer[0].conv1.out_channels for layer in base.layers]))
        blocks = _ints(name, "blocks", overrides.get("blocks", [len(layer) for layer in base.layers]))
        if len(widths) != len(blocks):
            raise SparsegraphError(f"built-in {name!r}: widths has {len(widths)} stages and blocks {len(blocks)}; "
                                   "give both options with one value per stage")
        spec.model = ResNet(widths, blocks, base.fc.out_features, base.conv1.in_channels)
    spec.model._sparsegraph_source = {"kind": "builtin", "name": name, "options": options}  # sg.load rebuilds it
    return spec


def _gpt_config(name: str, overrides: dict) -> GPTConfig:
    """A GPTConfig from user options, every key and value checked: one line naming the bad one."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise SparsegraphError(f"built-in {name!r} takes the options {', '.join(defaults)}, not {', '.join(unknown)}")
    for key, value in overrides.items():
        if isinstance(defaults[key], float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise SparsegraphError(f"built-in {name!r} option {key}={value!r}: expected a number in [0, 1)")
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SparsegraphError(f"built-in {name!r} option {key}={value!r}: expected a positive integer")
    cfg = GPTConfig(**overrides)
    if cfg.n_embd % cfg.n_head:
        raise SparsegraphError(f"built-in {name!r}: n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}")
    return cfg


def _ints(name: str, key: str, value) -> tuple[int, ...]:
    """'8,16,32' or (8, 16, 32) -> (8, 16, 32); one line naming the option otherwise."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    out = tuple(_positive_int(v) for v in items)
    if not out or None in out:
        raise SparsegraphError(f"built-in {name!r} option {key}={value!r}: expected positive integers, "
                               "e.g. 8,16,32")
    return out


def _positive_int(v) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        return None
    try:
        n = int(v)
    except ValueError:
        return None
    return n if n > 0 else None


def _torchvision(name: str) -> ModelSpec:
    try:
        import torchvision
    except ImportError as e:
        raise SparsegraphError("torchvision:NAME needs torchvision (pip install torchvision)") from e
    try:
        model = torchvision.models.get_model(name, weights=None)
    except Exception as e:  # noqa: BLE001
        raise SparsegraphError(f"unknown torchvision model {name!r}: {e}") from e
    model._sparsegraph_source = {"kind": "torchvision", "name": name}
    return ModelSpec(f"torchvision:{name}", model, _floats((2, 3, 224, 224)), _floats)


def _hf(arch: str) -> ModelSpec:
    try:
        import transformers
    except ImportError as e:
        raise SparsegraphError("hf:ARCH needs transformers (pip install transformers)") from e
    try:
        cfg = transformers.AutoConfig.for_model(arch)
    except Exception as e:  # noqa: BLE001
        raise SparsegraphError(f"unknown Hugging Face architecture {arch!r}: {e}") from e
    cfg.use_cache = False
    for auto in (transformers.AutoModelForMaskedLM, transformers.AutoModelForCausalLM, transformers.AutoModel):
        if type(cfg) in auto._model_mapping:
            break
    with torch.device("meta"):
        model = auto.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    device = "meta" if n > META_THRESHOLD else "cpu"
    if device == "cpu":
        torch.manual_seed(0)
        model = auto.from_config(cfg)
    model.eval()
    vocab = getattr(cfg, "vocab_size", 100) or 100
    make = _tokens(min(vocab, 1000), device)
    return ModelSpec(f"hf:{arch}", model, make((2, 128 if device == "meta" else 32)), make)


def _callable(ref: str) -> ModelSpec:
    mod_name, _, attr = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise SparsegraphError(f"cannot import {ref!r}: {e}") from e
    out = fn()
    model, inputs = out if isinstance(out, tuple) else (out, None)
    if not isinstance(model, nn.Module):
        raise SparsegraphError(f"{ref} returned {type(model).__name__}, expected an nn.Module")
    if inputs is None:
        raise SparsegraphError(f"{ref} returned a model without example inputs; return (model, inputs)")
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return ModelSpec(ref, model, inputs, None)


def load_model(spec: str | None) -> ModelSpec:
    """Resolve a MODEL string (see the module docstring)."""
    spec = spec or DEFAULT_MODEL
    if spec.endswith(".onnx"):
        if not os.path.exists(spec):
            raise SparsegraphError(f"ONNX file not found: {spec}")
        return ModelSpec(os.path.basename(spec), spec, kind="onnx")
    if spec in BUILTINS:
        return builtin(spec)
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1])
    if spec.startswith("hf:"):
        return _hf(spec.split(":", 1)[1])
    if os.path.exists(spec):
        from ..io import load
        model = load(spec)
        inputs = getattr(model, "example_inputs", ())
        return ModelSpec(os.path.basename(spec), model, tuple(inputs), None, kind="saved")
    if ":" in spec:
        return _callable(spec)
    raise SparsegraphError(f"unknown model {spec!r}: expected a built-in ({', '.join(BUILTINS)}), "
                           "torchvision:NAME, hf:ARCH, package.module:callable, a .onnx file or a saved model")


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224); one clear error otherwise."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise SparsegraphError(f"bad --input-shape {text!r}: expected comma-separated positive integers, e.g. 1,3,224,224")
    return shape
