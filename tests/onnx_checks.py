"""Checks shared by the ONNX tests."""
from __future__ import annotations

import numpy as np
import onnx
import torch


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def check_written(path) -> None:
    """The file as written passes `onnx.checker.check_model(path, full_check=True)` (strict shape and
    type inference); its sparse weights are `Constant(sparse_value)` nodes, and only the defaults of
    sparse-tensor inputs (ort-sparse weights) are sparse initializers."""
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    sparse_inputs = {i.name for i in proto.graph.input if i.type.HasField("sparse_tensor_type")}
    assert {sp.values.name for sp in proto.graph.sparse_initializer} <= sparse_inputs


def randomize_batch_norms(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so folding them is really tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for t in (m.weight, m.bias, m.running_mean):
                t.data = torch.randn(t.shape, generator=g) * 0.5
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
