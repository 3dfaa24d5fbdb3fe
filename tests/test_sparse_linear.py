"""sparsegraph::sparse_linear against dense masked products (float64 reference), every format."""
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegraph.backends import cpu, cpu_op
from sparsegraph.backends.cost_model import cpuinfo
from sparsegraph.backends.sparse_linear import (SparseLinearError, SparseWeight, block_mask_of, sparse_conv2d,
                                                sparse_linear, sparse_linear_packed)


def _targets() -> dict[str, int | None]:
    """The library's forms this CPU runs, by `-march`, with their vector bytes: its own, and on x86
    the AVX2 form (under AVX-512) and the SSE form, whose register tiles and vector widths differ."""
    flags = set(cpuinfo("flags").get("flags", "").split())
    if platform.machine() != "x86_64" or "avx" not in flags:
        return {"native": None}
    out = {"native": 64 if "avx512f" in flags else 32}
    if "avx512f" in flags:
        out["x86-64-v3"] = 32
    return {**out, "x86-64-v2": 16}


@pytest.fixture(params=list(_targets()))
def target(request, monkeypatch):
    """Runs a test once per form of the native library (see `_targets`), the op's C++ kernel included."""
    if request.param == "native":
        yield request.param
        return
    if not cpu.available():
        pytest.skip("no C compiler")
    native, lib = cpu.library(), cpu.load(request.param)
    monkeypatch.setattr(cpu, "_lib", lib)
    if cpu_op.loaded():
        cpu_op.point(lib)
    yield request.param
    if cpu_op.loaded():
        cpu_op.point(native)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Runs a test with one thread (the kernels then skip the OpenMP region: SG_TEAM) and with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_vector_width_follows_the_target():
    """One vector is one register of the target (a wider GCC vector lives on the stack), and blocks
    of a multiple of its width take the packed kernels."""
    if not cpu.available():
        pytest.skip("no C compiler")
    for march, vbytes in _targets().items():
        lib = cpu.load(march)
        if vbytes is not None:
            assert lib.sg_vector_bytes() == lib.vector_bytes == vbytes, march
    assert cpu._lanes(torch.zeros(1)) * 4 == cpu.library().sg_vector_bytes()


def _weight(n, k, block, density, seed, balanced=False, empty_rows=0, dtype=torch.float64):
    """A block-sparse (n, k) weight (exactly block-structured), some block-rows empty."""
    g = torch.Generator().manual_seed(seed)
    R, C = -(-n // block), -(-k // block)
    if balanced:
        per = max(1, round(density * C))
        bm = torch.zeros(R, C, dtype=torch.bool)
        for r in range(R):
            bm[r, torch.randperm(C, generator=g)[:per]] = True
    else:
        bm = torch.rand(R, C, generator=g) < density
    bm[:empty_rows] = False
    mask = bm.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    w = torch.randn(n, k, generator=g, dtype=dtype) * mask
    return SparseWeight.from_dense(w, block, mask=mask), w


def _reference(x, w, bias, dim):
    """y = W along dim, in float64, through dense autograd."""
    y = torch.movedim(torch.movedim(x, dim, -1) @ w.t(), -1, dim)
    if bias is not None:
        shape = [1] * y.dim()
        shape[dim % y.dim()] = -1
        y = y + bias.view(shape)
    return y


def _check(sw, w, x_shape, dim, with_bias, impl, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    x64 = torch.randn(*x_shape, generator=g, dtype=torch.float64)
    b64 = torch.randn(sw.n, generator=g, dtype=torch.float64) if with_bias else None
    dy64 = torch.randn(*_out_shape(x_shape, dim, sw.n), generator=g, dtype=torch.float64)
    # float64 reference with gradients for x, the values (through a differentiable unpack) and bias
    xr = x64.clone().requires_grad_()
    vr = sw.values.to(torch.float64).clone().requires_grad_()
    br = b64.clone().requires_grad_() if with_bias else None
    yr = _reference(xr, cpu.unpack(vr, sw.crow, sw.col, sw.n, sw.k, sw.block), br, dim)
    grads_r = torch.autograd.grad(yr, [t for t in (xr, vr, br) if t is not None], dy64)
    # the op, in the dtype under test
    x = x64.to(dtype).requires_grad_()
    v = sw.values.to(dtype).clone().requires_grad_()
    b = b64.to(dtype).requires_grad_() if with_bias else None
    y = sparse_linear(x, v, sw.crow, sw.col, sw.crow_t, sw.col_t, sw.perm_t, b, sw.n, sw.k, sw.block, dim, impl)
    assert y.shape == yr.shape and y.dtype == dtype and y.is_contiguous()
    grads = torch.autograd.grad(y, [t for t in (x, v, b) if t is not None], dy64.to(dtype))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for got, want in zip((y, *grads), (yr, *grads_r)):
        assert got.shape == want.shape
        if want.numel():
            scale = max(1.0, want.abs().max().item()) * max(sw.k, sw.n) ** 0.5
            assert (got.double() - want).abs().max().item() <= tol * scale


def _out_shape(x_shape, dim, n):
    s = list(x_shape)
    s[dim % len(s)] = n
    return tuple(s)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), k=st.integers(1, 70), block=st.sampled_from([1, 2, 3, 8, 16, 32]),
       density=st.floats(0.0, 1.0), balanced=st.booleans(), empty=st.integers(0, 2),
       rows=st.sampled_from([(1,), (3,), (17,), (2, 5), (0,)]), with_bias=st.booleans(),
       impl=st.sampled_from(["auto", "torch"]), seed=st.integers(0, 1000))
