"""CPU block-sparse products: a small C/OpenMP library built on first use, PyTorch's sparse kernels otherwise.

The library (`cpu_source.py`, plain C with GCC vector extensions, no PyTorch headers) is compiled
once per machine with `gcc -O3 -march=native -fopenmp` into a cache folder
(`$SPARSEGRAPH_CACHE`, default `~/.cache/sparsegraph`; the file name hashes the source, the
compiler and the CPU model/flags) and loaded with ctypes. Building takes about two seconds. If no C
compiler is found, the build fails, or `SPARSEGRAPH_NATIVE=0` is set, every product falls back to
PyTorch (MKL-backed BSR/CSR `torch.sparse.mm` for float32/float64, a dense product of the unpacked
weight otherwise), with one warning naming the cause. OpenMP resolves to the libgomp PyTorch has
already loaded, so both share one thread pool; the kernels use `torch.get_num_threads()` threads.

A block-sparse W (n, k) with blocks b x b is given in BSR form: `values` (nnzb, b, b) in W's
orientation, zero-padded at ragged edges; `crow` (ceil(n/b)+1,), `col` (nnzb,) int32; and the
BSR of W^T as `crow_t`, `col_t` and `perm_t` (the value index of each W^T block). CSR is b = 1.

Linear layers whose block is a multiple of the vector width (16 floats with AVX-512, 8 with AVX2) run
the packed rows kernel (`sg_rows_packed`); `Prepared` makes such a product one native call for eager
inference, and `cpu_op` (loaded with the library) has the op `sparsegraph::sparse_linear` call it
from C++. Two data layouts, for the two ways a sparse weight is applied:

    rows:  x (M, k) -> y (M, n) = x W^T + bias           linear layers (and transposed convs of them)
    cols:  X (P, k, L) -> Y (P, n, L) = W X + bias        an im2col view (L positions per image)

    >>> import torch
    >>> from sparsegraph.backends import cpu
    >>> from sparsegraph.backends.triton_kernels import make_layout, pack_values
    >>> w = torch.randn(40, 24) * (torch.rand(40, 24) < 0.3)
    >>> L = make_layout(w.ne(0), block=1, n=40, k=24)
    >>> x = torch.randn(5, 24)
    >>> y = cpu.linear(x, pack_values(w, L), L.crow, L.col, None, 40, 24, 1)
    >>> torch.allclose(y, x @ w.T, atol=1e-5)
    True
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import torch
from torch import Tensor

from .cpu_source import source

ABI_VERSION = 1
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
BUILD_ERROR: str | None = None  # why the native kernels are unavailable (None: available or not tried)

# path thresholds (see bench/layer_kernels.py and cost_model.py for the measurements behind them)
SMALL_M = 4  # below this many rows, narrow-block linear products run as dot products over W's own rows
TRANSPOSE_BELOW_BLOCK = 8  # blocks narrower than this run the rows layout through x^T (lanes along M)
TRANSPOSE_ROWS = 2048  # ... in chunks of this many rows, so x^T and y^T stay in cache


# ---------------------------------------------------------------------------------------------
# building and loading
# ---------------------------------------------------------------------------------------------
def cache_dir() -> str:
    return os.environ.get("SPARSEGRAPH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsegraph")


def _cpu_signature() -> str:
    """CPU model and feature flags: a library built with -march=native is only valid on the same CPU."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    sig += line
                if line.strip() == "":
                    break
    except OSError:
        sig += platform.processor()
    return sig


def _compiler() -> str | None:
    cc = os.environ.get("CC", "gcc")
    return shutil.which(cc)


def build_cached(cmd: list[str], text: str, name: str, prefix: str, key: str, link: tuple = (),
                 note: str | None = None) -> str:
    """Compile `text` (saved as `name`) with `cmd + [source, *link, "-o", output]` into the cache folder as
    `<prefix><hash of key>.so`, unless it is there (printing `note` on stderr while it builds); remove
    this prefix's libraries of other keys."""
    folder = cache_dir()
    path = os.path.join(folder, f"{prefix}{hashlib.sha256(key.encode()).hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    if note:
        print(f"sparsegraph: {note} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = os.path.join(tmp, name)
        with open(src, "w") as f:
            f.write(text)
        out = os.path.join(tmp, "lib.so")
        proc = subprocess.run([*cmd, src, *link, "-o", out], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cmd[0])} failed: "
                               f"{(proc.stderr or proc.stdout).strip().splitlines()[:1]}")
        os.replace(out, path)  # atomic: concurrent builders never see a half-written library
    if note:
        print(f" done in {time.perf_counter() - start:.1f} s, cached in {folder}", file=sys.stderr, flush=True)
    for old in os.listdir(folder):  # this target's libraries of earlier sources (a loaded one stays valid)
        if old.startswith(prefix) and old.endswith(".so") and old != os.path.basename(path):
            try:
                os.unlink(os.path.join(folder, old))
            except OSError:
                pass
    return path


def compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout


def build_kernels(cc: str, march: str = "native", *, extra: str = "", flags: tuple = (), prefix: str | None = None,
                  name: str = "kernels.c", key: str = "", note: str | None = None) -> str:
    """The kernels' C source, followed by `extra` (another library's own code, e.g. the ONNX Runtime op),
    built with `gcc -O3 -march=<march> -fopenmp` and `flags` into the cache; `key` adds what else the
    build depends on (a header's hash)."""
    text = source() + extra
    flags = ["-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", *flags]
    key = "\0".join([text, " ".join(flags), compiler_version(cc), _cpu_signature(), key])
    prefix = prefix or ("libsparsegraph_cpu-" if march == "native" else f"libsparsegraph_cpu_{march}-")
    return build_cached([cc, *flags], text, name, prefix, key, note=note)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    sigs = {
        "sg_rows": [i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i32, ptr, ptr, i64, i32],
        "sg_rows_packed": [i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i32, ptr, ptr, i64, i32],
        "sg_cols": [i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, i32],
        "sg_sddmm_rows": [i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, i32],
        "sg_sddmm_cols": [i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i32],
        "sg_conv2d": [i64] * 14 + [ptr] * 6 + [i32],
    }
    lib.sg_fma_peak.argtypes, lib.sg_fma_peak.restype = [i64, i32], ctypes.c_float
    lib.sg_vector_bytes.argtypes, lib.sg_vector_bytes.restype = [], ctypes.c_int
    for suffix in ("_f32", "_f64"):
        fn = getattr(lib, "sg_rows_plan" + suffix)
        fn.argtypes, fn.restype = [ptr, i64, ptr, ptr, i32], ctypes.c_int
    lib.vector_bytes = lib.sg_vector_bytes()  # read once: `_lanes` runs on every product
    for name, args in sigs.items():
        for suffix in ("_f32", "_f64"):
            fn = getattr(lib, name + suffix)
            fn.argtypes, fn.restype = args, ctypes.c_int


