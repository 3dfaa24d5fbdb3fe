"""The ort-native lowering: sparsegraph.SparseLinear and SparseConv, the native kernels as ONNX Runtime custom ops.

The ops run in real ONNX Runtime sessions against float64 products and convolutions; model-level parity
(gpt-mini, resnet-mini's convolutions and Gemm head, Hugging Face GPT-2) is in test_onnx_export.py (MODES)."""
from __future__ import annotations

import io
import lzma
import os
import re
import tarfile

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import sparsegraph as sg
from sparsegraph.cli import main
from sparsegraph.graph import SparsegraphError
from sparsegraph.models import builtin
from sparsegraph.onnx import native
from sparsegraph.onnx.lowering import bsr_of, conv_bsr_of

from .onnx_checks import check_written, rel_err

needs_headers = pytest.mark.skipif(native.include_dir() is None,
                                   reason="no ONNX Runtime C API headers: run `sparsegraph ort-headers`")


def _weight(K: int, N: int, b: int, density: float, seed: int) -> np.ndarray:
    """W (K, N) with b x b blocks kept at `density`, the last block-row and block-column empty."""
    rng = np.random.default_rng(seed)
    keep = rng.random((-(-K // b), -(-N // b))) < density
    keep[-1, :] = keep[:, -1] = False
    mask = np.kron(keep, np.ones((b, b), bool))[:K, :N]
    return (rng.standard_normal((K, N)) * mask).astype(np.float32)


def _matmul_model(W: np.ndarray, gemm: dict | None = None, C: np.ndarray | None = None, rank: int = 2):
    """y = x @ W (MatMul, leading sizes symbolic) or Gemm(x, W^T, C, transB=1, **gemm)."""
    K, N = W.shape
    lead = ["B", "M"][-(rank - 1):]
    if gemm is None:
        nodes, inits = [helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(W, "w")]
    else:
        nodes = [helper.make_node("Gemm", ["x", "w", "c"] if C is not None else ["x", "w"], ["y"], transB=1, **gemm)]
        inits = [numpy_helper.from_array(np.ascontiguousarray(W.T), "w")]
        inits += [numpy_helper.from_array(C, "c")] if C is not None else []
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@needs_headers
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("b", [1, 4, 8, 16, 32])
def test_sparse_linear_op_against_float64(b, threads, tmp_path):
    """MatMul and Gemm (alpha, beta, a per-column C fused into the op, a scalar C added after) through
    the op at every block size (vector-wide blocks: the packed kernel; others: the repacking rows
    kernel), ragged K and N, an empty block-row and block-column, 0 to 700 rows, 2-D and 3-D x."""
    K, N = 3 * b + 5, 2 * b + 3
    W = _weight(K, N, b, 0.6, b)
    rng = np.random.default_rng(1)
    for gemm, C in [(None, None), ({"alpha": 0.5}, rng.standard_normal(N).astype(np.float32)),
                    ({"alpha": 1.5, "beta": 2.0}, rng.standard_normal((1, N)).astype(np.float32)),
                    ({"alpha": 1.0, "beta": 3.0}, np.array(0.25, np.float32))]:
        model = sg.onnx.lower(_matmul_model(W, gemm, C), "ort-native", block=b, max_density=1.0,
                              output=tmp_path / "m.onnx")
        check_written(tmp_path / "m.onnx")
        (choice,) = sg.onnx.read_lowering(model).values()
        assert choice["target"] == "ort-native" and choice["block"] == b
        ops = [n.op_type for n in model.graph]
        assert "SparseLinear" in ops and "MatMul" not in ops and "Gemm" not in ops
        assert ("Add" in ops) == (C is not None and C.size != N)  # beta * C per column: the op's bias
        session = sg.onnx.Session(tmp_path / "m.onnx", threads=threads)
        for rows in [(0,), (1,), (3,), (64,), (700,)]:
            x = rng.standard_normal((*rows, K)).astype(np.float32)
            want = x.astype(np.float64) @ W.astype(np.float64)
            if gemm is not None:
                want = gemm["alpha"] * want + gemm.get("beta", 1.0) * C.astype(np.float64).reshape(-1)
            got = session(x)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max(initial=0)))
    model = sg.onnx.lower(_matmul_model(W, rank=3), "ort-native", block=b, max_density=1.0)
    x = rng.standard_normal((2, 33, K)).astype(np.float32)
    np.testing.assert_allclose(sg.onnx.Session(model, threads=threads)(x), x.astype(np.float64) @ W, rtol=1e-5,
                               atol=1e-4)


def test_bsr_of_is_the_kernels_layout():
    """values (nnzb, b, b) are W's blocks as they sit in W, zero-padded; crow over output block-rows
    (N), col sorted per row: rebuilt by hand, it is W again."""
    W = _weight(21, 13, 4, 0.5, 0)
    values, crow, col = bsr_of(W, 4)
    back = np.zeros((24, 16), np.float32)
    for r in range(4):
        for j in range(crow[r], crow[r + 1]):
            back[col[j] * 4:col[j] * 4 + 4, r * 4:r * 4 + 4] = values[j]
    np.testing.assert_array_equal(back[:21, :13], W)
    assert crow.dtype == col.dtype == np.int32 and crow[-1] == len(col) == len(values)
    assert all(np.all(np.diff(col[crow[r]:crow[r + 1]]) > 0) for r in range(4))


def _op_model(values, crow, col, bias=None, n=40, block=8, k=24):
    inputs = ["x", "v", "crow", "col"] + (["bias"] if bias is not None else [])
    arrays = {"v": values, "crow": crow, "col": col, **({"bias": bias} if bias is not None else {})}
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    node = helper.make_node("SparseLinear", inputs, ["y"], domain=native.DOMAIN, n=n, block=block)
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(native.DOMAIN, 1)])


