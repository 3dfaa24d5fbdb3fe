"""The small modules the module form swaps in (DESIGN.md section 1, *module* emitter):
masked layers (Sparse Wide and every sparse weight), parallel branches, U/V factors, doped paths,
and the lowered layers `sg.lower` swaps in."""
from .factorized import SparseDoped, SparseFactorized, doped_
from .lowered import LoweredConv2d, LoweredLinear, SparseLayout, is_lowered, lower_weight_
from .masked import Masked, bake_masks, mask_, masked_class, masked_tensor, unmask
from .parallel import ParallelNorm, SparseParallel, parallel_
from .product import apply, layer_kind, plain_like, product, weight_of

__all__ = ["Masked", "bake_masks", "mask_", "masked_class", "masked_tensor", "unmask", "SparseParallel",
           "ParallelNorm", "parallel_", "SparseFactorized", "SparseDoped", "doped_", "LoweredLinear",
           "LoweredConv2d", "SparseLayout", "is_lowered", "lower_weight_", "apply", "layer_kind", "plain_like",
           "product", "weight_of"]
