"""Cost model for lowering: predicted wall time of a layer dense and in each sparse format.

Roofline-style, with constants measured on the machine (`calibrate`):

    dense linear    t = c_dense + max(4 n k / bw_dense,  2 M n k / flops_dense)
    sparse linear   t = c_sparse + M 4 nnzb b^2 / bw_sparse (bw_csr for b < 16)   (M < cpu.SMALL_M: dot products)
                    t = c_sparse + 2 (M + m0) nnzb b^2 / flops_sparse[b]            (otherwise: register tiles)
                        (+ 8 M (n + k) / bw_copy for the transposes when b < cpu.TRANSPOSE_BELOW_BLOCK,
                         and x (1 + 1.4 M / (M + 4096)) for the cache misses of that path)
    dense conv      t = c_dense + 2 N L n k / flops_conv
    sparse conv     t = c_sparse + 2 N L nnzb b^2 / flops_cols[b]            (direct kernel, copies included)

with M rows (tokens) for linear layers, N images and L output positions for convolutions, n x k
the weight's matrix view and nnzb blocks of b x b stored. `path` is the kernel the CPU backend
runs at that M (`cpu.linear`: dot products below `cpu.SMALL_M` rows, x^T lanes for b < 8, the
register-tiled rows kernel otherwise). A format is chosen only if its predicted time is below
`MARGIN` x the dense time, so noise in the constants errs towards dense.

The constants below were measured on the development machine (2-core AMD EPYC, AVX-512, PyTorch
2.14 with MKL/oneDNN; `python -m sparsegraph.backends.cost_model --calibrate` re-measures them on
yours and caches them, per thread count, in the sparsegraph cache folder, where `load()` finds them;
from Python: `sparsegraph.backends.cost_model.calibrate()`).

    >>> m = load()
    >>> m.linear_dense(64, 3072, 768) > m.linear_sparse(64, 3072, 768, nnzb=230, block=32)
    True
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from . import cpu

MARGIN = 0.9  # sparse must be predicted at least 10% faster than dense
CSR_ROWS_SLOWDOWN, CSR_ROWS_HALF = 1.4, 4096  # CSR's slowdown with many rows (see CostModel.linear_sparse)


@dataclass
class CostModel:
    c_dense: float = 1.5e-6  # s, fixed cost of a dense call
    c_sparse: float = 21e-6  # s, fixed cost of a sparse_linear call (dispatch, checks, ctypes)
    bw_dense: float = 5.8e10  # B/s, weight streaming of a dense GEMV
    bw_sparse: float = 3.2e10  # B/s, value streaming of the sparse dot-product path (blocks)
    bw_csr: float = 1.0e10  # B/s, the same for CSR (one gathered x element per value)
    bw_copy: float = 1.4e10  # B/s, transposes
    flops_dense: float = 1.75e11  # FLOP/s, dense GEMM (MKL)
    flops_conv: float = 3.6e11  # FLOP/s-equivalent, dense 3x3 convolution (oneDNN, Winograd)
    m0_sparse: float = 0.0  # rows: the tiled sparse kernel runs at rate F * M / (M + m0)
    flops_sparse: dict = field(default_factory=lambda: {"1": 4.9e10, "8": 5.5e10, "16": 1.2e11, "32": 2.4e11,
                                                        "64": 3.1e11})
    flops_cols: dict = field(default_factory=lambda: {"1": 2.0e10, "8": 1.0e11, "16": 1.1e11, "32": 1.2e11,
                                                      "64": 1.3e11})
    source: str = "defaults: 2 threads on the development machine (2-core AMD EPYC, AVX-512)"

    # -- lookups -------------------------------------------------------------------------------
    @staticmethod
    def _by_block(table: dict, block: int) -> float:
        """Interpolate a per-block-size rate in log2(b) between measured sizes."""
        keys = sorted(int(k) for k in table)
        if block <= keys[0]:
            return table[str(keys[0])] * (block / keys[0] if block < keys[0] else 1.0)
        if block >= keys[-1]:
            return table[str(keys[-1])]
        lo, hi = next((lo, hi) for lo, hi in zip(keys, keys[1:]) if lo <= block <= hi)
        f = (math.log2(block) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
        return table[str(lo)] * (1 - f) + table[str(hi)] * f

    # -- predictions ---------------------------------------------------------------------------
    def linear_dense(self, M: int, n: int, k: int) -> float:
        return self.c_dense + max(4 * n * k / self.bw_dense, 2 * M * n * k / self.flops_dense)

    def linear_sparse(self, M: int, n: int, k: int, nnzb: int, block: int) -> float:
        stored = nnzb * block * block
        if M < cpu.SMALL_M:  # the shuffle-reduced dot path needs blocks of at least 16 (a vector of lanes)
            return self.c_sparse + M * 4 * stored / (self.bw_sparse if block >= 16 else self.bw_csr)
        t = self.c_sparse + 2 * (M + self.m0_sparse) * stored / self._by_block(self.flops_sparse, block)
        if block < cpu.TRANSPOSE_BELOW_BLOCK:
            t += 8 * M * (n + k) / self.bw_copy
            # the x^T lanes path gathers from x rows that stop fitting in cache from a few thousand rows
            # on: measured 1.3x / 1.7x / 2.2x / 2.3x slower than the rate above at 1k / 4k / 16k / 64k
            # rows (bench/kernels.py, ResNet-18 im2col shapes)
            t *= 1 + CSR_ROWS_SLOWDOWN * M / (M + CSR_ROWS_HALF)
        return t

    def conv_dense(self, N: int, L: int, n: int, k: int) -> float:
        return self.c_dense + 2 * N * L * n * k / self.flops_conv

    def conv_sparse(self, N: int, L: int, n: int, k: int, nnzb: int, block: int) -> float:
        return self.c_sparse + 2 * N * L * nnzb * block * block / self._by_block(self.flops_cols, block)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------
def _path(threads: int | None = None) -> str:
    return os.path.join(cpu.cache_dir(), f"cost_model-t{threads or torch.get_num_threads()}.json")


_cached: dict[int, CostModel] = {}


def load() -> CostModel:
    """The model calibrated on this machine for the current thread count (`calibrate`), else the defaults."""
    threads = torch.get_num_threads()
    if threads not in _cached:
        model = CostModel()
        try:
            with open(_path(threads)) as f:
                model = CostModel(**json.load(f))
        except (OSError, ValueError, TypeError):
            pass
        _cached[threads] = model
    return _cached[threads]


def _best(fn, repeat: int, rounds: int = 3) -> float:
    """Minimum wall time of fn() over `rounds` x `repeat` runs, the rounds a few milliseconds apart
    (the minimum is robust to other processes competing for the cores)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        time.sleep(0.005)
    return best


