"""Cost model for lowering: predicted wall time of a layer dense and in each sparse format.

Every prediction is one formula, a fixed cost per call plus the layer's useful multiply-adds
(MACs) at a rate measured on this machine (`predict`):

    t = c + 2 MACs / F

    dense linear    c_dense,   MACs = M n k,          F = flops_dense(M)       F.linear (MKL)
    dense linear    c_dense,   MACs = M n k,          F = flops_dense_packed(M) oneDNN, weight pre-packed
    sparse linear   c_sparse,  MACs = M nnzb b^2,     F = flops_sparse(d, b, M) sparsegraph::sparse_linear
                    CSR (b = 1) from 4 rows adds M (n + k) t_transpose: it works on x^T and y^T
    dense conv      c_dense,   MACs = N L n k,        F = flops_conv           F.conv2d (oneDNN)
    sparse conv     c_sparse_conv, MACs = N L nnzb b^2, F = flops_cols(d, b)   sparsegraph::sparse_conv2d

with M rows (tokens) of a linear layer, N images and L output positions of a convolution, n x k
the weight's matrix view, nnzb stored blocks of b x b and d = nnzb b^2 / (n k) the fraction of the
weight stored. A convolution has a fixed cost of its own, `c_sparse_conv`: sparse_conv2d's CPU
kernel is C++ (`cpu_op`) like sparse_linear's, but its autograd wrapper is Python and a 1 x 1
convolution copies the positions it reads. A frozen compiled graph runs sparse_linear's
pre-transposed form (`compile.pretranspose`), as fast or faster, so the model errs towards dense
there. The rates are measured on the public ops as a lowered model runs them, never on kernel
internals, at rows M in `ROWS`, blocks b in `BLOCKS` and densities d in `DENSITIES`. A sparse
kernel's rate rises with d (each row of x it reads feeds more blocks): on a 2-core Intel Xeon a
block-32 3 x 3 convolution ran at 22-37 GFLOP/s with 10% of its weights stored and 34-45 with 25%,
so a rate measured at one density misjudges layers at another. Between measured points a
rate follows a power law (log F linear in log M, in log b and in log d); beyond them it is held at
the nearest one (M > 512 gets M = 512's rate; b = 64 gets b = 32's; d > 0.25 gets d = 0.25's, all
of which err towards dense: more rows, larger blocks and denser weights run faster). Each table is
capped so that predicted times never fall as M grows (`_rising`). A sparse format is chosen only if
its predicted time is below `MARGIN` x the dense time, so noise in the rates errs towards dense.

Which dense? Eager PyTorch runs a dense fp32 linear layer through MKL (`F.linear`), and so does a
frozen graph of `torch.compile` with a static batch (Inductor packs the weight for MKL's sgemm:
within 5% of `F.linear` from 64 rows on the machines measured). A frozen graph whose batch is
dynamic runs it through oneDNN with a pre-packed weight instead, which can be much faster:
2.2-2.4x MKL from 64 rows on a Zen 5 EPYC (whose 512-bit FMA units MKL leaves idle), 1.2-1.3x on
a Zen 4. So the model keeps both rates, and `decide(dense="onednn")` judges a layer against
oneDNN's: sparse only where it beats the dense code that will really run. A model without oneDNN
rates (`flops_dense_packed` empty: the builtin constants, or a build without oneDNN) judges
against MKL's.

Calibration (CPU)
-----------------
`load()` returns the model lowering uses. The first time on a machine it calibrates (`calibrate`,
a few seconds, announced by one line on stderr) and caches the result in `cpu.cache_dir()`, keyed
by `machine_key()`: the CPU model, its feature flags, the thread count and the kernels' build (the
native library's source, the op's Python path, the PyTorch version, this calibration's code), so
another CPU, another thread count or a changed kernel recalibrates. A corrupt or foreign cache
file is named in a warning and replaced by a new calibration.

How it measures: the fixed costs from the smallest possible call (a 16 x 16 weight, one row, and
as a 1 x 1 convolution of a 1 x 1 image);
the linear rates on two GPT-2 weights (`LINEAR_SHAPES`: 768 x 768, which stays in cache, and
3072 x 768) at every M in `ROWS`, dense (MKL, and oneDNN pre-packed where this build has it) and
each block size at each density in `DENSITIES` (uniform for b = 1, balanced blocks otherwise),
interleaved in rounds of shuffled order so all see the same machine state; the convolution rates
on two ResNet-like 3 x 3 layers (`CONV_SHAPES`), dense and at each block size and density. Each
time is the median over its rounds (`medians`, as the benchmarks and `check` time), a rate is the
work over the time minus the fixed cost, and of the two shapes the model keeps the faster dense
and the slower sparse rate, so that its errors lean towards dense (a small layer's GEMV runs from
cache and is several times faster per FLOP than a large one's). CSR's transposes are timed on a
tall, narrow layer (`CSR_SHAPE`: 64 outputs, where they cost more than the nonzeros):
`t_transpose` is what its time at 512 rows leaves over after the fixed cost and the nonzeros at
CSR's rate, per element of x and y.

`sparsegraph calibrate` reruns it and prints the constants; `sparsegraph calibrate --check` times
dense against sparse on a grid of GPT-2 layers (`check`) and reports, wherever the model picks
sparse, whether sparse was in fact faster. `SPARSEGRAPH_COST_MODEL` pins the model (`ENV`):
`builtin` for the shipped constants (`CostModel()`, measured on a 2-core AMD EPYC with AVX-512 at
2 threads, its sparse rates at one density, 10%), or the path of a JSON file (`sparsegraph
calibrate -o FILE`, `CostModel.save`); unset or `auto` means the calibration above. The test
suite pins `builtin`.

    >>> m = load()                              # the tests pin SPARSEGRAPH_COST_MODEL=builtin
    >>> m.source.startswith("builtin")
    True
    >>> m.linear_dense(64, 3072, 768) > m.linear_sparse(64, 3072, 768, nnzb=230, block=32)
    True
    >>> m.save("pinned.json")                   # what SPARSEGRAPH_COST_MODEL=pinned.json loads
    >>> read("pinned.json") == m
    True

GPU (Triton)
------------
The GPU constants are **not measured**: the machine the shipped constants come from has no GPU.
On CUDA tensors, target="auto" uses Triton BSR for the largest exact block of 16 or more when at
most `GPU_MAX_STORED_BLOCKS` of the blocks are stored: a fixed threshold, not a calibration. To
measure it on a GPU:

1. For blocks b in (16, 32, 64), stored-block fractions in (0.05, 0.1, 0.25, 0.5, 0.75), rows M in
   `ROWS` and the GPT-2 shapes 768 x 768 and 3072 x 768, build a balanced block mask and its
   `SparseWeight` on the GPU; time `F.linear` (cuBLAS) against
   `sparse_linear(..., impl="triton")` with CUDA events (`torch.cuda.Event(enable_timing=True)`,
   synchronised), after a warm-up call that compiles and autotunes the Triton kernel, taking
   the median of at least 20 calls.
2. `GPU_MAX_STORED_BLOCKS` is the largest fraction at which Triton beats cuBLAS by `MARGIN` at every
   b, M and shape; record it with the GPU model and the CUDA, PyTorch and Triton versions.
3. A per-rate GPU model would fill the same tables (`flops_dense`, `flops_sparse`) from those
   timings and `decide` would compare predictions as it does on CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch

from ..graph import SparsegraphError
from . import cpu

MARGIN = 0.9  # sparse must be predicted at least 10% faster than dense
GPU_MAX_STORED_BLOCKS = 0.5  # CUDA: Triton when at most this fraction of blocks is stored; NOT measured (see above)
ENV = "SPARSEGRAPH_COST_MODEL"  # builtin | auto (default) | path of a JSON model

ROWS = (1, 8, 64, 512)  # M at which linear rates are measured (held at 512 rows beyond)
BLOCKS = (1, 8, 16, 32)  # block sizes at which sparse rates are measured (1 = CSR)
LINEAR_SHAPES = ((768, 768), (3072, 768))  # (n, k): GPT-2's attention projection (cached) and MLP expansion
CSR_SHAPE = (64, 576)  # (n, k) where CSR's transposes show: few outputs, many rows (a ResNet stage's im2col)
CONV_SHAPES = ((8, 64, 32), (8, 256, 8))  # (images, channels, side): early and late ResNet stages, 3 x 3
DENSITIES = (0.1, 0.25)  # fractions of the weights stored in the calibration's sparse layers (s = 0.9, 0.75)
BUDGET_S = 4.0  # seconds of timing in a calibration (building the layers and first calls add 1-2 s)
QUICK_BUDGET_S = 1.0


class CostModelError(SparsegraphError):
    """A cost model that cannot be used: a bad SPARSEGRAPH_COST_MODEL, an unreadable model file."""


def _interp(table: dict, x: float) -> float:
    """The rate of {str(x_i): y_i} at x: a power law between neighbouring x_i (log y linear in log x),
    held beyond them. A power law keeps the predicted time M / F(M) rising with M between measured
    points whenever it rises at them."""
    keys = sorted(int(k) for k in table)
    if x <= keys[0]:
        return table[str(keys[0])]
    if x >= keys[-1]:
        return table[str(keys[-1])]
    lo, hi = next((lo, hi) for lo, hi in zip(keys, keys[1:]) if lo <= x <= hi)
    f = math.log(x / lo) / math.log(hi / lo)
    return table[str(lo)] ** (1 - f) * table[str(hi)] ** f


def predict(fixed: float, macs: float, rate: float) -> float:
    """Seconds of one call: its fixed cost plus 2 FLOP per multiply-add at `rate` FLOP/s."""
    return fixed + 2 * macs / rate


def _rate(macs: float, seconds: float, fixed: float) -> float:
    """`predict` solved for the rate. When the work is lost in the noise of the fixed cost, at least a
    tenth of the call counts as work, so the rate stays finite."""
    return 2 * macs / max(seconds - fixed, 0.1 * seconds)


def _rising(table: dict) -> dict:
    """Rates by rows M, capped so that the work time M / F(M) never falls as M grows (timing noise
    can make a larger call look faster than a smaller one)."""
    out, prev = {}, None
    for M in sorted(table, key=int):
        out[M] = table[M] if prev is None else min(table[M], out[prev] * int(M) / int(prev))
        prev = M
    return out


@dataclass
class CostModel:
    """Fixed costs (s) and rates (FLOP/s); tables are keyed by str(M) or str(b) (JSON keys)."""
    c_dense: float = 1.5e-6  # a dense call
    c_sparse: float = 2.1e-5  # a sparse_linear call (dispatch, checks, native call)
    c_sparse_conv: float | None = None  # a sparse_conv2d call (Python autograd wrapper); None: c_sparse
    t_transpose: float = 0.0  # s per element of x and y a CSR product transposes; 0: not measured (builtin)
    flops_dense: dict = field(default_factory=lambda: {"1": 2.9e10, "8": 1.8e11, "64": 1.8e11, "512": 1.8e11})
    flops_sparse: dict = field(default_factory=lambda: {"10": {  # by density (% stored), block size, then M
        "1": {"1": 5.0e9, "8": 4.0e10, "64": 3.9e10, "512": 3.5e10},
        "8": {"1": 5.0e9, "8": 4.0e10, "64": 5.5e10, "512": 5.5e10},
        "16": {"1": 1.6e10, "8": 1.2e11, "64": 1.2e11, "512": 1.2e11},
        "32": {"1": 1.6e10, "8": 1.28e11, "64": 2.4e11, "512": 2.4e11}}})
    flops_dense_packed: dict = field(default_factory=dict)  # oneDNN, pre-packed weight; {}: not measured
    flops_conv: float = 3.6e11  # FLOP/s-equivalent of oneDNN's 3 x 3 convolution (Winograd)
    flops_cols: dict = field(default_factory=lambda: {"10": {  # by density (% stored), then block size
        "1": 2.0e10, "8": 1.0e11, "16": 1.1e11, "32": 1.2e11}})
    source: str = "builtin: measured on a 2-core AMD EPYC (AVX-512), 2 threads"

    def __post_init__(self):
        self.flops_dense = _rising(self.flops_dense)
        self.flops_dense_packed = _rising(self.flops_dense_packed)
        self.flops_sparse = {d: {b: _rising(t) for b, t in by_b.items()} for d, by_b in self.flops_sparse.items()}

    # -- rates ---------------------------------------------------------------------------------
    def rate_dense(self, M: int, onednn: bool = False) -> float:
        """F.linear's rate at M rows; `onednn`: oneDNN's with a pre-packed weight, where measured."""
        return _interp(self.flops_dense_packed if onednn and self.flops_dense_packed else self.flops_dense, M)

    def rate_sparse(self, M: int, block: int, density: float) -> float:
        """sparse_linear's rate at M rows, b x b blocks and `density` of the weight stored."""
        by_density = {d: _interp({b: _interp(t, M) for b, t in by_b.items()}, block)
                      for d, by_b in self.flops_sparse.items()}
        return _interp(by_density, 100 * density)

    def rate_cols(self, block: int, density: float) -> float:
        """sparse_conv2d's rate at b x b blocks and `density` of the weight stored."""
        return _interp({d: _interp(by_b, block) for d, by_b in self.flops_cols.items()}, 100 * density)

    # -- predictions ---------------------------------------------------------------------------
    def linear_dense(self, M: int, n: int, k: int, onednn: bool = False) -> float:
        return predict(self.c_dense, M * n * k, self.rate_dense(M, onednn))

    def linear_sparse(self, M: int, n: int, k: int, nnzb: int, block: int) -> float:
        transposes = M * (n + k) * self.t_transpose if cpu.transposes(M, block) else 0
        rate = self.rate_sparse(M, block, nnzb * block * block / (n * k))
        return predict(self.c_sparse, M * nnzb * block * block, rate) + transposes

    def conv_dense(self, N: int, L: int, n: int, k: int) -> float:
        return predict(self.c_dense, N * L * n * k, self.flops_conv)

    def conv_sparse(self, N: int, L: int, n: int, k: int, nnzb: int, block: int) -> float:
        rate = self.rate_cols(block, nnzb * block * block / (n * k))
        fixed = self.c_sparse if self.c_sparse_conv is None else self.c_sparse_conv
        return predict(fixed, N * L * nnzb * block * block, rate)

    # -- files ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str) -> None:
        """Write the model as JSON (atomically), for `read` and SPARSEGRAPH_COST_MODEL=path."""
        _write_json(path, asdict(self))

    @classmethod
    def from_dict(cls, data: object, where: str) -> "CostModel":
        """A model from its JSON form; CostModelError naming `where` and the first bad entry."""
        if not isinstance(data, dict):
            raise CostModelError(f"{where}: expected a JSON object of cost model constants")
        names = {f.name for f in fields(cls)}
        data = {"c_sparse_conv": None, **data}  # (files written before the op's C++ kernel)
        if set(data) != names:
            missing, extra = sorted(names - set(data)), sorted(set(data) - names)
            problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unknown {', '.join(extra)}"] if extra else [])
            raise CostModelError(f"{where}: " + "; ".join(problems))
        for name in ("c_dense", "c_sparse", "t_transpose", "c_sparse_conv"):
            if data[name] is not None or name != "c_sparse_conv":
                _check_number(data[name], f"{where}: {name}", positive=False)
        _check_number(data["flops_conv"], f"{where}: flops_conv")
        _check_table(data["flops_dense"], f"{where}: flops_dense")
        if data["flops_dense_packed"] != {}:
            _check_table(data["flops_dense_packed"], f"{where}: flops_dense_packed")
        if isinstance(data["flops_cols"], dict) and data["flops_cols"] and not any(
                isinstance(v, dict) for v in data["flops_cols"].values()):  # rates by block alone
            raise CostModelError(f"{where}: its sparse rates have no density level (a model written by an "
                                 "earlier sparsegraph, measured at one density); write a new one with "
                                 "`sparsegraph calibrate -o FILE`")
        _check_table(data["flops_cols"], f"{where}: flops_cols", depth=1)  # density, block
        _check_table(data["flops_sparse"], f"{where}: flops_sparse", depth=2)  # density, block, rows
        if not isinstance(data["source"], str):
            raise CostModelError(f"{where}: source must be a string")
        return cls(**data)


