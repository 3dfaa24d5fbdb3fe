"""Generated Triton block-sparse kernels: layouts, forward and both backward products, specialisation.

Kernel launches run in ONE child process with TRITON_INTERPRET=1 set before Triton is imported
(the interpreter is chosen when a kernel is decorated), so the rest of the suite is unaffected.
The parent builds every input and computes every float64 reference itself.

fp32 tolerance: the deterministic dot-product error bound (Higham, "Accuracy and Stability of
Numerical Algorithms", eq. 3.5): |fl(a.b) - a.b| <= gamma_t * |a|.|b| with gamma_t ~ t*u,
u = 2**-24 for float32, t = the number of terms summed (+1 for a bias add). It holds for every
summation order and blocking, so it is the right bound for any correct fp32 kernel; an indexing
bug (wrong block, transposed block, missing block) breaks it by orders of magnitude.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

from sparsegraph.backends import triton_codegen as cg
from sparsegraph.backends import triton_kernels as tk
from sparsegraph.masks import make_mask

U32 = 2.0 ** -24

# ---------------------------------------------------------------------------------------------
# Cases: (id, block, n, k, M, mask kind, bias). Ragged n/k/M, empty block-rows and -columns,
# balanced (literal trip count) and unbalanced (row pointers) layouts, blocks 16/32/64.
CASES = [
    ("b16-ragged-empty-rowcol-bias", 16, 40, 50, 37, "random", True),
    ("b16-balanced", 16, 64, 80, 33, "balanced", False),
    ("b32-ragged-small-M-bias", 32, 70, 45, 5, "random", True),
    ("b32-balanced-rows-and-cols", 32, 96, 90, 40, "circulant", True),
    ("b64-ragged-empty-row-bias", 64, 100, 130, 20, "random", True),
    ("b64-balanced", 64, 128, 192, 65, "balanced", False),
    ("b16-all-empty-bias", 16, 20, 30, 7, "empty", True),
]
CASE_IDS = [c[0] for c in CASES]


def _block_mask(kind: str, nb: int, kb: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "empty":
        return torch.zeros(nb, kb, dtype=torch.bool)
    if kind == "circulant":             # 2 blocks in every block-row and every block-column
        m = torch.zeros(nb, kb, dtype=torch.bool)
        for i in range(nb):
            m[i, i % kb] = m[i, (i + 1) % kb] = True
        return m
    if kind == "balanced":
        m = torch.zeros(nb, kb, dtype=torch.bool)
        for i in range(nb):
            m[i, torch.randperm(kb, generator=gen)[: max(1, kb // 2)]] = True
        return m
    m = torch.rand(nb, kb, generator=gen) < 0.6
    m[0, :] = False                     # an empty block-row
    m[:, -1] = False                    # an empty block-column
    m[-1, 0] = True                     # keep it nonempty
    return m


def _case(case):
    cid, b, n, k, M, kind, has_bias = case
    gen = torch.Generator().manual_seed(sum(map(ord, cid)))
    nb, kb = -(-n // b), -(-k // b)
    mask = _block_mask(kind, nb, kb, gen)
    layout = tk.make_layout(mask, b, n, k)
    w = torch.randn(n, k, generator=gen)                                 # unmasked: packing must ignore the rest
    w_masked = w * tk.expand_mask(mask, b, n, k).float()                 # (n, k) the dense reference weight
    x = torch.randn(M, k, generator=gen)
    dy = torch.randn(M, n, generator=gen)
    bias = torch.randn(n, generator=gen) if has_bias else None
    return dict(layout=layout, mask=mask, w=w, w_masked=w_masked, values=tk.pack_values(w, layout),
                x=x, dy=dy, bias=bias)


DATA = {c[0]: _case(c) for c in CASES}


# ---------------------------------------------------------------------------------------------
# The interpreter child process

_CHILD = r"""
import sys, torch
from sparsegraph.backends import triton_codegen as cg
from sparsegraph.backends import triton_kernels as tk
jobs = torch.load(sys.argv[1], weights_only=False)
results = {}
for key, fn, args in jobs:
    try:
        if fn == "cached_specs":
            out = [s.name for s in cg.cached_specs()]
        elif fn == "setattr":
            setattr(tk, *args)
            out = None
        else:
            out = getattr(tk, fn)(*args)
        results[key] = ("ok", out)
    except Exception as e:
        results[key] = ("error", f"{type(e).__name__}: {e}")
