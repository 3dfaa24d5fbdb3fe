"""The op's CPU kernels in C++ (`cpu_op.cpp`): `sparsegraph::sparse_linear` without Python on its way.

Through the Python body, a call of the op costs 45-65 µs on a Zen 3 before the product starts (the
custom-op machinery and its autograd wrapper, argument checks, the choice of kernel), more than a
small product itself. `cpu_op.cpp` registers C++ kernels for the op's CPU and AutogradCPU dispatch
keys: the first checks the arguments and calls the native library directly, the second records the
backward only when a gradient is needed, so a call costs about 5 µs (`F.linear` 2.7); cases the
kernel does not take go to the Python body. `sparsegraph::sparse_linear_packed` (inference only, W's
blocks pre-transposed, what frozen compiled graphs call) gets the same two kernels, and
`sparsegraph::sparse_conv2d` a CPU kernel (its autograd stays Python). It is compiled once per
PyTorch build with `g++` (`$CXX`) against the headers PyTorch ships, cached beside the native
library (about 20 s), and loaded with it (`cpu.library()`). Without a C++ compiler, if the build
fails, or with `SPARSEGRAPH_NATIVE_OP=0`, the ops keep their Python bodies (one warning names the
cause of a failure); `ERROR` says why.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import warnings

import torch

ERROR: str | None = None  # why the C++ kernel is not registered (None: registered, or not tried)
_loaded: ctypes.CDLL | None = None
SOURCE = os.path.join(os.path.dirname(__file__), "cpu_op.cpp")


def _build() -> str:
    from .cpu import build_cached, compiler_version

    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    root = os.path.dirname(torch.__file__)
    include, lib = os.path.join(root, "include"), os.path.join(root, "lib")
    if not os.path.isdir(os.path.join(include, "torch")):
        raise RuntimeError(f"this PyTorch ships no C++ headers ({include})")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O2", "-std=c++20", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}"]
    link = (f"-L{lib}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}")
    with open(SOURCE) as f:
        text = f.read()
    key = "\0".join([text, " ".join(flags + list(link)), compiler_version(cxx), torch.__version__,
                     str(torch.version.git_version)])
    return build_cached([cxx, *flags], text, "cpu_op.cpp", "libsparsegraph_op-", key, link,
                        note="building the op's C++ CPU kernel for this PyTorch (once, about 20 s)")


def point(lib: ctypes.CDLL) -> None:
    """Make the registered kernel call `lib`'s products (a build of the native library, e.g. the
    tests' other `-march` forms)."""
    from .cpu import SMALL_M, TRANSPOSE_BELOW_BLOCK, TRANSPOSE_ROWS

    fns = [ctypes.cast(getattr(lib, name + sfx), ctypes.c_void_p).value for sfx in ("_f32", "_f64")
           for name in ("sg_rows_packed", "sg_rows", "sg_cols", "sg_conv2d")]
    _loaded.sg_op_init((ctypes.c_void_p * 8)(*fns), lib.vector_bytes, SMALL_M, TRANSPOSE_BELOW_BLOCK, TRANSPOSE_ROWS)


def load(lib: ctypes.CDLL) -> bool:
    """Build (once, cached) and register the C++ kernel, pointing it at the native library `lib`."""
    global _loaded, ERROR
    if _loaded is not None:
        return True
    if os.environ.get("SPARSEGRAPH_NATIVE_OP", "1") == "0":
        ERROR = "disabled by SPARSEGRAPH_NATIVE_OP=0"
        return False
    from . import sparse_linear  # noqa: F401 - defines the ops the kernel is registered for

    try:
        path = _build()
        so = ctypes.CDLL(path)
        so.sg_op_init.argtypes, so.sg_op_init.restype = [ctypes.c_void_p] + [ctypes.c_int64] * 4, None
        torch.ops.load_library(path)  # registers the kernel, which takes the Python body until pointed at lib
    except Exception as e:  # noqa: BLE001 - any failure means: keep the Python body
        ERROR = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        warnings.warn(f"sparsegraph: the op's C++ CPU kernel is unavailable ({ERROR}); sparse_linear runs its "
                      "Python body (tens of µs more per call)", RuntimeWarning, stacklevel=3)
        return False
    _loaded = so
    point(lib)
    return True


def loaded() -> bool:
    return _loaded is not None
