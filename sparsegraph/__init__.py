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

__all__ = ["analyze", "analyze_dims", "capture", "trace", "sparsify", "save", "load", "SparsityPlan", "plan_of",
           "ModelGraph", "SparsegraphError", "CaptureError"]
__version__ = "0.1.0"