def _sparse_weight(n: int, k: int, b: int, density: float, gen: torch.Generator):
    """A SparseWeight: uniform for b = 1, balanced b x b blocks otherwise."""
    from .sparse_linear import SparseWeight

    if b == 1:
        mask = torch.rand(n, k, generator=gen) < density
    else:
        R, C = -(-n // b), -(-k // b)
        per_row = max(1, round(density * C))
        bm = torch.zeros(R, C, dtype=torch.bool)
        for r in range(R):
            bm[r, torch.randperm(C, generator=gen)[:per_row]] = True
        mask = bm.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
    return SparseWeight.from_dense(torch.randn(n, k, generator=gen) * mask, b, mask=mask)


LINEAR_SHAPES = ((3072, 768), (768, 3072))  # GPT-2 MLP projections
CONV_SHAPES = ((8, 64, 32), (8, 256, 8))  # (images, channels, side): early and late ResNet stages


def calibrate(save: bool = True, repeat: int = 20, verbose: bool = True) -> CostModel:
    """Measure the constants on this machine (a minute or two) and cache them (`save`).

    Every rate is the best of several rounds (robust to other processes on the machine). Rates are
    measured on two shapes each; the model keeps the faster dense and the slower sparse rate, so
    its errors lean towards keeping layers dense.
    """
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    m = CostModel(source=f"calibrated {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} threads")
    log = print if verbose else (lambda *a: None)
    tiny_w, tiny_x = torch.randn(16, 16), torch.randn(1, 16)
    m.c_dense = _best(lambda: F.linear(tiny_x, tiny_w), repeat * 5)
    tiny_sw = _sparse_weight(16, 16, 16, 1.0, gen)
    m.c_sparse = _best(lambda: tiny_sw.apply(tiny_x), repeat * 5)
    bw_dense, flops_dense, bw_sparse, bw_csr = [], [], [], []
    for n, k in LINEAR_SHAPES:
        w = torch.randn(n, k, generator=gen)
        x1, x256 = torch.randn(1, k, generator=gen), torch.randn(256, k, generator=gen)
        bw_dense.append(4 * n * k / max(1e-9, _best(lambda: F.linear(x1, w), repeat) - m.c_dense))
        flops_dense.append(2 * 256 * n * k / _best(lambda: F.linear(x256, w), repeat))
        sw = _sparse_weight(n, k, 32, 0.1, gen)
        bw_sparse.append(4 * sw.nnzb * 1024 / max(1e-9, _best(lambda: sw.apply(x1), repeat) - m.c_sparse))
        csr = _sparse_weight(n, k, 1, 0.1, gen)
        bw_csr.append(4 * csr.nnzb / max(1e-9, _best(lambda: csr.apply(x1), repeat) - m.c_sparse))
    m.bw_dense, m.flops_dense, m.bw_sparse, m.bw_csr = max(bw_dense), max(flops_dense), min(bw_sparse), min(bw_csr)
    xt = torch.randn(8192, 768, generator=gen)  # a transpose larger than the caches
    m.bw_copy = 8 * 8192 * 768 / _best(lambda: xt.t().contiguous(), max(3, repeat // 4))
    log(f"dense: call {m.c_dense * 1e6:.1f} us, GEMV {m.bw_dense / 1e9:.1f} GB/s, GEMM {m.flops_dense / 1e9:.0f} "
        f"GFLOP/s; sparse: call {m.c_sparse * 1e6:.1f} us, dot path {m.bw_sparse / 1e9:.1f} GB/s (CSR "
        f"{m.bw_csr / 1e9:.1f})")
    # the tiled kernel's rate per block size, and the rows at which it reaches half of it
    n, k = LINEAR_SHAPES[0]
    sw = _sparse_weight(n, k, 32, 0.1, gen)
    x16, x256 = torch.randn(16, k, generator=gen), torch.randn(256, k, generator=gen)
    t16, t256 = (_best(lambda x=x: sw.apply(x), repeat) - m.c_sparse for x in (x16, x256))
    m.m0_sparse = max(0.0, min(64.0, (16 * t256 - 256 * t16) / max(1e-12, t16 - t256)))  # t = a (M + m0)
    log(f"sparse linear reaches half its rate at {m.m0_sparse:.1f} rows")
    for b in (1, 8, 16, 32, 64):
        rates = []
        rows = 2048 if b < 8 else 256  # the transposed (CSR) path degrades with many rows: measure it there
        for n, k in LINEAR_SHAPES:
            swb = _sparse_weight(n, k, b, 0.1, gen)
            x = torch.randn(rows, k, generator=gen)
            t = _best(lambda: swb.apply(x), repeat) - m.c_sparse
            if b < 8:
                t -= 8 * rows * (n + k) / m.bw_copy
            rates.append(2 * (rows + m.m0_sparse) * swb.nnzb * b * b / max(1e-9, t))
        m.flops_sparse[str(b)] = min(rates)
        log(f"sparse linear b={b}: {m.flops_sparse[str(b)] / 1e9:.0f} GFLOP/s")
    conv_dense = []
    conv_sparse = {str(b): [] for b in (1, 8, 16, 32, 64)}
    for N, C, H in CONV_SHAPES:
        xc, wc = torch.randn(N, C, H, H, generator=gen), torch.randn(C, C, 3, 3, generator=gen)
        conv_dense.append(2 * N * H * H * C * C * 9 / _best(lambda: F.conv2d(xc, wc, padding=1), repeat))
        for b in (1, 8, 16, 32, 64):
            swc = _sparse_weight(C, C * 9, b, 0.1, gen)
            t = _best(lambda: swc.conv2d(xc, None, (3, 3), 1, 1, 1), repeat) - m.c_sparse
            conv_sparse[str(b)].append(2 * N * H * H * swc.nnzb * b * b / max(1e-9, t))
    m.flops_conv = max(conv_dense)
    m.flops_cols = {b: min(r) for b, r in conv_sparse.items()}
    log(f"dense conv: {m.flops_conv / 1e9:.0f} GFLOP/s; sparse conv: " +
        ", ".join(f"b={b} {r / 1e9:.0f}" for b, r in m.flops_cols.items()) + " GFLOP/s")
    if save:
        from ..fsutil import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(m.to_json())

        atomic_write(_path(), write)
        log(f"wrote {_path()}")
    _cached[torch.get_num_threads()] = m
    return m


def main() -> None:
    p = argparse.ArgumentParser(description="sparsegraph lowering cost model")
    p.add_argument("--calibrate", action="store_true", help="measure this machine and cache the constants")
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    print((calibrate(repeat=args.repeat) if args.calibrate else load()).to_json())


if __name__ == "__main__":
    main()