torch.save(results, sys.argv[2])
"""


def run_interpreted(jobs: list[tuple[str, str, tuple]]) -> dict:
    """Run `triton_kernels.<fn>(*args)` for each (key, fn, args) in a TRITON_INTERPRET=1 child."""
    with tempfile.TemporaryDirectory() as d:
        inp, out = os.path.join(d, "jobs.pt"), os.path.join(d, "results.pt")
        torch.save(jobs, inp)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-c", _CHILD, inp, out], env=env, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"interpreter child failed:\n{proc.stderr[-4000:]}")
        return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def interp():
    a, b = DATA["b16-ragged-empty-rowcol-bias"], DATA["b64-balanced"]
    jobs = [  # specialisation cache first, in a fresh process
        ("cache0", "cached_specs", ()),
        ("cacheA1", "bsr_linear", (a["x"], a["values"], a["layout"], a["bias"])),
        ("cache1", "cached_specs", ()),
        ("cacheA2", "bsr_linear", (a["x"], a["values"], a["layout"], a["bias"])),
        ("cache2", "cached_specs", ()),
        ("cacheB", "bsr_linear", (b["x"], b["values"], b["layout"], b["bias"])),
        ("cache3", "cached_specs", ()),
    ]
    for cid, d in DATA.items():
        jobs += [(("fwd", cid), "bsr_linear", (d["x"], d["values"], d["layout"], d["bias"])),
                 (("grad_input", cid), "bsr_linear_grad_input", (d["dy"], d["values"], d["layout"])),
                 (("sddmm", cid), "bsr_sddmm", (d["dy"], d["x"], d["layout"]))]
    c = DATA["b32-ragged-small-M-bias"]
    big_m = torch.randn(300, c["layout"].n), torch.randn(300, c["layout"].k)
    strided_x = torch.randn(c["layout"].k, 11).t()                       # (11, k), inner stride k
    jobs += [
        ("sddmm-split", "_bsr_sddmm", (*big_m, c["layout"], 3)),
        ("fwd-strided", "bsr_linear", (strided_x, c["values"], c["layout"], c["bias"])),
        ("bf16", "bsr_linear", (c["x"].bfloat16(), c["values"].bfloat16(), c["layout"], c["bias"].bfloat16())),
        ("fp16", "bsr_sddmm", (c["dy"].half(), c["x"].half(), c["layout"])),
        ("bad-shape", "bsr_linear", (c["x"][:, :-1], c["values"], c["layout"])),
        ("force64", "setattr", ("_INDEX32_LIMIT", 0)),
    ]
    for cid in ("b16-ragged-empty-rowcol-bias", "b64-balanced"):
        d = DATA[cid]
        jobs += [(("fwd64", cid), "bsr_linear", (d["x"], d["values"], d["layout"], d["bias"])),
                 (("grad_input64", cid), "bsr_linear_grad_input", (d["dy"], d["values"], d["layout"])),
                 (("sddmm64", cid), "bsr_sddmm", (d["dy"], d["x"], d["layout"]))]
    jobs.append(("specs-final", "cached_specs", ()))
    results = run_interpreted(jobs)
    results["_inputs"] = {"sddmm-split": big_m, "fwd-strided": strided_x}
    return results


def _ok(results, key):
    status, out = results[key]
    assert status == "ok", f"{key}: {out}"
    return out


def _assert_within_bound(out, ref, bound, what):
    """|out - ref| <= bound elementwise, with the worst offender in the message."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == torch.float32
    err = (out.double() - ref).abs()
    excess = err - bound
    worst = int(excess.argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or float(excess.flatten()[worst]) <= 0, (
        f"{what}: error {float(err.flatten()[worst]):.3g} exceeds fp32 bound {float(bound.flatten()[worst]):.3g}")


def _fwd_ref(d, x=None):
    x = (d["x"] if x is None else x).double()
    w = d["w_masked"].double()
    ref = x @ w.T                                                       # (M, n)
    mag = x.abs() @ w.abs().T
    if d["bias"] is not None:
        ref = ref + d["bias"].double()
        mag = mag + d["bias"].double().abs()
    return ref, (x.shape[1] + 2) * U32 * mag


# ---------------------------------------------------------------------------------------------
# Forward and backward products vs float64 dense references (interpreter, fp32)

@pytest.mark.parametrize("cid", CASE_IDS)
def test_forward_matches_dense_float64(interp, cid):
    d = DATA[cid]
    ref, bound = _fwd_ref(d)
    _assert_within_bound(_ok(interp, ("fwd", cid)), ref, bound, f"bsr_linear[{cid}]")


@pytest.mark.parametrize("cid", CASE_IDS)
def test_grad_input_matches_dense_float64(interp, cid):
    d = DATA[cid]
    dy, w = d["dy"].double(), d["w_masked"].double()
    ref = dy @ w                                                        # (M, k)
    bound = (dy.shape[1] + 1) * U32 * (dy.abs() @ w.abs())
    _assert_within_bound(_ok(interp, ("grad_input", cid)), ref, bound, f"bsr_linear_grad_input[{cid}]")


@pytest.mark.parametrize("cid", CASE_IDS)
def test_sddmm_matches_dense_float64(interp, cid):
    d = DATA[cid]
    dy, x, layout = d["dy"].double(), d["x"].double(), d["layout"]
    ref = tk.pack_values(dy.T @ x, layout)                              # (nnzb, B, B), zero at padding
    bound = tk.pack_values((dy.shape[0] + 1) * U32 * (dy.abs().T @ x.abs()), layout)
    out = _ok(interp, ("sddmm", cid))
    _assert_within_bound(out, ref, bound, f"bsr_sddmm[{cid}]")
    # the ragged-edge padding of every block is exactly zero, as pack_values stores it
    pad = tk.pack_values(torch.ones(layout.n, layout.k), layout) == 0
    assert bool((out[pad] == 0).all())


def test_sddmm_split_over_m_chunks(interp):
    d = DATA["b32-ragged-small-M-bias"]
    dy, x = (t.double() for t in interp["_inputs"]["sddmm-split"])
    ref = tk.pack_values(dy.T @ x, d["layout"])
    bound = tk.pack_values(301 * U32 * (dy.abs().T @ x.abs()), d["layout"])
    _assert_within_bound(_ok(interp, "sddmm-split"), ref, bound, "bsr_sddmm split into 3 M-chunks")


def test_forward_strided_input(interp):
    d = DATA["b32-ragged-small-M-bias"]
    x = interp["_inputs"]["fwd-strided"]
    ref, bound = _fwd_ref(d, x)
    _assert_within_bound(_ok(interp, "fwd-strided"), ref, bound, "bsr_linear on a transposed view")


@pytest.mark.parametrize("cid", ["b16-ragged-empty-rowcol-bias", "b64-balanced"])
def test_64bit_offset_variant_matches(interp, cid):
    assert interp["force64"][0] == "ok"
    for op in ("fwd", "grad_input", "sddmm"):
        out32, out64 = _ok(interp, (op, cid)), _ok(interp, (op + "64", cid))
        assert torch.equal(out32, out64), f"{op}: 64-bit offsets changed the result"
    assert any(name.endswith("_i64_interp") for name in _ok(interp, "specs-final"))


def test_empty_layout_gives_bias_and_zeros(interp):
    d = DATA["b16-all-empty-bias"]
    assert d["layout"].nnzb == 0 and d["layout"].nnz_per_row == 0
    assert torch.equal(_ok(interp, ("fwd", "b16-all-empty-bias")), d["bias"].expand(d["x"].shape[0], -1))
    assert torch.equal(_ok(interp, ("grad_input", "b16-all-empty-bias")), torch.zeros_like(d["x"]))
    assert _ok(interp, ("sddmm", "b16-all-empty-bias")).shape == (0, 16, 16)


# ---------------------------------------------------------------------------------------------
# Specialisation

def test_interpreter_kernels_are_cached_per_specialisation(interp):
    a, b = DATA["b16-ragged-empty-rowcol-bias"]["layout"], DATA["b64-balanced"]["layout"]
    assert _ok(interp, "cache0") == []
    first = _ok(interp, "cache1")
    assert first == [tk.kernel_spec(a, "fwd", bias=True, interpret=True).name]
    assert _ok(interp, "cache2") == first                       # the same layout reuses the kernel
    third = _ok(interp, "cache3")
    assert third[:1] == first and len(third) == 2               # a different (block, nnz) compiles a new one
    assert third[1] == "sg_bsr_fwd_b64_n1_fp32_ieee_interp" == tk.kernel_spec(b, "fwd", interpret=True).name


def test_specialisation_keys_and_sources_differ_per_layer():
    l16 = tk.make_layout(torch.ones(2, 4, dtype=torch.bool), 16, 32, 64)            # 4 per row
    l32 = tk.make_layout(torch.eye(2, dtype=torch.bool), 32, 64, 64)                 # 1 per row
    ragged = tk.make_layout(torch.tensor([[1, 1], [0, 1]], dtype=torch.bool), 32, 64, 64)
    specs = [tk.kernel_spec(L, "fwd", interpret=False) for L in (l16, l32, ragged)]
    assert len(set(specs)) == 3
    assert (specs[0].block, specs[0].nnz) == (16, 4) and (specs[1].block, specs[1].nnz) == (32, 1)
    assert specs[2].nnz is None
    src = [cg.kernel_source(s) for s in specs]
    assert "for i in range(4):" in src[0] and "tl.arange(0, 16)" in src[0] and "CROW + pid_r" not in src[0]
    assert "for i in range(1):" in src[1] and "tl.arange(0, 32)" in src[1]
    assert "for j in range(start, end):" in src[2] and "tl.load(CROW + pid_r)" in src[2]
    # bias is structural: the parameter and the add exist only in the bias variant
    with_bias = tk.kernel_source(l16, "fwd", bias=True, interpret=False)
    assert "BIAS" in with_bias and "BIAS" not in src[0]
    # one compiled kernel per spec, reused
    k1, k2 = cg.get_kernel(specs[0]), cg.get_kernel(specs[0])
    assert k1 is k2 and k1.fn is k2.fn and specs[0] in cg.cached_specs()
    assert k1.source == src[0] and f"def {specs[0].name}(" in inspect.getsource(k1.fn.fn.fn)   # Autotuner > JIT > def
    assert cg.get_kernel(specs[1]).fn is not k1.fn
    # grad_input walks W^T: specialised on blocks per column (2 and 2 here), not per row
    assert tk.kernel_spec(l16, "grad_input", interpret=False).nnz == 2
    assert tk.kernel_spec(ragged, "grad_input", interpret=False).nnz is None


def test_autotune_space_is_small_and_fits_shared_memory():
    for op in cg.OPS:
        for block in cg.BLOCKS:
            for dtype, (_, _, elt) in cg.DTYPES.items():
                cfgs = cg.autotune_configs(cg.KernelSpec(op, block, None, dtype))
                assert 4 <= len(cfgs) <= 14, (op, block, dtype, cfgs)
                for bm, warps, stages in cfgs:
                    per_stage = (2 * bm * block if op == "sddmm" else bm * block + block * block) * elt
                    assert stages * per_stage <= cg.SMEM_BUDGET and warps in (4, 8) and bm in (16, 32, 64, 128)


# ---------------------------------------------------------------------------------------------
# bf16 / fp16: selected on CUDA, compiled for a GPU target, refused by the interpreter

def test_half_dtypes_are_selected_for_cuda():
    L = tk.make_layout(torch.ones(2, 2, dtype=torch.bool), 32, 64, 64)
    for dtype, tl_name in ((torch.bfloat16, "tl.bfloat16"), (torch.float16, "tl.float16")):
        spec = tk.kernel_spec(L, "fwd", dtype, bias=True, interpret=False)
        assert spec.dtype == str(dtype).split(".")[1] and not spec.interpret
        src = cg.kernel_source(spec)
        assert f"acc.to({tl_name})" in src and "input_precision" not in src and "@triton.autotune(" in src
    with _allow_tf32(False):
        assert tk.kernel_spec(L, "fwd", torch.float32, interpret=False).precision == "ieee"
    with _allow_tf32(True):     # fp32 follows torch's own matmul setting
        assert tk.kernel_spec(L, "fwd", torch.float32, interpret=False).precision == "tf32"
        assert tk.kernel_spec(L, "fwd", torch.float32, interpret=True).precision == "ieee"


@contextlib.contextmanager
def _allow_tf32(flag: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = flag
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])


