"""Everything ONNX in one place: capture (`capture`), export from PyTorch (`export`), the ONNX
Sparse-IFT rewrite (`rewrite`), folding (`fold`) and ONNX Runtime lowering (`lower`) passes on
onnx_ir, the ort-native custom op (`native`), and the API users call as `sg.onnx.*` (`api`).
Imported on first use of `sg.onnx`."""
from .api import *  # noqa: F401,F403 - sg.onnx.sparsify, fold, lower, save, load, read_plan, Session, ...
from .api import __all__ as _api
from . import native
from .export import export_onnx

__all__ = [*_api, "export_onnx", "native"]