def _check_number(v: object, what: str, positive: bool = True) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise CostModelError(f"{what} must be a finite {'positive' if positive else 'non-negative'} number, got {v!r}")


def _check_table(t: object, what: str, depth: int = 0) -> None:
    """`t` is {positive integer key: rate}, nested `depth` levels deep."""
    if not isinstance(t, dict) or not t:
        raise CostModelError(f"{what} must be a non-empty object keyed by sizes")
    for key, v in t.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) > 0):
            raise CostModelError(f"{what}: key {key!r} is not a positive integer")
        if depth:
            _check_table(v, f"{what}[{key}]", depth - 1)
        else:
            _check_number(v, f"{what}[{key}]")


def read(path: str) -> CostModel:
    """The model in a JSON file written by `CostModel.save`, `sparsegraph calibrate -o` or the cache."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise CostModelError(f"cannot read cost model {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CostModelError(f"{path} is not JSON ({e})") from None
    if isinstance(data, dict) and "model" in data and "key" in data:  # a cache file
        data = data["model"]
    return CostModel.from_dict(data, path)


def _write_json(path: str, data: dict) -> None:
    from ..fsutil import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------
# the machine and the cache
# ---------------------------------------------------------------------------------------------
def cpuinfo(*fields_: str) -> dict[str, str]:
    """The first value of each named /proc/cpuinfo field (x86 and Arm names), empty if unavailable."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in fields_ and name.strip() not in out:
                    out[name.strip()] = value.strip()
    except OSError:
        pass
    return out


