"""sparsegraph: compiler passes for sparse neural networks.

    >>> import torch, sparsegraph as sg
    >>> from sparsegraph.models import builtin
    >>> spec = builtin("gpt-mini")
    >>> report = sg.analyze(spec.model, spec.example_inputs)
    >>> report.dense_flops > 0
    True
"""
from .analysis import analyze
from .capture import capture, trace
from .dims import analyze_dims
from .graph import CaptureError, ModelGraph, SparsegraphError
from .io import load, save
from .plan import SparsityPlan, plan_of
from .sparsify import sparsify
from . import supar
from .train import dst
from .train.recompute import checkpoint_blocks
from .train.sparseopt import SparseOpt
from .passes.fold import fold
from .passes.lower import lower

__all__ = ["analyze", "analyze_dims", "capture", "trace", "sparsify", "save", "load", "SparsityPlan", "plan_of",
           "ModelGraph", "SparsegraphError", "CaptureError", "dst", "SparseOpt", "supar", "checkpoint_blocks",
           "export_onnx", "onnx", "fold", "lower", "from_pretrained", "dist"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`sg.onnx` (sparsify, fold, lower, save, load, read_plan, Session) and `sg.export_onnx` import
    onnx_ir on first use, not with the package; `sg.from_pretrained` imports transformers on first use."""
    if name == "onnx":
        import importlib
        return importlib.import_module(".onnx", __name__)
    if name == "dist":  # torch.distributed.checkpoint is imported on first use
        import importlib
        return importlib.import_module(".dist", __name__)
    if name == "export_onnx":
        from .onnx.export import export_onnx
        return export_onnx
    if name == "from_pretrained":
        from .integrations.hf import from_pretrained
        return from_pretrained
    raise AttributeError(f"module 'sparsegraph' has no attribute {name!r}")