@needs_headers
def test_sparse_linear_op_names_bad_inputs():
    """Inconsistent operands fail the run with one message naming the op and what is wrong, never a
    crash or a read out of bounds; a bad attribute fails the session."""
    values, crow, col = bsr_of(_weight(24, 40, 8, 0.5, 3), 8)
    x = np.ones((2, 24), np.float32)
    cases = {
        "values must be (nnzb, 8, 8)": _op_model(values[:, :4], crow, col),
        "crow must have 6 entries": _op_model(values, crow[:-1], col),
        "col has": _op_model(values, crow, col[:-1]),
        "crow must run from 0": _op_model(values, crow + 1, col),
        "col 3 out of range for 3 input blocks": _op_model(values, crow, col + 3),
        "bias must be (40,)": _op_model(values, crow, col, np.ones(39, np.float32)),
        "crow decreases": _op_model(values, np.array([0, 3, 1, 4, 5, len(col)], np.int32), col),
    }
    so = ort.SessionOptions()
    so.register_custom_ops_library(native.library())
    so.log_severity_level = 4
    for message, model in cases.items():
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        with pytest.raises(Exception, match=re.escape(f"sparsegraph.SparseLinear: {message}")):
            session.run(None, {"x": x})
    with pytest.raises(SparsegraphError, match="n=0 and block=8 must be positive"):
        sg.onnx.Session(_op_model(values, crow, col, n=0))
    ok = sg.onnx.Session(_op_model(values, crow, col))(x)  # the same operands, consistent: runs
    assert ok.shape == (2, 40)
    bias = np.arange(40, dtype=np.float32)  # no inputs at all (k = 0, no blocks): every row is the bias
    empty = _op_model(np.zeros((0, 8, 8), np.float32), np.zeros(6, np.int32), np.zeros(0, np.int32), bias, k=0)
    np.testing.assert_array_equal(sg.onnx.Session(empty)(np.ones((3, 0), np.float32)), np.tile(bias, (3, 1)))


def _conv_model(W: np.ndarray, bias: np.ndarray | None, stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1),
                **attrs):
    """y = Conv(x, W[, bias]) with x (N, C, H, W) of symbolic batch and image size."""
    n, C = W.shape[:2]
    inits = [numpy_helper.from_array(W, "w")] + ([numpy_helper.from_array(bias, "b")] if bias is not None else [])
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias is not None else []), ["y"], strides=list(stride),
                            pads=list(pads), dilations=list(dilation), **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, "H", "W"])
    graph = helper.make_graph([node], "conv", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_weight(n: int, C: int, kh: int, kw: int, b: int, seed: int) -> np.ndarray:
    """W (n, C, kh, kw), block-sparse as the (n, C kh kw) matrix, its last block-row and block-column empty."""
    return np.ascontiguousarray(_weight(C * kh * kw, n, b, 0.6, seed).T).reshape(n, C, kh, kw)


# (C, n, kernel, stride, pads, dilation): 3x3 padded (the direct kernel, stride 1 and 2), 1x1 (the cols
# kernel on x or on its strided positions), uneven kernel, stride, padding and dilation
CONVS = [(6, 20, (3, 3), (1, 1), (1, 1), (1, 1)), (6, 20, (3, 3), (2, 2), (1, 1), (1, 1)),
         (13, 20, (1, 1), (1, 1), (0, 0), (1, 1)), (13, 20, (1, 1), (2, 2), (0, 0), (1, 1)),
         (5, 11, (3, 2), (1, 2), (2, 0), (2, 1))]


@needs_headers
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("b", [1, 4, 8, 16])
def test_sparse_conv_op_against_float64(b, threads):
    """Conv through sparsegraph.SparseConv at every block size (with 8 and 16, the kernels keeping output
    channels along the vector), ragged channels, an empty block-row and block-column, with and without a
    bias, 0 to 3 images (at 2 threads: pieces by images and by W's block-rows), against float64."""
    rng = np.random.default_rng(b)
    for C, n, kernel, stride, pads, dilation in CONVS:
        W = _conv_weight(n * b // 4 + 3, C, *kernel, b, C)  # some channels past the last whole block
        for bias in (None, rng.standard_normal(W.shape[0]).astype(np.float32)):
            model = sg.onnx.lower(_conv_model(W, bias, stride, pads + pads, dilation), "ort-native", block=b,
                                  max_density=1.0)
            (choice,) = sg.onnx.read_lowering(model).values()
            assert choice["op"] == "SparseConv" and choice["block"] == b
            assert [node.op_type for node in model.graph] == ["SparseConv"]
            session = sg.onnx.Session(model, threads=threads)
            for N in (0, 1, 3):
                x = rng.standard_normal((N, C, 9, 7)).astype(np.float32)
                want = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(W).double(),
                                                  None if bias is None else torch.from_numpy(bias).double(),
                                                  stride, pads, dilation).numpy()
                got = session(x)
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max(initial=0)))