def cpu_name() -> str:
    """The CPU's model name, e.g. 'AMD EPYC' or 'Intel(R) Xeon(R) Platinum 8488C'."""
    info = cpuinfo("model name", "CPU part")
    return info.get("model name") or (f"Arm part {info['CPU part']}" if "CPU part" in info else "") or \
        platform.processor() or platform.machine()


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def kernel_key() -> str:
    """What a calibration depends on besides the CPU: the native library's source, the Python entry
    points (cpu.py, sparse_linear.py), the op's C++ kernel (cpu_op.cpp) and whether it is registered,
    this file (what is measured, and how), PyTorch's version and whether the native kernels are
    available here (otherwise the op runs PyTorch's sparse kernels)."""
    from . import cpu_op, sparse_linear
    from .cpu_source import source

    parts = [source().encode(), torch.__version__.encode(), b"native" if cpu.available() else b"fallback",
             b"C++ op" if cpu_op.loaded() else b"Python op"]
    for path in (cpu.__file__, sparse_linear.__file__, cpu_op.SOURCE, __file__):
        with open(path, "rb") as f:
            parts.append(f.read())
    return _sha(b"\0".join(parts))


def machine_key(threads: int | None = None) -> dict:
    """The cache key of a calibration: CPU model, a hash of its feature flags, threads, kernel build."""
    flags = cpuinfo("flags", "Features")
    return {"cpu": cpu_name(), "arch": platform.machine(), "flags": _sha(" ".join(flags.values())),
            "threads": threads or torch.get_num_threads(), "kernels": kernel_key()}