def test_rows_layout_matches_dense(n, k, block, density, balanced, empty, rows, with_bias, impl, seed):
    sw, w = _weight(n, k, block, density, seed, balanced, empty)
    _check(sw, w, (*rows, k), -1, with_bias, impl, torch.float64, seed)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 50), k=st.integers(1, 50), block=st.sampled_from([1, 4, 16, 32]),
       density=st.floats(0.05, 1.0), P=st.integers(1, 3), L=st.integers(1, 40), with_bias=st.booleans(),
       impl=st.sampled_from(["auto", "torch"]), seed=st.integers(0, 1000))
def test_cols_layout_matches_dense(n, k, block, density, P, L, with_bias, impl, seed):
    sw, w = _weight(n, k, block, density, seed, empty_rows=1)
    _check(sw, w, (P, k, L), 1, with_bias, impl, torch.float64, seed)


@pytest.mark.parametrize("block,balanced", [(1, False), (16, False), (32, True)])
@pytest.mark.parametrize("rows", [(1,), (24,), (64,), (4, 33)])  # 24: lane tiles of 2 vectors, then 1 (AVX2)
def test_float32_against_float64(block, balanced, rows, target, threads):
    sw, w = _weight(200, 150, block, 0.2, 7, balanced, empty_rows=1)
    _check(sw, w, (*rows, 150), -1, True, "auto", torch.float32, 7)


@pytest.mark.parametrize("n,k,block,rows", [
    (200, 512, 32, (300,)),    # k * 4 bytes a multiple of 2 KiB: x copied to a padded stride; several chunks
    (130, 200, 32, (2, 61)),   # ragged n and k, no copy of x
    (130, 300, 32, (2, 150)),  # x over 256 KiB, ragged k: copied (streamed in), zero-padded to whole blocks
    (256, 256, 64, (7,)),      # four vectors per block-row
    (96, 100, 48, (13,)),      # three vectors
    (200, 96, 96, (33,)),      # two lane groups (64 + 32)
    (40, 4100, 32, (150,)),    # X's rows over 1 MiB: dvalues in chunks of 64 rows, the last ragged
    (1030, 100, 32, (450,)),   # dY's rows 4 KiB apart: its panels copied per chunk too (three, the last ragged)
    (70, 90, 32, (3,)),        # 3 rows: the kernel transposes each block-row's blocks as it takes the row
    (6000, 128, 32, (60,)),    # dX's rows of 6000 inputs, ~56 blocks per block-row: dY's columns in slices
    (100, 72, 32, (1850,)),    # with 2 threads, forward and dX: each thread takes whole groups of rows
])
def test_packed_rows_kernel_against_float64(n, k, block, rows, target, threads):
    """The packed rows kernel (block a multiple of 16 floats): forward, dX through W's own values,
    dvalues, with empty block-rows, ragged edges, partial tiles and multi-chunk row counts."""
    sw, w = _weight(n, k, block, 0.3, 3, balanced=False, empty_rows=1)
    _check(sw, w, (*rows, k), -1, True, "auto", torch.float32, 3)