def test_conv_lowering_leaves_what_the_op_does_not_take():
    """Grouped convolutions, padding uneven before and after, SAME padding and dense weights stay Conv."""
    W = _conv_weight(16, 8, 3, 3, 8, 0)
    keep = {"groups": _conv_model(W[:, :4], None, group=2), "uneven pads": _conv_model(W, None, pads=(0, 0, 1, 1)),
            "same": _conv_model(W, None, pads=(0, 0, 0, 0)), "dense": _conv_model(np.ones_like(W), None)}
    keep["same"].graph.node[0].ClearField("attribute")
    keep["same"].graph.node[0].attribute.extend([helper.make_attribute("auto_pad", "SAME_UPPER")])
    for name, model in keep.items():
        lowered = sg.onnx.lower(model, "ort-native", block=8)
        assert [node.op_type for node in lowered.graph] == ["Conv"], name
    assert [node.op_type for node in sg.onnx.lower(_conv_model(W, None), "ort-native", block=8).graph] == ["SparseConv"]


@needs_headers
def test_sparse_conv_op_names_bad_inputs():
    """X of the wrong rank, an image smaller than the kernel's reach, a col past C kh kw: one message each,
    from the run; a bad attribute fails the session."""
    W = _conv_weight(16, 4, 3, 3, 8, 1)
    values, crow, col = conv_bsr_of(W, 8)

    def op_model(col=col, **attrs):
        attrs = {"n": 16, "block": 8, "kernel": [3, 3], "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1],
                 **attrs}
        inits = [numpy_helper.from_array(a, name) for name, a in (("v", values), ("crow", crow), ("col", col))]
        node = helper.make_node("SparseConv", ["x", "v", "crow", "col"], ["y"], domain=native.DOMAIN, **attrs)
        graph = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                       helper.make_opsetid(native.DOMAIN, 1)])

    so = ort.SessionOptions()
    so.register_custom_ops_library(native.library())
    so.log_severity_level = 4
    good = ort.InferenceSession(op_model().SerializeToString(), so, providers=["CPUExecutionProvider"])
    cases = {"X must be (N, C, H, W), got rank 3": (good, np.ones((4, 5, 5), np.float32)),
             "X's image (2 x 5) is smaller than the kernel's reach": (good, np.ones((1, 4, 2, 5), np.float32)),
             "col 5 out of range for 5 input blocks of X": (
                 ort.InferenceSession(op_model(col=col + 5 - col.max()).SerializeToString(), so,
                                      providers=["CPUExecutionProvider"]), np.ones((1, 4, 5, 5), np.float32))}
    for message, (session, x) in cases.items():
        with pytest.raises(Exception, match=re.escape(f"sparsegraph.SparseConv: {message}")):
            session.run(None, {"x": x})
    with pytest.raises(SparsegraphError, match=re.escape("stride must be two values of at least 1, got (1, 0)")):
        sg.onnx.Session(op_model(stride=[1, 0]))
    with pytest.raises(SparsegraphError, match=re.escape("kernel must be two values of at least 1, got (3, -1)")):
        sg.onnx.Session(op_model(kernel=[3]))
    y = good.run(None, {"x": np.ones((2, 4, 5, 5), np.float32)})[0]  # consistent: runs
    want = torch.nn.functional.conv2d(torch.ones(2, 4, 5, 5, dtype=torch.float64), torch.from_numpy(W).double())
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-5, atol=1e-4)


