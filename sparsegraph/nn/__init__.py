"""The small modules the module form swaps in (DESIGN.md section 1, *module* emitter):
masked layers (Sparse Wide and every sparse weight), parallel branches, U/V factors, doped paths."""
from .factorized import SparseDoped, SparseFactorized, doped_
from .masked import Masked, mask_, masked_class, masked_tensor, unmask
from .parallel import ParallelNorm, SparseParallel, parallel_
from .product import layer_kind, plain_like, product, weight_of

__all__ = ["Masked", "mask_", "masked_class", "masked_tensor", "unmask", "SparseParallel", "ParallelNorm",
           "parallel_", "SparseFactorized", "SparseDoped", "doped_", "layer_kind", "plain_like", "product",
           "weight_of"]
