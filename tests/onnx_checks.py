"""Checks shared by the ONNX tests."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import torch

from sparsegraph.capture_onnx import densify_sparse_initializers


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def check_written(path) -> None:
    """The file as written passes `onnx.checker`; with its sparse initializers densified (as ONNX Runtime
    does at load) it passes the full check. ONNX's shape inference does not type sparse initializers
    read by standard ops (test_full_check_without_sparse_initializers); the defaults of sparse-tensor
    inputs (ort-sparse weights) stay sparse."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    sparse_inputs = {i.name for i in proto.graph.input if i.type.HasField("sparse_tensor_type")}
    dense = copy.deepcopy(proto)
    del dense.graph.sparse_initializer[:]
    dense.graph.sparse_initializer.extend(sp for sp in proto.graph.sparse_initializer
                                          if sp.values.name not in sparse_inputs)
    dense = densify_sparse_initializers(dense)
    dense.graph.sparse_initializer.extend(sp for sp in proto.graph.sparse_initializer if sp.values.name in sparse_inputs)
    onnx.checker.check_model(dense, full_check=True)


def randomize_batch_norms(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so folding them is really tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for t in (m.weight, m.bias, m.running_mean):
                t.data = torch.randn(t.shape, generator=g) * 0.5
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