@pytest.mark.parametrize("rows", [(3,), (40,), (700,)])
def test_packed_rows_kernel_float64(rows, target):
    """float64 (8 lanes): W's blocks transposed per block-row (one chunk of rows: 3, 40) or into one
    shared copy up front (several chunks: 700 rows)."""
    sw, w = _weight(100, 520, 16, 0.3, 5, balanced=False, empty_rows=1)
    _check(sw, w, (*rows, 520), -1, True, "auto", torch.float64, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepared_long_rows_in_slices_against_float64(dtype, threads):
    """Rows of 6000 inputs with ~56 blocks per block-row (and one empty block-row): the packed kernel
    takes x's columns in slices, summing y over them; the bias is added once."""
    sw, w = _weight(200, 6000, 32, 0.3, 13, empty_rows=1, dtype=dtype)
    bias = torch.randn(200, dtype=dtype)
    prep = cpu.Prepared.make(sw.values, sw.crow, sw.col, bias, 200, 6000, 32)
    x = torch.randn(60, 6000, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    want = x.double() @ w.double().T + bias.double()
    scale = want.abs().max().item()
    assert (prep(x).double() - want).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepared_one_row_and_several_against_float64(dtype, target, threads):
    """`cpu.Prepared` (the packed kernel on its transposed copy of the blocks): one row and several
    (a non-contiguous x too), ragged n and k, an empty block-row, a bias; it does not accept x of the
    wrong shape or dtype (the op then names the mismatch), and an in-place update of the values or
    another bias makes it stale."""
    sw, w = _weight(100, 70, 16, 0.4, 11, empty_rows=1, dtype=dtype)
    bias = torch.randn(100, dtype=dtype)
    prep = cpu.Prepared.make(sw.values, sw.crow, sw.col, bias, 100, 70, 16)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for x in (torch.randn(1, 70, dtype=dtype), torch.randn(1, 1, 70, dtype=dtype), torch.randn(5, 70, dtype=dtype),
              torch.randn(70, 3, dtype=dtype).t()):
        assert prep.accepts(x) and prep.current(bias, sw.crow, sw.col)
        want = x.double() @ w.double().T + bias.double()
        torch.testing.assert_close(prep(x).double(), want, rtol=tol, atol=tol)
    for wrong in (torch.randn(2, 35, dtype=dtype), torch.randn(70, dtype=dtype)[0], x.to(torch.float16)):
        assert not prep.accepts(wrong)
    assert not prep.current(torch.randn(100, dtype=dtype))  # another bias
    sw.values.mul_(2)
    assert not prep.current(bias)


_HEAP_PROBE = """
import ctypes, torch
from sparsegraph.backends import cpu
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
def activation(mib=40):  # bytes mapped for a block of `mib` MiB, bytes free in the heap once it is freed
    mapped = mallinfo2().hblkhd
    t = torch.empty(mib << 18)
    mapped = mallinfo2().hblkhd - mapped
    del t
    return mapped, mallinfo2().fordblks
print(*activation(), *activation())
assert cpu.keep_heap()
print(*activation())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_heap_keeps_freed_blocks_in_the_heap():
    """As is, glibc maps every block over 32 MiB on its own, unmaps it when it is freed and maps it
    afresh (its pages faulted in again) the next time; after `keep_heap` such a block comes from the
    heap and stays there, free, for the next forward. (In a child process: the setting is the process's;
    below 32 MiB glibc's own thresholds adapt, and whether it trims depends on the heap's layout.)"""
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    mapped, _, mapped_again, _, mapped_kept, free_kept = map(int, out.stdout.split())
    MiB = 1 << 20
    assert mapped >= 40 * MiB and mapped_again >= 40 * MiB, out.stdout  # as is
    assert mapped_kept == 0 and free_kept >= 40 * MiB, out.stdout  # kept
    with pytest.raises(ValueError, match="positive"):
        cpu.keep_heap(0)


def _lowered(n=96, k=64, block=16, seed=0):
    from sparsegraph.nn.lowered import LoweredLinear, SparseLayout

    sw, w = _weight(n, k, block, 0.4, seed, empty_rows=1, dtype=torch.float32)
    index = dict(crow=sw.crow, col=sw.col, crow_t=sw.crow_t, col_t=sw.col_t, perm_t=sw.perm_t)
    bias = torch.nn.Parameter(torch.randn(n))
    return LoweredLinear(torch.nn.Parameter(sw.values.clone()), index, SparseLayout(n, k, block), bias)


def test_eager_inference_takes_one_native_call_and_sees_weight_updates():
    """Under no_grad a lowered linear layer runs `cpu.Prepared` (no op dispatch); an optimizer step
    (an in-place update of the values, new version) is seen by the next call; with autograd the op runs."""
    from sparsegraph.nn import lowered

    layer = _lowered()
    x = torch.randn(3, 5, 64)

    def reference():
        return x @ cpu.unpack(layer.weight_values.detach(), layer.weight_crow, layer.weight_col, 96, 64, 16).T \
            + layer.bias.detach()

    with torch.no_grad():
        y = layer(x)
        prep = lowered._prepared.get(layer)
        assert isinstance(prep, cpu.Prepared)
        with pytest.raises(SparseLinearError, match="dtype"):  # an input it does not accept: the op names why
            layer(x.double())
        assert lowered._prepared.get(layer) is prep  # and the weight is not prepared again
    torch.testing.assert_close(y, reference(), rtol=1e-5, atol=1e-5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    out = layer(x)  # autograd: the op, differentiable
    assert out.requires_grad
    out.square().sum().backward()
    opt.step()
    with torch.no_grad():
        y2 = layer(x)
    torch.testing.assert_close(y2, reference(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y2, y)
    with torch.no_grad():
        assert layer(x[:0]).shape == (0, 5, 96)
    with torch.inference_mode():  # a layer made in inference mode has no version counters: the op runs
        frozen = _lowered()
        torch.testing.assert_close(frozen(x), sparse_linear(x, frozen.weight_values, frozen.weight_crow,
                                                            frozen.weight_col, frozen.weight_crow_t,
                                                            frozen.weight_col_t, frozen.weight_perm_t, frozen.bias,
                                                            96, 64, 16))
        assert lowered._prepared.get(frozen) is None


def test_no_blocks_at_all():
    sw, w = _weight(40, 30, 16, 0.0, 0)
    assert sw.nnzb == 0
    x = torch.randn(5, 30, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64)
    y = sw.apply(x, bias)
    assert torch.equal(y, bias.expand(5, 40))
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(dx, torch.zeros_like(x))


@pytest.mark.parametrize("block", [1, 4, 16])
@pytest.mark.parametrize("conf", [dict(stride=1, padding=1, dilation=1), dict(stride=2, padding=0, dilation=2),
                                  dict(stride=(1, 2), padding=(2, 0), dilation=1)])
@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_sparse_conv2d_matches_conv2d(block, conf, impl, target):
    g = torch.Generator().manual_seed(block)
    mask = torch.rand(24, 5 * 9, generator=g) < 0.3
    mask = block_mask_of(mask, block).repeat_interleave(block, 0).repeat_interleave(block, 1)[:24, :45]
    mask[:block] = False  # an empty block-row
    w = torch.randn(24, 5, 3, 3, dtype=torch.float64, generator=g) * mask.view(24, 5, 3, 3)
    sw = SparseWeight.from_dense(w.reshape(24, -1), block, mask=mask)
    x = torch.randn(3, 5, 9, 11, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64, generator=g, requires_grad=True)
    values = sw.values.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    y = sparse_conv2d(x, values, sw.crow, sw.col, sw.crow_t, sw.col_t, sw.perm_t, bias, 24, [3, 3],
                      *(list(conf[k]) if isinstance(conf[k], tuple) else [conf[k]] * 2
                        for k in ("stride", "padding", "dilation")), block, impl)
    yr = F.conv2d(x, wr, bias, **conf)
    assert y.shape == yr.shape and torch.allclose(y, yr, atol=1e-10)
    dy = torch.randn_like(y)
    dx, dv, db = torch.autograd.grad(y, (x, values, bias), dy)
    dxr, dwr, dbr = torch.autograd.grad(yr, (x, wr, bias), dy)
    assert torch.allclose(dx, dxr, atol=1e-10) and torch.allclose(db, dbr, atol=1e-10)
    assert torch.allclose(dv, cpu.pack(dwr.reshape(24, -1), sw.crow, sw.col, block), atol=1e-10)


@pytest.mark.parametrize("shape", [(7, 256, 5, 4), (2, 48, 20, 17), (33, 128, 2, 2)])
@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("stride", [1, 2])
def test_native_conv2d_chunks_and_interleaved_images(shape, block, stride, target):
    """The native kernels with K long enough to run in two chunks at stride 1 (the first and last
    shapes; a chunk holds as many channels as fit 192 KiB of x), where small images are interleaved
    several to a group (with a ragged last group in float64) and large ones take several lane tiles,
    and at stride 2 (im2col tiles); a ragged output block-row and an empty one; float64 and float32
    against F.conv2d in float64, and the blocks of each row stored in reverse order."""
    if not cpu.available():
        pytest.skip("no C compiler")
    N, C, H, W = shape
    g = torch.Generator().manual_seed(N)
    mask = torch.rand(40, C * 9, generator=g) < 0.25
    mask = block_mask_of(mask, block).repeat_interleave(block, 0).repeat_interleave(block, 1)[:40, :C * 9]
    mask[block:2 * block] = False
    w = torch.randn(40, C, 3, 3, dtype=torch.float64, generator=g) * mask.view(40, C, 3, 3)
    sw = SparseWeight.from_dense(w.reshape(40, -1), block, mask=mask)
    x = torch.randn(N, C, H, W, dtype=torch.float64, generator=g)
    bias = torch.randn(40, dtype=torch.float64, generator=g)
    ref = F.conv2d(x, w, bias, stride=stride, padding=1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        y = cpu.conv2d(x.to(dtype), sw.values.to(dtype), sw.crow, sw.col, bias.to(dtype), 40, (3, 3),
                       (stride, stride), (1, 1), (1, 1), block)
        assert y is not None and y.dtype == dtype
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol * ref.abs().max().item())
    rows = zip(sw.crow[:-1].tolist(), sw.crow[1:].tolist())
    rev = torch.cat([torch.arange(a, b).flip(0) for a, b in rows])  # each block still in exactly one K chunk
    y = cpu.conv2d(x, sw.values[rev], sw.crow, sw.col[rev], bias, 40, (3, 3), (stride, stride), (1, 1), (1, 1), block)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12 * ref.abs().max().item())


@pytest.mark.parametrize("N, C, H, W, kernel, padding, dilation", [
    (23, 40, 2, 2, (3, 3), (1, 1), (1, 1)),  # small images interleaved: 6 groups of 4, the last one short
    (2, 24, 12, 11, (3, 5), (2, 3), (2, 1)),  # asymmetric kernel, wider padding, dilation
    (3, 16, 6, 5, (3, 3), (3, 3), (1, 1)),  # padding past the kernel's reach: rows Wo apart, not W + PW
    (1, 70, 33, 34, (3, 3), (1, 1), (1, 1)),  # three lane items in one image; K = 630 not a multiple of b
])
@pytest.mark.parametrize("block", [16, 32])
def test_native_conv2d_output_channels_along_the_vector(N, C, H, W, kernel, padding, dilation, block, target):
    """Stride-1 convolutions with b a multiple of the vector width run output channels along the
    vector, reading the padded images with one column of zeros between rows: float32 and float64
    against F.conv2d in float64, with a ragged last block-row (50 outputs), an empty block-row and a
    bias."""
    if not cpu.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(C + block)
    K = C * kernel[0] * kernel[1]
    mask = torch.rand(50, K, generator=g) < 0.3
    mask = block_mask_of(mask, block).repeat_interleave(block, 0).repeat_interleave(block, 1)[:50, :K]
    mask[:block] = False
    w = torch.randn(50, C, *kernel, dtype=torch.float64, generator=g) * mask.view(50, C, *kernel)
    sw = SparseWeight.from_dense(w.reshape(50, -1), block, mask=mask)
    x = torch.randn(N, C, H, W, dtype=torch.float64, generator=g)
    bias = torch.randn(50, dtype=torch.float64, generator=g)
    ref = F.conv2d(x, w, bias, padding=padding, dilation=dilation)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        y = cpu.conv2d(x.to(dtype), sw.values.to(dtype), sw.crow, sw.col, bias.to(dtype), 50, kernel, (1, 1),
                       padding, dilation, block)
        assert y is not None and y.shape == ref.shape and y.dtype == dtype
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("stride, padding", [((1, 1), (0, 0)), ((2, 2), (0, 0)), ((2, 3), (0, 0)), ((2, 2), (1, 0))])
def test_native_1x1_conv2d(stride, padding, target):
    """A 1x1 convolution without padding (ResNet's shortcuts) runs the cols kernel on the positions it
    reads; with padding, the im2col tiles. Both against F.conv2d in float64."""
    if not cpu.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 48, 1, 1, dtype=torch.float64, generator=g)
    w *= (torch.rand(40, 48, generator=g) < 0.3).view(40, 48, 1, 1)
    sw = SparseWeight.from_dense(w.reshape(40, 48), 8)
    x = torch.randn(3, 48, 9, 14, dtype=torch.float64, generator=g)
    bias = torch.randn(40, dtype=torch.float64, generator=g)
    y = cpu.conv2d(x, sw.values, sw.crow, sw.col, bias, 40, (1, 1), stride, padding, (1, 1), 8)
    ref = F.conv2d(x, w, bias, stride=stride, padding=padding)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12 * ref.abs().max().item())
    y = cpu.conv2d(x[:0], sw.values, sw.crow, sw.col, bias, 40, (1, 1), stride, padding, (1, 1), 8)  # no images
    assert y.shape == F.conv2d(x[:0], w, bias, stride=stride, padding=padding).shape
    if padding == (0, 0):  # no positions (F.conv2d refuses an empty image)
        y = cpu.conv2d(x[:, :, :0], sw.values, sw.crow, sw.col, bias, 40, (1, 1), stride, padding, (1, 1), 8)
        assert y.shape == (3, 40, 0, -(-14 // stride[1]))


def test_sparse_conv2d_opcheck():
    sw, _ = _weight(20, 4 * 9, 4, 0.4, 3, empty_rows=1, dtype=torch.float32)
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    args = (x, sw.values.clone().requires_grad_(), sw.crow, sw.col, sw.crow_t, sw.col_t, sw.perm_t,
            torch.randn(20, requires_grad=True), 20, [3, 3], [1, 1], [1, 1], [1, 1], 4, "auto")
    torch.library.opcheck(torch.ops.sparsegraph.sparse_conv2d.default, args)


@pytest.mark.parametrize("case", ["csr", "bsr", "balanced_bsr", "cols"])
def test_opcheck(case):
    block = {"csr": 1, "bsr": 16, "balanced_bsr": 16, "cols": 8}[case]
    sw, _ = _weight(50, 45, block, 0.3, 1, balanced=case == "balanced_bsr", empty_rows=1, dtype=torch.float32)
    values = sw.values.clone().requires_grad_()
    if case == "cols":
        x, bias, dim = torch.randn(2, 45, 7, requires_grad=True), None, 1
    else:
        x, bias, dim = torch.randn(3, 4, 45, requires_grad=True), torch.randn(50, requires_grad=True), -1
    args = (x, values, sw.crow, sw.col, sw.crow_t, sw.col_t, sw.perm_t, bias, 50, 45, block, dim, "auto")
    torch.library.opcheck(torch.ops.sparsegraph.sparse_linear.default, args)


@pytest.mark.parametrize("block", [4, 32])  # 32: the C++ kernel takes the call first, hands it on
def test_bad_inputs_name_the_problem(block):
    sw, _ = _weight(40, 64, block, 0.5, 0, dtype=torch.float32)
    with pytest.raises(SparseLinearError, match="k=64"):
        sw.apply(torch.randn(3, 65))
    with pytest.raises(SparseLinearError, match="dtype"):
        sw.apply(torch.randn(3, 64, dtype=torch.float64))
    with pytest.raises(SparseLinearError, match="impl"):
        sw.apply(torch.randn(3, 64), impl="magic")
    with pytest.raises(SparseLinearError, match="values"):
        sparse_linear(torch.randn(3, 64), sw.values[:, :2], sw.crow, sw.col, sw.crow_t, sw.col_t, sw.perm_t, None,
                      40, 64, block)
    with pytest.raises(SparseLinearError, match="crow"):
        sparse_linear(torch.randn(3, 64), sw.values, sw.crow[:-1], sw.col, sw.crow_t, sw.col_t, sw.perm_t, None,
                      40, 64, block)


def test_the_op_reaches_its_cpu_kernel_without_python(monkeypatch):
    """With the native library, sparse_linear's CPU dispatch is the C++ kernel on every path of
    `cpu.linear` (dot products, packed rows, x^T in chunks of rows, the rows kernel): the Python body
    (and with it `cpu.linear`) runs only for the cases that kernel hands on (here impl="torch"); its
    autograd is C++ too."""
    assert cpu.available() and cpu_op.loaded(), cpu_op.ERROR
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sparsegraph::sparse_linear", "CPU")

    def python_body(*args, **kwargs):
        raise AssertionError("the Python body ran")

    monkeypatch.setattr(cpu, "linear", python_body)
    lanes = cpu.library().vector_bytes // 4
    monkeypatch.setattr(cpu, "TRANSPOSE_ROWS", 3)  # x^T's chunks: several even at a few rows
    cpu_op.point(cpu.library())
    try:
        for block in (1, 4, 12, lanes, 2 * lanes, 4 * lanes):
            sw, w = _weight(3 * block + 5, 2 * block + 3, block, 0.6, block, dtype=torch.float32)
            bias = torch.randn(sw.n)
            for rows in ((1,), (2,), (3,), (7,), (4, 3), (0,)):
                x = torch.randn(*rows, sw.k)
                want = x.double() @ w.T.double()
                torch.testing.assert_close(sw.apply(x).double(), want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(sw.apply(x, bias).double(), want + bias.double(), rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.undo()
        cpu_op.point(cpu.library())
    monkeypatch.setattr(cpu, "linear", python_body)
    with pytest.raises(AssertionError, match="Python body"):
        sw.apply(torch.randn(2, sw.k), impl="torch")
    x = torch.randn(5, sw.k, requires_grad=True)  # autograd in C++ too: its node, gradients against float64
    v = sw.values.clone().requires_grad_()
    y = sparse_linear(x, v, sw.crow, sw.col, sw.crow_t, sw.col_t, sw.perm_t, bias, sw.n, sw.k, sw.block)
    assert "SparseLinearFn" in y.grad_fn.name()
    dy = torch.randn(5, sw.n)
    dx, dv = torch.autograd.grad(y, (x, v), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.T.double().requires_grad_()
    dx64, dw64 = torch.autograd.grad(x64 @ w64, (x64, w64), dy.double())
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.unpack(dv, sw.crow, sw.col, sw.n, sw.k, sw.block).double(), dw64.T * (w != 0),
                               rtol=1e-5, atol=1e-5)


def test_sparse_conv2d_reaches_its_cpu_kernel_without_python(monkeypatch):
    """sparse_conv2d's CPU dispatch is C++ too: the direct kernel (3x3, strides, padding, dilation,
    blocks 1-32) and the cols kernel for an unpadded 1x1 (strided), with the Python body patched to
    fail; impl="torch" still reaches the Python body. Against float64 conv2d."""
    from sparsegraph.backends import sparse_linear as sl

    assert cpu.available() and cpu_op.loaded(), cpu_op.ERROR
    monkeypatch.setattr(sl, "_check_conv", lambda *a, **k: pytest.fail("the Python body ran"))
    gen = torch.Generator().manual_seed(3)
    for C, out, kernel, stride, padding, dilation, block in [(16, 32, 3, 1, 1, 1, 16), (16, 32, 3, 2, 1, 1, 32),
                                                              (8, 12, 3, 1, 0, 2, 4), (16, 24, 1, 2, 0, 1, 8),
                                                              (16, 20, 1, 1, 0, 1, 1), (6, 10, (3, 1), (2, 1), (1, 0),
                                                                                         1, 2)]:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        w = torch.randn(out, C, kh, kw, generator=gen) * (torch.rand(out, C, kh, kw, generator=gen) < 0.4)
        sw = SparseWeight.from_dense(w.reshape(out, -1), block)
        x, bias = torch.randn(2, C, 9, 7, generator=gen), torch.randn(out, generator=gen)
        want = F.conv2d(x.double(), w.double(), bias.double(), stride, padding, dilation)
        got = sw.conv2d(x, bias, kernel, stride, padding, dilation)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        if kernel == 3:  # a 2x2 image with no room for the kernel (the floor of -1 / 2): no positions at all
            assert sw.conv2d(x[:1, :, :2, :2], None, 3, 2, 0, 1).shape == (1, out, 0, 0)
    with pytest.raises(pytest.fail.Exception, match="Python body"):
        sw.conv2d(x, bias, kernel, stride, padding, dilation, impl="torch")


def _packed(x, sw, bias=None):
    return sparse_linear_packed(x, sw.values.transpose(1, 2).contiguous(), sw.crow, sw.col, bias, sw.n, sw.k,
                                sw.block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_op_against_float64(dtype, target, threads, monkeypatch):
    """sparse_linear_packed (W's blocks given (in, out), as frozen graphs pass them): blocks a
    multiple of the vector width run the packed kernel on them as given, from the C++ kernel with
    no Python (`cpu.linear_packed` patched to raise); other blocks (CSR, 4, 12) take the Python body,
    which transposes them back. Ragged n and k, an empty block-row, 0-9 rows and (4, 3)."""
    lanes = cpu.library().vector_bytes // torch.empty(0, dtype=dtype).element_size()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for block in (1, 4, 12, lanes, 2 * lanes, 3 * lanes, 4 * lanes):  # (up to 4 vectors per tile at 1-3 rows)
        native = block % lanes == 0 and cpu_op.loaded()
        sw, w = _weight(3 * block + 5, 2 * block + 3, block, 0.6, block, empty_rows=1, dtype=dtype)
        bias = torch.randn(sw.n, dtype=dtype)
        with monkeypatch.context() as m:
            if native:
                m.setattr(cpu, "linear_packed", lambda *a: pytest.fail("the Python body ran"))
            for rows in ((0,), (1,), (2,), (3,), (8,), (9,), (4, 3)):
                x = torch.randn(*rows, sw.k, dtype=dtype)
                want = x.double() @ w.T.double()
                torch.testing.assert_close(_packed(x, sw).double(), want, rtol=tol, atol=tol)
                torch.testing.assert_close(_packed(x, sw, bias).double(), want + bias.double(), rtol=tol, atol=tol)
    sw, w = _weight(100, 72, 4 * lanes, 0.5, 1, empty_rows=1, dtype=dtype)
    x, bias = torch.randn(1850, 72, dtype=dtype), torch.randn(100, dtype=dtype)  # 2 threads: groups of rows each
    torch.testing.assert_close(_packed(x, sw, bias).double(), x.double() @ w.T.double() + bias.double(), rtol=tol,
                               atol=tol)


def test_packed_op_is_inference_only_and_names_bad_inputs():
    """No backward: it refuses inputs that want a gradient (C++ and Python bodies alike) and runs
    under no_grad; bad shapes are named as for sparse_linear; opcheck passes without autograd."""
    for block in (4, 32):
        sw, _ = _weight(40, 64, block, 0.5, 0, dtype=torch.float32)
        x = torch.randn(3, 64, requires_grad=True)
        with pytest.raises(RuntimeError, match="inference only|autograd"):
            _packed(x, sw).sum().backward()
        with torch.no_grad():
            assert _packed(x, sw).shape == (3, 40)
        with pytest.raises(SparseLinearError, match="k=64"):
            _packed(torch.randn(3, 65), sw)
        with pytest.raises(SparseLinearError, match="dtype"):
            _packed(torch.randn(3, 64, dtype=torch.float64), sw)
        with pytest.raises(SparseLinearError, match="crow"):
            sparse_linear_packed(torch.randn(3, 64), sw.values, sw.crow[:-1], sw.col, None, 40, 64, block)
        args = (torch.randn(3, 4, 64), sw.values.transpose(1, 2).contiguous(), sw.crow, sw.col, torch.randn(40),
                40, 64, block)
        torch.library.opcheck(torch.ops.sparsegraph.sparse_linear_packed.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _without(tool: str, block: int, warning: str, check: str, tmp_path) -> str:
    """Runs a block-`block` product twice in a new process whose `tool` (CC or CXX) does not exist:
    it must match x @ w.T, `check` must hold, and exactly one warning contains `warning` (printed)."""
    code = (
        "import warnings, torch\n"
        "from sparsegraph.backends import cpu, cpu_op\n"
        "from sparsegraph.backends.sparse_linear import SparseWeight\n"
        "w = torch.randn(64, 40) * (torch.rand(64, 40) < 0.3)\n"
        "x = torch.randn(4, 40)\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        f"    y = SparseWeight.from_dense(w, {block}).apply(x)\n"
        f"    y = SparseWeight.from_dense(w, {block}).apply(x)\n"
        f"assert {check}\n"
        f"msgs = [str(r.message) for r in rec if {warning!r} in str(r.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert torch.allclose(y, x @ w.T, atol=1e-5)\n"
        "print(msgs[0])\n")
    env = dict(os.environ, SPARSEGRAPH_CACHE=str(tmp_path), **{tool: str(tmp_path / "no-such-compiler")})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_falls_back_cleanly_without_a_compiler(tmp_path):
    """No C compiler: one warning, and the PyTorch kernels give the same results."""
    out = _without("CC", 1, "native CPU sparse kernels", "not cpu.available()", tmp_path)
    assert "no C compiler" in out


def test_the_op_keeps_its_python_body_without_a_cxx_compiler(tmp_path):
    """No C++ compiler: one warning naming it; the native library still serves the Python body."""
    check = ("cpu.available() and not cpu_op.loaded() and not "
             "torch._C._dispatch_has_kernel_for_dispatch_key('sparsegraph::sparse_linear', 'CPU')")
    out = _without("CXX", 32, "C++", check, tmp_path)
    assert "no C++ compiler" in out


def test_native_kernels_build():
    """On this machine (gcc present) the native kernels build and load."""
    assert cpu.available(), cpu.BUILD_ERROR