def cache_path(key: dict) -> str:
    return os.path.join(cpu.cache_dir(), f"cost_model-t{key['threads']}-{_sha(json.dumps(key, sort_keys=True))}.json")


def _read_cache(path: str, key: dict) -> CostModel:
    """The cached model at `path`; FileNotFoundError if there is none, CostModelError if it is unusable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CostModelError(f"cost model cache {path} is unreadable ({e})") from None
    if not isinstance(data, dict) or "key" not in data or "model" not in data:
        raise CostModelError(f"cost model cache {path} is not a cache file (no key and model)")
    if data["key"] != key:
        stored = data["key"] if isinstance(data["key"], dict) else {}
        differ = sorted(k for k in set(key) | set(stored) if stored.get(k) != key.get(k))
        raise CostModelError(f"cost model cache {path} was measured for another machine or build "
                             f"({', '.join(differ)} differ)")
    return CostModel.from_dict(data["model"], path)


_loaded: dict[tuple[str, int], CostModel] = {}  # (SPARSEGRAPH_COST_MODEL, threads) -> model


def load() -> CostModel:
    """The model for this process's thread count: as SPARSEGRAPH_COST_MODEL pins it, else cached for
    this machine, else calibrated now (a few seconds, once per machine, thread count and kernel build)."""
    setting = os.environ.get(ENV, "").strip() or "auto"
    memo = (setting, torch.get_num_threads())
    if memo not in _loaded:
        if setting == "builtin":
            _loaded[memo] = CostModel()
        elif setting == "auto":
            _loaded[memo] = _cached_or_calibrated()
        elif os.path.isfile(setting):
            _loaded[memo] = read(setting)
        else:
            raise CostModelError(f"{ENV}={setting!r}: no such file; use 'builtin', 'auto' or the path of a JSON "
                                 "model written by `sparsegraph calibrate -o FILE`")
    return _loaded[memo]


def _cached_or_calibrated() -> CostModel:
    key = machine_key()
    path = cache_path(key)
    try:
        return _read_cache(path, key)
    except FileNotFoundError:
        pass
    except CostModelError as e:
        warnings.warn(f"{e}; recalibrating", RuntimeWarning, stacklevel=3)
    print(f"sparsegraph: calibrating the lowering cost model for this machine ({key['cpu']}, {key['threads']} "
          f"threads; once, a few seconds) ...", end="", file=sys.stderr, flush=True)
    start, busy_before = time.perf_counter(), busy()
    model = calibrate(save=False)
    try:
        save_cache(model, key)
        where = f"cached in {path}"
    except SparsegraphError as e:  # an unwritable cache folder: use it for this process only
        where = f"not cached ({e})"
    note = f"; {busy_before}: rerun `sparsegraph calibrate` when it is idle" if busy_before else ""
    print(f" done in {time.perf_counter() - start:.1f} s, {where}{note}", file=sys.stderr, flush=True)
    return model


def save_cache(model: CostModel, key: dict | None = None) -> str:
    """Write `model` as this machine's calibration (`cache_path`); returns the path."""
    key = key or machine_key()
    path = cache_path(key)
    _write_json(path, {"key": key, "model": asdict(model)})
    return path


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def packed_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> Callable | None:
    """y = x w^T + bias through oneDNN with w pre-packed for x's rows, as Inductor's CPU freezing
    runs a dense fp32 linear layer whose batch is dynamic; None where this build or dtype has no
    such path."""
    if x.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        w_packed = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
        torch.ops.mkldnn._linear_pointwise(x, w_packed, bias, "none", [], "")
    except (RuntimeError, AttributeError):
        return None
    return lambda: torch.ops.mkldnn._linear_pointwise(x, w_packed, bias, "none", [], "")