@pytest.mark.parametrize("spec, tensor_cores", [
    (cg.KernelSpec("fwd", 32, 4, "bfloat16", bias=True), True),
    (cg.KernelSpec("grad_input", 64, None, "float16"), True),
    (cg.KernelSpec("sddmm", 16, None, "bfloat16"), True),
    (cg.KernelSpec("fwd", 32, None, "float32", precision="tf32"), True),
    (cg.KernelSpec("fwd", 32, None, "float32", precision="ieee"), False),
], ids=lambda v: v.name if isinstance(v, cg.KernelSpec) else str(v))
def test_gpu_kernels_compile_for_sm80(spec, tensor_cores):
    """The GPU-only paths compile ahead of time for an A100 (no GPU needed): tl.dot lowers to
    tensor-core mma for 16-bit and TF32, exact FMA for IEEE fp32, and loads are cp.async-pipelined."""
    compiled = cg.compile_for_gpu(spec, capability=80, block_m=64, num_warps=4, num_stages=3)
    ptx = compiled.asm["ptx"]
    assert (".entry " + spec.name) in ptx
    assert ("mma.sync" in ptx) == tensor_cores
    assert "cp.async" in ptx
    assert 0 < compiled.metadata.shared <= cg.SMEM_BUDGET


def test_interpreter_refuses_half_precision(interp):
    for key, dtype in (("bf16", "torch.bfloat16"), ("fp16", "torch.float16")):
        status, msg = interp[key]
        assert status == "error"
        assert msg.startswith("TritonKernelError: ") and dtype in msg and "GPU-only" in msg