def load(march: str = "native") -> ctypes.CDLL:
    """Build (once, cached) and load the library for `gcc -march=<march>`. The vector width and the
    register tiles follow the target's registers, so an AVX-512 CPU also runs the AVX2 form
    (`x86-64-v3`) and the SSE form (`x86-64-v2`): the tests check every form the CPU can run."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'gcc')}) on PATH")
    lib = ctypes.CDLL(build_kernels(cc, march))
    if lib.sg_abi_version() != ABI_VERSION:
        raise RuntimeError("stale library in the cache (ABI version mismatch)")
    _declare(lib)
    return lib


def library() -> ctypes.CDLL | None:
    """The native kernel library, built and loaded on first call; None (with one warning) if unavailable."""
    global _lib, _tried, BUILD_ERROR
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("SPARSEGRAPH_NATIVE", "1") == "0":
                raise RuntimeError("disabled by SPARSEGRAPH_NATIVE=0")
            _lib = load()
            from . import cpu_op

            cpu_op.load(_lib)
        except Exception as e:  # noqa: BLE001 - any failure means: use the PyTorch fallback
            BUILD_ERROR = f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)
            if os.environ.get("SPARSEGRAPH_NATIVE", "1") != "0":
                warnings.warn(f"sparsegraph: native CPU sparse kernels unavailable ({BUILD_ERROR}); "
                              "using PyTorch's sparse kernels instead", RuntimeWarning, stacklevel=2)
        _tried = True
    return _lib


_peaks: dict[int, float] = {}


def fma_peak(threads: int | None = None) -> float | None:
    """This CPU's measured fp32 FMA peak in FLOP/s at `threads` threads (default: PyTorch's count):
    12 independent vector FMA chains per thread for about 0.1 s, best of three; None without the
    native library. The roofline every kernel and dense baseline is judged against."""
    lib = library()
    if lib is None:
        return None
    threads = threads or _threads()
    if threads not in _peaks:
        iters, best = 1 << 20, 0.0
        for _ in range(3):
            t = time.perf_counter()
            lib.sg_fma_peak(iters, threads)
            best = max(best, iters * 6.0 * lib.vector_bytes * threads / (time.perf_counter() - t))
        _peaks[threads] = best
    return _peaks[threads]


def available() -> bool:
    return library() is not None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def keep_heap(limit: int = 1 << 30) -> bool:
    """Keep freed blocks of up to `limit` bytes (at most 2 GiB) in the process's heap instead of
    returning them to the OS (glibc's malloc). As is, glibc maps a large block of its own when it is
    allocated and unmaps it when it is freed, or trims the heap's free top: every forward of a model
    with wide activations then faults their pages in again, zeroed one by one (a Sparse Wide
    ResNet-18 at s = 0.75, batch 32: 20,000-34,000 faults a forward on a Zen 3; the dense original,
    half as wide, none). After this call freed memory stays in the process for the next forward,
    whose resident size stays at its peak: what `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`
    in the environment do, for a process already running. Returns False, changing nothing, where the
    C library is not glibc. Call it once, e.g. before serving:

        from sparsegraph.backends import cpu
        cpu.keep_heap()
    """
    if limit <= 0:
        raise ValueError(f"keep_heap: limit must be a positive number of bytes, got {limit}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    limit = min(limit, 2 ** 31 - 1)  # (an int)
    return mallopt(M_MMAP_THRESHOLD, limit) == 1 and mallopt(M_TRIM_THRESHOLD, limit) == 1


def _native(*tensors: Tensor):
    """The library if it can run on these tensors (CPU, float32/float64, one dtype), else None."""
    lib = library()
    if lib is None:
        return None
    dtype = tensors[0].dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        return None
    for t in tensors:  # (a loop, not any(...): this runs on every product, one row included)
        if t is not None and (not t.is_cpu or t.dtype is not dtype):
            return None
    return lib


def _sfx(t: Tensor) -> str:
    return "_f32" if t.dtype == torch.float32 else "_f64"


def _p(t: Tensor | None):
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("sparsegraph CPU kernel: could not allocate a work buffer")


def _i32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


# ---------------------------------------------------------------------------------------------
# raw native calls (contiguous inputs)
# ---------------------------------------------------------------------------------------------
def _rows(lib, x: Tensor, values: Tensor, crow: Tensor, col: Tensor, perm: Tensor | None, trans: bool,
          bias: Tensor | None, out: int, b: int) -> Tensor:
    M, IN = x.shape
    y = torch.empty(M, out, dtype=x.dtype)
    _check(getattr(lib, "sg_rows" + _sfx(x))(M, IN, out, b, _p(x), IN, _p(values), _p(crow), _p(col), _p(perm),
                                             int(trans), _p(bias), _p(y), out, _threads()))
    return y


def _lanes(t: Tensor) -> int:
    """Elements per vector register (64 bytes with AVX-512, 32 with AVX2): blocks of a multiple of
    this run the packed rows kernel."""
    return library().vector_bytes // t.element_size()


def _blocks_in_out(values: Tensor) -> Tensor:
    """`values.transpose(1, 2)`, contiguous: each block of W stored (in, out), as the packed rows
    kernel reads it. `Prepared` keeps one; the op passes W's own blocks and the kernel transposes them
    as it goes (compiled code may rewrite a tensor's memory without bumping its version, so no copy
    keyed on a tensor could be trusted there)."""
    return values.detach().transpose(1, 2).contiguous()


def _rows_packed(lib, x: Tensor, wp: Tensor, crow: Tensor, col: Tensor, perm: Tensor | None, trans: bool,
                 bias: Tensor | None, out: int, b: int) -> Tensor:
    M, IN = x.shape
    y = torch.empty(M, out, dtype=x.dtype)
    _check(getattr(lib, "sg_rows_packed" + _sfx(x))(M, IN, out, b, _p(x), IN, _p(wp), _p(crow), _p(col), _p(perm),
                                                    int(trans), _p(bias), _p(y), out, _threads()))
    return y


class _Plan(ctypes.Structure):
    """`sg_plan_t`: one fixed weight's arguments of `sg_rows_packed`."""
    _fields_ = [("in_", ctypes.c_int64), ("out", ctypes.c_int64), ("b", ctypes.c_int64), ("wp", ctypes.c_void_p),
                ("crow", ctypes.c_void_p), ("col", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class Prepared:
    """`linear` for one fixed weight as a single native call: pointers, kernel and the blocks in
    (in, out) order are resolved once, so a call costs one `torch.empty` and one ctypes call of four
    arguments (the eager inference path of lowered layers, where the op's Python dispatch would cost
    more than a small product). It applies to x a plain CPU tensor of the weight's dtype with k features
    (`accepts`) while the bias, values and index tensors are the same ones, unchanged since (`current`:
    their storage and version counters; an optimizer step or an in-place DST update makes a new one)."""

    __slots__ = ("fn", "plan", "src", "state", "keep", "n", "k", "dtype")

    def __init__(self, lib, values: Tensor, crow: Tensor, col: Tensor, bias: Tensor | None, n: int, k: int, b: int):
        wp, crow32, col32 = _blocks_in_out(values), _i32(crow), _i32(col)
        bias_c = bias.detach().contiguous() if bias is not None else None
        self.fn = getattr(lib, "sg_rows_plan" + _sfx(values))
        self.src = (values, bias, crow, col)
        self.state = self._state(self.src)
        self.keep = (wp, crow32, col32, bias_c)  # the buffers the plan points into
        self.n, self.k, self.dtype = n, k, values.dtype
        plan = _Plan(k, n, b, wp.data_ptr(), crow32.data_ptr(), col32.data_ptr(), _p(bias_c))
        self.plan = ctypes.byref(plan)  # (which holds the struct)

    @staticmethod
    def _state(tensors) -> list:
        return [(t.data_ptr(), t._version) if t is not None else None for t in tensors]

    @classmethod
    def make(cls, values: Tensor, crow: Tensor, col: Tensor, bias: Tensor | None, n: int, k: int,
             b: int) -> "Prepared | None":
        """None where the packed native kernel does not apply (no library, dtype, block size)."""
        lib = _native(values, bias)
        if lib is None or values.dim() != 3 or b % _lanes(values) or any(
                t is not None and t.is_inference() for t in (values, bias, crow, col)):
            return None  # (inference tensors keep no version counter to check)
        return cls(lib, values, crow, col, bias, n, k, b)

    def current(self, bias: Tensor | None, crow: Tensor | None = None, col: Tensor | None = None) -> bool:
        """The weight it was made for is still the layer's, unchanged."""
        values, b0, crow0, col0 = self.src
        return (bias is b0 and (crow is None or crow is crow0) and (col is None or col is col0)
                and self._state(self.src) == self.state)

    def accepts(self, x: Tensor) -> bool:
        return type(x) is Tensor and x.is_cpu and x.dtype is self.dtype and x.dim() > 0 and x.shape[-1] == self.k

    def __call__(self, x: Tensor) -> Tensor:
        x = x if x.is_contiguous() else x.contiguous()  # (..., k)
        y = torch.empty((*x.shape[:-1], self.n), dtype=self.dtype)  # (..., n)
        if M := y.numel() // self.n:
            _check(self.fn(self.plan, M, x.data_ptr(), y.data_ptr(), _threads()))
        return y


def _cols(lib, X: Tensor, values: Tensor, crow: Tensor, col: Tensor, perm: Tensor | None, so: int, si: int,
          bias: Tensor | None, out: int, b: int) -> Tensor:
    P, IN, L = X.shape
    Y = torch.empty(P, out, L, dtype=X.dtype)
    if Y.numel() == 0:  # no images or no lanes (the kernel's lane blocks would be empty)
        return Y
    _check(getattr(lib, "sg_cols" + _sfx(X))(P, IN, out, L, b, _p(X), _p(values), _p(crow), _p(col), _p(perm),
                                             so, si, _p(bias), _p(Y), _threads()))
    return Y


# ---------------------------------------------------------------------------------------------
# PyTorch fallback (MKL BSR/CSR for float32/float64; dense products of the unpacked weight otherwise)
# ---------------------------------------------------------------------------------------------
def _torch_sparse(values: Tensor, crow: Tensor, col: Tensor, rows: int, cols: int, b: int) -> Tensor:
    R, C = -(-rows // b), -(-cols // b)
    with warnings.catch_warnings():  # "sparse CSR support is in beta", "invariant checks disabled"
        warnings.simplefilter("ignore", UserWarning)
        if b == 1:
            return torch.sparse_csr_tensor(crow.long(), col.long(), values.reshape(-1), (R, C),
                                           check_invariants=False)
        return torch.sparse_bsr_tensor(crow.long(), col.long(), values, (R * b, C * b), check_invariants=False)


def unpack(values: Tensor, crow: Tensor, col: Tensor, n: int, k: int, b: int) -> Tensor:
    """Dense (n, k) weight from BSR values (zeros outside the blocks)."""
    R, C = -(-n // b), -(-k // b)
    row = torch.repeat_interleave(torch.arange(R, device=values.device), torch.diff(crow.long()).to(values.device),
                                  output_size=values.shape[0])
    blocks = values.new_zeros(R, C, b, b)
    blocks[row, col.long().to(values.device)] = values
    return blocks.transpose(1, 2).reshape(R * b, C * b)[:n, :k]


def pack(weight: Tensor, crow: Tensor, col: Tensor, b: int) -> Tensor:
    """(nnzb, b, b) blocks of a dense (n, k) weight at the layout's blocks, zero-padded at ragged edges."""
    n, k = weight.shape
    R, C = -(-n // b), -(-k // b)
    padded = torch.nn.functional.pad(weight, (0, C * b - k, 0, R * b - n))
    row = torch.repeat_interleave(torch.arange(R, device=weight.device), torch.diff(crow.long()).to(weight.device),
                                  output_size=col.shape[0])
    return padded.reshape(R, b, C, b).transpose(1, 2)[row, col.long().to(weight.device)].contiguous()


def _fallback_apply(x2: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Tensor | None, n: int, k: int,
                    b: int) -> Tensor:
    """y (M, n) = x2 (M, k) @ W^T + bias through PyTorch."""
    if values.dtype in (torch.float32, torch.float64) and values.device.type == "cpu":
        C = -(-k // b)
        xp = torch.nn.functional.pad(x2, (0, C * b - k)) if C * b != k else x2
        y = torch.sparse.mm(_torch_sparse(values, crow, col, n, k, b), xp.t()).t()[:, :n]
    else:
        y = x2 @ unpack(values, crow, col, n, k, b).t()
    return (y + bias if bias is not None else y).contiguous()


def _transposed_values(values: Tensor, perm_t: Tensor) -> Tensor:
    return values.index_select(0, perm_t.long()).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# the products, rows layout (linear layers)
# ---------------------------------------------------------------------------------------------
def transposes(M: int, b: int) -> bool:
    """Whether `linear` runs M rows with b x b blocks on x^T and y^T (narrow blocks, from SMALL_M rows)."""
    return M >= SMALL_M and b < TRANSPOSE_BELOW_BLOCK


def linear(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Tensor | None, n: int, k: int,
           b: int, impl: str = "auto") -> Tensor:
    """y (M, n) = x (M, k) @ W^T + bias."""
    x = x.contiguous()
    M = x.shape[0]
    lib = _native(x, values, bias) if impl != "torch" else None
    if lib is None:
        return _fallback_apply(x, values, _i32(crow), _i32(col), bias, n, k, b)
    values, crow, col = values.contiguous(), _i32(crow), _i32(col)
    bias = bias.contiguous() if bias is not None else None
    if M == 0:
        return x.new_zeros(0, n)
    packed = b % _lanes(x) == 0
    if M == 1 or (M < SMALL_M and not packed):  # dot products along W's own (out, in) rows, x read as (M, k, 1)
        return _cols(lib, x.view(M, k, 1), values, crow, col, None, b, 1, bias, n, b).view(M, n)
    if packed:  # W's own (out, in) blocks, transposed by the kernel as it goes
        return _rows_packed(lib, x, values, crow, col, None, True, bias, n, b)
    if transposes(M, b):  # lanes along M: y^T = W x^T, in chunks of rows
        y = x.new_empty(M, n)
        for m0 in range(0, M, TRANSPOSE_ROWS):
            xc = x[m0:m0 + TRANSPOSE_ROWS]
            yt = _cols(lib, xc.t().contiguous().view(1, k, xc.shape[0]), values, crow, col, None, b, 1, bias, n, b)
            y[m0:m0 + TRANSPOSE_ROWS] = yt.view(n, xc.shape[0]).t()
        return y
    return _rows(lib, x, values, crow, col, None, True, bias, n, b)


def linear_packed(x: Tensor, values_t: Tensor, crow: Tensor, col: Tensor, bias: Tensor | None, n: int, k: int,
                  b: int) -> Tensor:
    """`linear` with W's blocks given pre-transposed, (in, out) (`_blocks_in_out`): the packed rows
    kernel on them as they are, at any number of rows; other cases through `linear` on a copy."""
    x = x.contiguous()
    lib = _native(x, values_t, bias)
    if lib is None or b % _lanes(x) or x.shape[0] == 0:
        return linear(x, values_t.transpose(1, 2), crow, col, bias, n, k, b)
    bias = bias.contiguous() if bias is not None else None
    return _rows_packed(lib, x, values_t.contiguous(), _i32(crow), _i32(col), None, False, bias, n, b)


def linear_grad_input(dy: Tensor, values: Tensor, crow_t: Tensor, col_t: Tensor, perm_t: Tensor, n: int, k: int,
                      b: int, impl: str = "auto") -> Tensor:
    """dx (M, k) = dy (M, n) @ W, through W^T's block structure (values read through perm_t)."""
    dy = dy.contiguous()
    M = dy.shape[0]
    lib = _native(dy, values) if impl != "torch" else None
    if lib is None:
        return _fallback_apply(dy, _transposed_values(values, perm_t), _i32(crow_t), _i32(col_t), None, k, n, b)
    values, crow_t, col_t, perm_t = values.contiguous(), _i32(crow_t), _i32(col_t), _i32(perm_t)
    if M == 0:
        return dy.new_zeros(0, k)
    if b % _lanes(dy) == 0:  # W's blocks are W^T's blocks stored (in, out): read in place through perm_t
        return _rows_packed(lib, dy, values, crow_t, col_t, perm_t, False, None, k, b)
    if b < TRANSPOSE_BELOW_BLOCK and M >= SMALL_M:  # element (o=kk, i=nn) of a W^T block at nn*b + kk
        dx = dy.new_empty(M, k)
        for m0 in range(0, M, TRANSPOSE_ROWS):
            g = dy[m0:m0 + TRANSPOSE_ROWS]
            dxt = _cols(lib, g.t().contiguous().view(1, n, g.shape[0]), values, crow_t, col_t, perm_t, 1, b, None,
                        k, b)
            dx[m0:m0 + TRANSPOSE_ROWS] = dxt.view(k, g.shape[0]).t()
        return dx
    return _rows(lib, dy, values, crow_t, col_t, perm_t, False, None, k, b)


def linear_grad_values(dy: Tensor, x: Tensor, crow: Tensor, col: Tensor, n: int, k: int, b: int,
                       impl: str = "auto") -> Tensor:
    """dV (nnzb, b, b) = (dy^T x) on W's nonzero blocks, zero at ragged edges."""
    dy, x = dy.contiguous(), x.contiguous()
    M = x.shape[0]
    lib = _native(dy, x) if impl != "torch" else None
    crow, col = _i32(crow), _i32(col)
    nnzb = col.shape[0]
    if lib is None:
        return pack(dy.t() @ x, crow, col, b)
    dv = torch.empty(nnzb, b, b, dtype=x.dtype)
    if b < TRANSPOSE_BELOW_BLOCK:  # dot products along M on the transposed operands, in chunks of rows
        part = torch.empty_like(dv)
        for m0 in range(0, M, TRANSPOSE_ROWS):
            gt, xt = dy[m0:m0 + TRANSPOSE_ROWS].t().contiguous(), x[m0:m0 + TRANSPOSE_ROWS].t().contiguous()
            out = dv if m0 == 0 else part
            _check(getattr(lib, "sg_sddmm_cols" + _sfx(x))(1, k, n, gt.shape[1], b, _p(gt), _p(xt), _p(crow),
                                                           _p(col), _p(out), _threads()))
            if m0:
                dv += part
        if M == 0:
            dv.zero_()
    else:
        _check(getattr(lib, "sg_sddmm_rows" + _sfx(x))(M, k, n, b, _p(dy), n, _p(x), k, _p(crow), _p(col), _p(dv),
                                                       _threads()))
    return dv


# ---------------------------------------------------------------------------------------------
# the products, cols layout (im2col views of convolutions: lanes along spatial positions)
# ---------------------------------------------------------------------------------------------
def apply_cols(X: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Tensor | None, n: int, k: int, b: int,
               impl: str = "auto") -> Tensor:
    """Y (P, n, L) = W X (P, k, L) + bias[:, None]."""
    X = X.contiguous()
    P, _, L = X.shape
    lib = _native(X, values, bias) if impl != "torch" else None
    if lib is None:
        x2 = X.transpose(1, 2).reshape(P * L, k)
        return _fallback_apply(x2, values, _i32(crow), _i32(col), bias, n, k, b).view(P, L, n).transpose(1, 2) \
            .contiguous()
    bias = bias.contiguous() if bias is not None else None
    return _cols(lib, X, values.contiguous(), _i32(crow), _i32(col), None, b, 1, bias, n, b)


def apply_cols_grad_input(G: Tensor, values: Tensor, crow_t: Tensor, col_t: Tensor, perm_t: Tensor, n: int, k: int,
                          b: int, impl: str = "auto") -> Tensor:
    """dX (P, k, L) = W^T G (P, n, L)."""
    G = G.contiguous()
    P, _, L = G.shape
    lib = _native(G, values) if impl != "torch" else None
    if lib is None:
        g2 = G.transpose(1, 2).reshape(P * L, n)
        return _fallback_apply(g2, _transposed_values(values, perm_t), _i32(crow_t), _i32(col_t), None, k, n, b) \
            .view(P, L, k).transpose(1, 2).contiguous()
    return _cols(lib, G, values.contiguous(), _i32(crow_t), _i32(col_t), _i32(perm_t), 1, b, None, k, b)


def cols_grad_values(G: Tensor, X: Tensor, crow: Tensor, col: Tensor, n: int, k: int, b: int,
                     impl: str = "auto") -> Tensor:
    """dV (nnzb, b, b) = sum_p G[p] X[p]^T on W's nonzero blocks."""
    G, X = G.contiguous(), X.contiguous()
    P, _, L = X.shape
    crow, col = _i32(crow), _i32(col)
    lib = _native(G, X) if impl != "torch" else None
    if lib is None:
        return pack(torch.einsum("pnl,pkl->nk", G, X), crow, col, b)
    dv = torch.empty(col.shape[0], b, b, dtype=X.dtype)
    _check(getattr(lib, "sg_sddmm_cols" + _sfx(X))(P, k, n, L, b, _p(G), _p(X), _p(crow), _p(col), _p(dv),
                                                   _threads()))
    return dv


# ---------------------------------------------------------------------------------------------
# direct convolution (no im2col tensor)
# ---------------------------------------------------------------------------------------------
def conv2d(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Tensor | None, out_channels: int,
           kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
           b: int) -> Tensor | None:
    """conv2d(x, W, bias) with W (out, C kh kw) block-sparse; None if the native kernels cannot run it."""
    lib = _native(x, values, bias)
    if lib is None:
        return None
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
        # a 1x1 conv (ResNet's shortcuts) is Y (N, n, L) = W X (N, C, L) on the positions it reads: the cols
        # kernel on x itself, without the padded copy and the tile of y the direct kernel needs
        xs = x[:, :, ::sh, ::sw].contiguous()  # (N, C, Ho, Wo)
        N, C, Ho, Wo = xs.shape
        bias = bias.contiguous() if bias is not None else None
        return _cols(lib, xs.view(N, C, Ho * Wo), values.contiguous(), _i32(crow), _i32(col), None, b, 1, bias,
                     out_channels, b).view(N, out_channels, Ho, Wo)
    x = x.contiguous()
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = torch.empty(N, out_channels, max(Ho, 0), max(Wo, 0), dtype=x.dtype)
    if y.numel() == 0:
        return y
    bias = bias.contiguous() if bias is not None else None
    _check(getattr(lib, "sg_conv2d" + _sfx(x))(N, C, H, W, out_channels, kh, kw, sh, sw, ph, pw, dh, dw, b, _p(x),
                                               _p(values.contiguous()), _p(_i32(crow)), _p(_i32(col)), _p(bias),
                                               _p(y), _threads()))
    return y


__all__ = ["library", "conv2d", "available", "fma_peak", "keep_heap", "Prepared", "linear", "linear_grad_input",
           "linear_grad_values", "apply_cols", "apply_cols_grad_input", "cols_grad_values", "pack", "unpack",
           "cache_dir", "BUILD_ERROR"]