def medians(fns: dict[str, Callable[[], object]], rounds: int = 10000, seconds: float | None = None,
            min_rounds: int = 3, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each callable over interleaved rounds, after one warm-up call each:
    up to `rounds` rounds, ending early once `seconds` have passed and `min_rounds` ran. Each round
    runs the candidates in a new order (seeded, so runs repeat), never one straight after itself:
    a call is measurably faster or slower after another (caches, allocator state), by 10-30% on
    the machines measured, and a call whose Python path is long can take 2-4x as long right after
    one that evicted the caches (a 768 x 768 layer at one row: 27 -> 99 us). With a fixed rotation
    a candidate ran after the same neighbour in all but one round in n. `inner` back-to-back calls
    per candidate and round are averaged (for calls of a few microseconds). The calibration, `check`
    and the benchmarks in `bench/` all time with it."""
    for f in fns.values():
        f()
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    rng, last = random.Random(0), keys[-1]
    start = time.perf_counter()
    for i in range(rounds):
        order = rng.sample(keys, len(keys))
        if len(order) > 1 and order[0] == last:
            order = order[1:] + order[:1]
        last = order[-1]
        for k in order:
            t = time.perf_counter()
            for _ in range(inner):
                fns[k]()
            times[k].append((time.perf_counter() - t) / inner)
        if seconds is not None and i + 1 >= min_rounds and time.perf_counter() - start > seconds:
            break
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _block_mask(n: int, k: int, block: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Which blocks of an (n, k) weight are stored: `density` of them, uniformly for block 1,
    balanced otherwise (the same number in every block-row)."""
    R, C = -(-n // block), -(-k // block)
    if block == 1:
        return torch.rand(R, C, generator=gen) < density
    keep = torch.rand(R, C, generator=gen).argsort(dim=1)[:, :max(1, round(density * C))]
    return torch.zeros(R, C, dtype=torch.bool).scatter_(1, keep, True)


def sparse_weight(n: int, k: int, block: int, density: float, gen: torch.Generator):
    """A random SparseWeight (n, k) of b x b blocks, `density` of them stored (`_block_mask`), built
    from its layout directly (no dense weight)."""
    from .sparse_linear import SparseWeight, layout_tensors

    layout = layout_tensors(_block_mask(n, k, block, density, gen))
    return SparseWeight(torch.randn(layout[1].shape[0], block, block, generator=gen), *layout, n, k, block)


def _mask(n: int, k: int, block: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """The (n, k) element mask of `_block_mask`."""
    bm = _block_mask(n, k, block, density, gen)
    return bm.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]


def _weight_of(mask: torch.Tensor, block: int, gen: torch.Generator):
    from .sparse_linear import SparseWeight

    return SparseWeight.from_dense(torch.randn(mask.shape, generator=gen) * mask, block, mask=mask)


def busy() -> str | None:
    """Why timings taken now would be unreliable (other processes keep the cores busy), or None."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"the machine is busy (load average {load:.1f} on {cores} cores)" if load >= cores else None


def calibrate(budget_s: float | None = None, save: bool = True, log: Callable[[str], object] | None = None
              ) -> CostModel:
    """Measure the constants on this machine at PyTorch's thread count (see the module docstring),
    spending about `budget_s` seconds timing (default `BUDGET_S`); `save` caches them for `load()`;
    `log` gets one line per measured group."""
    from torch.utils._python_dispatch import _disable_current_modes

    budget_s = BUDGET_S if budget_s is None else budget_s
    log = log or (lambda line: None)
    threads = torch.get_num_threads()
    # real tensors and no autograd, even when called from a compiler backend
    with _disable_current_modes(), torch.no_grad():
        model = _measure(budget_s, log)
    model.source = (f"calibrated {time.strftime('%Y-%m-%d %H:%M')} on {cpu_name()}, {threads} threads"
                    f"{'' if cpu.available() else ' (PyTorch fallback kernels)'}")
    if save:
        save_cache(model)
    _loaded[("auto", threads)] = model
    return model


def _measure(budget_s: float, log: Callable[[str], object]) -> CostModel:
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    slots = 2 + len(LINEAR_SHAPES) * len(ROWS) + len(CONV_SHAPES)  # timed groups, an equal share of time each
    share = budget_s / slots
    tiny_w, tiny_x = torch.randn(16, 16, generator=gen), torch.randn(1, 16, generator=gen)
    tiny_sw, tiny_image = sparse_weight(16, 16, 16, 1.0, gen), tiny_x.view(1, 16, 1, 1)
    fixed = medians({"dense": lambda: F.linear(tiny_x, tiny_w), "sparse": lambda: tiny_sw.apply(tiny_x),
                     "conv": lambda: tiny_sw.conv2d(tiny_image, None, (1, 1))}, seconds=share)
    c_dense, c_sparse, c_conv = fixed["dense"], fixed["sparse"], fixed["conv"]
    log(f"fixed cost per call: dense {c_dense * 1e6:.1f} us, sparse {c_sparse * 1e6:.1f} us (convolution "
        f"{c_conv * 1e6:.1f} us)")

    kinds = [(_pct(d), str(b)) for d in DENSITIES for b in BLOCKS]  # the sparse layers: (% stored, block)
    dense: dict = {str(M): [] for M in ROWS}
    packed: dict = {}
    sparse: dict = {d: {b: {str(M): [] for M in ROWS} for b in map(str, BLOCKS)} for d in map(_pct, DENSITIES)}
    for n, k in LINEAR_SHAPES:
        w = torch.randn(n, k, generator=gen)
        sws = {(d, b): sparse_weight(n, k, int(b), int(d) / 100, gen) for d, b in kinds}
        for M in ROWS:
            x = torch.randn(M, k, generator=gen)
            fns = {"dense": lambda: F.linear(x, w)} | {key: (lambda sw=sw: sw.apply(x)) for key, sw in sws.items()}
            if (onednn := packed_linear(x, w)) is not None:
                fns["packed"] = onednn
            t = medians(fns, seconds=share)
            dense[str(M)].append(_rate(M * n * k, t["dense"], c_dense))
            if "packed" in t:
                packed.setdefault(str(M), []).append(_rate(M * n * k, t["packed"], c_dense))
            for (d, b), sw in sws.items():
                sparse[d][b][str(M)].append(_rate(M * sw.nnzb * sw.block ** 2, t[d, b], c_sparse))
            log(f"linear {n}x{k}, M={M}: dense {dense[str(M)][-1] / 1e9:.1f} GFLOP/s" +
                (f" (oneDNN pre-packed {packed[str(M)][-1] / 1e9:.1f})" if "packed" in t else "") + ", sparse " +
                ", ".join(f"{d}% b={b} {sparse[d][b][str(M)][-1] / 1e9:.1f}" for d, b in kinds))

    (n, k), M, d = CSR_SHAPE, ROWS[-1], _pct(DENSITIES[0])  # CSR on few outputs: its transposes of x and y dominate
    sw, x = sparse_weight(n, k, 1, DENSITIES[0], gen), torch.randn(M, k, generator=gen)
    t = medians({"csr": lambda: sw.apply(x)}, seconds=share)["csr"]
    csr_rate = min(sparse[d]["1"][str(M)])
    t_transpose = max(0.0, t - c_sparse - 2 * M * sw.nnzb / csr_rate) / (M * (n + k))
    log(f"CSR {n}x{k}, M={M}: {t * 1e6:.0f} us, transposes {t_transpose * 1e9:.2f} ns per element of x and y")

    conv_dense, conv_sparse = [], {d: {b: [] for b in map(str, BLOCKS)} for d in map(_pct, DENSITIES)}
    for N, C, H in CONV_SHAPES:
        xc, wc = torch.randn(N, C, H, H, generator=gen), torch.randn(C, C, 3, 3, generator=gen)
        swc = {(d, b): sparse_weight(C, C * 9, int(b), int(d) / 100, gen) for d, b in kinds}
        fns = {"dense": lambda: F.conv2d(xc, wc, padding=1)}
        fns |= {key: (lambda sw=sw: sw.conv2d(xc, None, (3, 3), 1, 1, 1)) for key, sw in swc.items()}
        t = medians(fns, seconds=share)
        conv_dense.append(_rate(N * H * H * C * C * 9, t["dense"], c_dense))
        for (d, b), sw in swc.items():
            conv_sparse[d][b].append(_rate(N * H * H * sw.nnzb * sw.block ** 2, t[d, b], c_conv))
        log(f"conv 3x3 {N}x{C}x{H}x{H}: dense {conv_dense[-1] / 1e9:.1f} GFLOP/s, sparse " +
            ", ".join(f"{d}% b={b} {conv_sparse[d][b][-1] / 1e9:.1f}" for d, b in kinds))
    return CostModel(c_dense=c_dense, c_sparse=c_sparse, c_sparse_conv=c_conv, t_transpose=t_transpose,
                     flops_dense={M: max(r) for M, r in dense.items()},
                     flops_dense_packed={M: max(r) for M, r in packed.items()},
                     flops_sparse={d: {b: {M: min(r) for M, r in t.items()} for b, t in by_b.items()}
                                   for d, by_b in sparse.items()},
                     flops_conv=max(conv_dense),
                     flops_cols={d: {b: min(r) for b, r in by_b.items()} for d, by_b in conv_sparse.items()})


def _pct(density: float) -> str:
    """A density as the key of a rate table: percent of the weight stored."""
    return str(round(100 * density))


# ---------------------------------------------------------------------------------------------
# checking the model's promise: never slower than dense where it picks sparse
# ---------------------------------------------------------------------------------------------
CHECK_SHAPES = ((768, 768), (3072, 768))  # GPT-2: attention projection, MLP expansion
CHECK_ROWS = (1, 8, 64, 512)
CHECK_BLOCKS = (1, 16, 32)  # the masks' block structure (1: uniform)
CHECK_SPARSITIES = (0.75, 0.9)


def check(model: CostModel | None = None, seconds: float = 0.1, log: Callable[[str], object] | None = None,
          onednn: bool = False) -> list[dict]:
    """Time dense (F.linear; `onednn`: oneDNN with a pre-packed weight, as a frozen compiled graph
    with a dynamic batch runs it) against the op on a grid of GPT-2 layers (`CHECK_*`), in the format
    `decide` picks for each (for a layer it keeps dense: the mask's own block format), `medians` of
    interleaved rounds over about `seconds` each. One row per configuration: `picked` says whether the model lowers it, `ok`
    whether it was right to (sparse faster, or dense kept)."""
    if onednn and packed_linear(torch.zeros(1, 1), torch.zeros(1, 1)) is None:
        raise CostModelError("this PyTorch build has no oneDNN linear with a pre-packed weight to check against")
    model = model or load()
    log = log or (lambda line: None)
    gen = torch.Generator().manual_seed(1)
    rows = []
    with torch.no_grad():
        for n, k in CHECK_SHAPES:
            w = torch.randn(n, k, generator=gen)
            for s in CHECK_SPARSITIES:
                for mb in CHECK_BLOCKS:
                    mask, weights = _mask(n, k, mb, 1 - s, gen), {}
                    for M in CHECK_ROWS:
                        rows.append(_check_one(model, w, mask, mb, M, weights, seconds, gen, onednn) |
                                    {"sparsity": s})
                        r = rows[-1]
                        log(f"{r['layer']} M={M} s={s} mask b={mb}: {r['choice']}, predicted {r['predicted_x']}x, "
                            f"measured {r['measured_x']}x")
    return rows


def _check_one(model: CostModel, w: torch.Tensor, mask: torch.Tensor, mask_block: int, M: int, weights: dict,
               seconds: float, gen: torch.Generator, onednn: bool = False) -> dict:
    """One configuration of `check`; `weights` caches the SparseWeight of `mask` per block size."""
    import torch.nn.functional as F
    from ..passes.lower import decide

    (n, k), cpu_ = w.shape, torch.device("cpu")
    choice = decide("check", "linear", "linear", mask, (M, 1), "cpu", cpu_, model, dense="onednn" if onednn else "mkl")
    picked = choice.format != "dense"
    b = choice.block if picked else mask_block
    sw = weights.setdefault(b, _weight_of(mask, b, gen))
    x = torch.randn(M, k, generator=gen)
    dense = packed_linear(x, w) if onednn else (lambda: F.linear(x, w))
    t = medians({"dense": dense, "sparse": lambda: sw.apply(x)}, seconds=seconds)
    measured = t["dense"] / t["sparse"]  # reported rounded down, so that it reads >= 1 exactly where "ok" holds
    predicted = model.linear_dense(M, n, k, onednn) / model.linear_sparse(M, n, k, sw.nnzb, b)
    return {"layer": f"{n}x{k}", "batch": M, "mask_block": mask_block,
            "choice": choice.format + (f" b={b}" if choice.format == "bsr" else ""), "picked": picked,
            "predicted_x": round(predicted, 2),
            "measured_x": math.floor(measured * 100) / 100, "dense_us": round(t["dense"] * 1e6, 1),
            "sparse_us": round(t["sparse"] * 1e6, 1), "ok": measured >= 1 or not picked}


def main(argv: list[str] | None = None) -> int:
    """`python -m sparsegraph.backends.cost_model`: print the model `load()` gives as JSON;
    `--calibrate [options]` is `sparsegraph calibrate [options]`."""
    argv = sys.argv[1:] if argv is None else argv
    if "--calibrate" in argv:
        from ..cli import main as cli_main
        return cli_main(["calibrate", *(a for a in argv if a != "--calibrate")])
    argparse.ArgumentParser(description="print the lowering cost model as JSON (--calibrate: remeasure it; "
                                        "see `sparsegraph calibrate --help`)").parse_args(argv)
    print(load().to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