def test_bad_shape_is_one_clear_error(interp):
    status, msg = interp["bad-shape"]
    assert status == "error" and "bsr_linear: x must be (M, k=45), got (5, 44)" in msg


def test_cpu_without_interpreter_needs_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    d = DATA["b16-balanced"]
    with pytest.raises(tk.TritonKernelError, match="need a CUDA device; set TRITON_INTERPRET=1"):
        tk.bsr_linear(d["x"], d["values"], d["layout"])
    with pytest.raises(ValueError, match="need a CUDA device"):
        tk.bsr_sddmm(d["dy"], d["x"], d["layout"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: needs a CUDA device")
@pytest.mark.parametrize("dtype, unit", [(torch.float32, 2.0 ** -24), (torch.bfloat16, 2.0 ** -8),
                                         (torch.float16, 2.0 ** -11)])
def test_cuda_products_match_float64(dtype, unit, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with _allow_tf32(False):
        _check_cuda_products(dtype, unit)


def _check_cuda_products(dtype, unit):
    d = DATA["b64-ragged-empty-row-bias"]
    L = d["layout"].to("cuda")
    x, dy, v, b = (t.to("cuda", dtype) for t in (d["x"], d["dy"], d["values"], d["bias"]))
    w = tk.unpack_values(v, L).double()
    xd, dyd = x.double(), dy.double()
    # inputs are exact in `dtype`; fp32 accumulation, one rounding to `dtype` at the end
    y = tk.bsr_linear(x, v, L, b).double()
    ref = xd @ w.T + b.double()
    assert bool(((y - ref).abs() <= (x.shape[1] + 2) * U32 * (xd.abs() @ w.abs().T + b.double().abs())
                 + unit * ref.abs()).all())
    dx = tk.bsr_linear_grad_input(dy, v, L).double()
    ref = dyd @ w
    assert bool(((dx - ref).abs() <= (dy.shape[1] + 1) * U32 * (dyd.abs() @ w.abs()) + unit * ref.abs()).all())
    dv = tk.bsr_sddmm(dy, x, L).double()
    ref = tk.pack_values(dyd.T @ xd, L)
    bound = tk.pack_values((x.shape[0] + 1) * U32 * (dyd.abs().T @ xd.abs()), L) + unit * ref.abs()
    assert bool(((dv - ref).abs() <= bound).all())


# ---------------------------------------------------------------------------------------------
# Layout and packing (plain torch)

def test_layout_hand_computed():
    m = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    L = tk.make_layout(m, block=16, n=40, k=48)
    assert L.crow.tolist() == [0, 2, 2, 4] and L.col.tolist() == [0, 2, 0, 1]
    # W^T block-row 0 = W block-column 0: W blocks 0 (row 0) and 2 (row 2); column 1: block 3; column 2: block 1
    assert L.crow_t.tolist() == [0, 2, 3, 4] and L.col_t.tolist() == [0, 2, 2, 0] and L.perm_t.tolist() == [0, 2, 3, 1]
    assert L.row.tolist() == [0, 0, 2, 2] and L.nnz_per_row is None and L.nnz_per_col is None
    assert all(t.dtype == torch.int32 for t in (L.crow, L.col, L.crow_t, L.col_t, L.perm_t))
    assert torch.equal(L.block_mask(), m)


def _torch_bsr(dense: torch.Tensor, b: int):
    """torch's own BSR conversion (the independent reference for the layout tables)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)          # "Sparse BSR tensor support is in beta state"
        return dense.to_sparse_bsr((b, b))


@pytest.mark.parametrize("cid", CASE_IDS)
def test_layout_matches_torch_bsr(cid):
    d = DATA[cid]
    L, mask, b = d["layout"], d["mask"], d["layout"].block
    nb, kb = mask.shape
    ones = mask.repeat_interleave(b, 0).repeat_interleave(b, 1).float()          # (nb*b, kb*b), padded
    bsr, bsr_t = _torch_bsr(ones, b), _torch_bsr(ones.T.contiguous(), b)
    assert torch.equal(L.crow.long(), bsr.crow_indices()) and torch.equal(L.col.long(), bsr.col_indices())
    assert torch.equal(L.crow_t.long(), bsr_t.crow_indices()) and torch.equal(L.col_t.long(), bsr_t.col_indices())
    # perm_t: tag each block of W with (its value index + 1), transpose, read the tags in W^T's order
    tags = torch.zeros(nb, kb)
    tags[L.row.long(), L.col.long()] = torch.arange(1, L.nnzb + 1, dtype=torch.float)
    tagged = tags.repeat_interleave(b, 0).repeat_interleave(b, 1)
    tags_t = _torch_bsr(tagged.T.contiguous(), b).values()[:, 0, 0]
    assert torch.equal(L.perm_t.long(), tags_t.long() - 1)
    # the values: torch's BSR of the (padded) masked weight; randn has no exact zeros
    padded = torch.nn.functional.pad(d["w_masked"], (0, kb * b - L.k, 0, nb * b - L.n))
    assert torch.equal(d["values"], _torch_bsr(padded, b).values())
    # balanced layouts are recognised
    per_row = mask.sum(1)
    assert L.nnz_per_row == (int(per_row[0]) if bool((per_row == per_row[0]).all()) else None)


@pytest.mark.parametrize("cid", CASE_IDS)
def test_pack_unpack_round_trip(cid):
    d = DATA[cid]
    assert torch.equal(tk.unpack_values(d["values"], d["layout"]), d["w_masked"])
    assert torch.equal(tk.pack_values(d["w_masked"], d["layout"]), d["values"])
    assert torch.equal(tk.block_mask_of(d["w_masked"], d["layout"].block), d["mask"])


def test_balanced_block_masks_from_the_planner():
    mask = make_mask("balanced_block:16", (64, 96), 0.5, seed=0, name="fc.weight")   # (64, 96) float 0/1
    L = tk.make_layout(tk.block_mask_of(mask, 16), 16, 64, 96)
    assert L.nnz_per_row == 3 and L.nnzb == 12
    assert tk.kernel_spec(L, "fwd", interpret=False).name == "sg_bsr_fwd_b16_n3_fp32_ieee"


def test_layout_errors_name_the_problem():
    with pytest.raises(tk.TritonKernelError, match=r"block_mask must have shape .* = \(3, 2\).*got \(2, 2\)"):
        tk.make_layout(torch.ones(2, 2, dtype=torch.bool), 16, 40, 20)
    with pytest.raises(tk.TritonKernelError, match="block must be a positive int"):
        tk.make_layout(torch.ones(1, 1, dtype=torch.bool), 0, 4, 4)
    L = tk.make_layout(torch.ones(1, 1, dtype=torch.bool), 16, 16, 16)
    with pytest.raises(tk.TritonKernelError, match=r"pack_values: weight must be \(16, 16\)"):
        tk.pack_values(torch.zeros(16, 15), L)
    with pytest.raises(ValueError, match="nnz_per_row=2 but the block-rows hold"):
        tk.BlockSparseLayout(16, 16, 16, L.crow, L.col, L.crow_t, L.col_t, L.perm_t, nnz_per_row=2)
    with pytest.raises(ValueError, match=r"block sizes \(16, 32, 64\)"):
        tk.kernel_spec(tk.make_layout(torch.ones(1, 1, dtype=torch.bool), 8, 8, 8), "fwd")