def test_missing_headers_are_named(monkeypatch, tmp_path):
    """Without the C API header, lowering still works (a graph rewrite) but running names the fix."""
    monkeypatch.setattr(native, "include_dir", lambda: None)
    spec = builtin("gpt-mini", n_layer=1)
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, mask="balanced_block:32")
    path = sg.export_onnx(wide, spec.example_inputs, tmp_path / "w.onnx", lower="ort-native")
    assert {c["target"] for c in sg.onnx.read_lowering(path).values()} == {"ort-native"}
    with pytest.raises(SparsegraphError, match="sparsegraph ort-headers"):
        sg.onnx.Session(path)


def _deb(members: dict[str, bytes], data: bytes | None = None) -> bytes:
    """A Debian package (an ar archive) whose data.tar.xz holds `members` (or is `data`)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data = lzma.compress(buf.getvalue()) if data is None else data
    out = b"!<arch>\n"
    for name, body in [("debian-binary", b"2.0\n"), ("data.tar.xz", data)]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body + b"\n" * (len(body) % 2)
    return out


def test_fetch_headers_unpacks_a_package_and_names_bad_ones(monkeypatch, tmp_path, capsys):
    """The headers come out of the package's data archive whole (nested folders too); a file that is
    not a package, a truncated file, a corrupt archive, a package without the header or a missing file is one error
    (from the CLI: exit 2), and the cache keeps no partial copy."""
    monkeypatch.setenv("SPARSEGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPARSEGRAPH_ORT_INCLUDE", raising=False)
    good = tmp_path / "good.deb"
    good.write_bytes(_deb({"./usr/include/onnxruntime/onnxruntime_c_api.h": b"/* api */\n",
                           "./usr/include/onnxruntime/core/providers/resource.h": b"/* r */\n",
                           "./usr/share/doc/copyright": b"MIT\n"}))
    folder = native.fetch_headers(str(good), log=lambda *_: None)
    assert open(os.path.join(folder, "onnxruntime_c_api.h")).read() == "/* api */\n"
    assert os.path.isfile(os.path.join(folder, "core", "providers", "resource.h"))
    assert not os.path.exists(os.path.join(folder, "copyright"))
    bad = {"not a Debian package": b"\x7fELF" + b"\0" * 100,
           "truncated": _deb({"./usr/include/onnxruntime/onnxruntime_c_api.h": b"x"})[:-40],
           "corrupt data archive": _deb({}, data=lzma.compress(b"not a tar archive")[:20]),
           "no usr/include/onnxruntime/onnxruntime_c_api.h": _deb({"./usr/share/doc/x": b"x"})}
    for message, body in bad.items():
        path = tmp_path / "bad.deb"
        path.write_bytes(body)
        with pytest.raises(SparsegraphError, match=message):
            native.fetch_headers(str(path), log=lambda *_: None)
        assert main(["ort-headers", "--deb", str(path)]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SparsegraphError, match="no such file"):
        native.fetch_headers(str(tmp_path / "missing.deb"))
    assert open(os.path.join(folder, "onnxruntime_c_api.h")).read() == "/* api */\n"  # the good copy stays
    assert [p for p in os.listdir(tmp_path / "cache") if p.startswith(".headers-")] == []


@needs_headers
def test_cli_lower_ort_native(tmp_path, capsys):
    """`sparsegraph lower --target ort-native` on an exported Sparse Wide gpt-mini: the table names the
    target, the file runs in ONNX Runtime and matches PyTorch; `sparsegraph ort-headers --build` names
    the headers and the library."""
    spec = builtin("gpt-mini", n_layer=1)
    wide = sg.sparsify(spec.model, spec.example_inputs, "sparse_wide", 0.75, mask="balanced_block:32").eval()
    dense = sg.export_onnx(wide, spec.example_inputs, tmp_path / "dense.onnx")
    out = tmp_path / "native.onnx"
    assert main(["lower", dense, "--target", "ort-native", "-o", str(out)]) == 0
    assert "ort-native" in capsys.readouterr().out
    assert main(["ort-headers", "--build"]) == 0  # headers there: named, and the library built (cached)
    printed = "".join(capsys.readouterr().out.split())  # (however the console wrapped the paths)
    assert "".join(native.include_dir().split()) in printed and os.path.basename(native.library()) in printed
    check_written(out)
    with torch.no_grad():
        expected = wide(*spec.example_inputs).numpy()
    assert rel_err(sg.onnx.Session(out)(spec.example_inputs[0].numpy()), expected) <= 1e-4


def test_session_threads_sleep_when_asked(tmp_path):
    """spinning=False (the benchmark's sessions taking turns) reaches ONNX Runtime's options."""
    path = sg.export_onnx(builtin("gpt-mini", n_layer=1).model.eval(), builtin("gpt-mini").example_inputs,
                          tmp_path / "d.onnx")
    options = sg.onnx.Session(path, threads=2, spinning=False).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(Exception, match="allow_spinning"):  # not set: ONNX Runtime's default (spin)
        sg.onnx.Session(path, threads=2).session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning")
