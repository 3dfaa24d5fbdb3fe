"""The ONNX Runtime custom ops `sparsegraph.SparseLinear` and `sparsegraph.SparseConv`: the native block-sparse
CPU kernels in ONNX Runtime.

`sg.onnx.lower(path, "ort-native")` turns block-sparse MatMul/Gemm weights into SparseLinear
(`lowering.NativeSparseMatMulPass`) and block-sparse 2-D Conv weights into SparseConv
(`lowering.NativeSparseConvPass`); `sg.onnx.Session` registers the library for such files, and a
plain `onnxruntime.InferenceSession` takes it as

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(sg.onnx.native.library())

The library is `ort_op.c` appended to the kernels' C source (`backends/cpu_source.py`), compiled
once per machine with `gcc -O3 -march=native -fopenmp` against ONNX Runtime's C API header
(`onnxruntime_c_api.h`) and cached beside the kernels. The pip `onnxruntime` wheels ship no headers;
Debian's `libonnxruntime-dev` does. `fetch_headers()` (`sparsegraph ort-headers`) downloads that
package from the Debian archive (pinned version and SHA-256), or reads a copy given as a file, and
unpacks its headers into the cache; `SPARSEGRAPH_ORT_INCLUDE` or a system install
(`/usr/include/onnxruntime`) are used first. The API is requested at the header's version
(ONNX Runtime 1.21), which every later ONNX Runtime serves.

A product is cut into `set_threads(n)` pieces (rows of x or images, or block-rows of W, whichever
operand is larger is then read once) run on ONNX Runtime's own intra-op thread pool, each a one-thread call of
the kernels, so no OpenMP team competes with ONNX Runtime's threads; the count is per process
(default: OpenMP's thread count, `OMP_NUM_THREADS` or the cores), and `sg.onnx.Session(threads=n)`
sets it to the session's own.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import urllib.request

from ..graph import SparsegraphError

DOMAIN, OP, CONV_OP = "sparsegraph", "SparseLinear", "SparseConv"
SOURCE = os.path.join(os.path.dirname(__file__), "ort_op.c")
DEB_VERSION = "1.21.0+dfsg-1"  # Debian 13's libonnxruntime-dev: C API version 21
DEB_URL = f"http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_{DEB_VERSION}_amd64.deb"
DEB_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
HEADER = "onnxruntime_c_api.h"
_lib: ctypes.CDLL | None = None


def _cache_headers() -> str:
    from ..backends.cpu import cache_dir

    return os.path.join(cache_dir(), f"onnxruntime-headers-{DEB_VERSION}")


def include_dir() -> str | None:
    """The folder holding `onnxruntime_c_api.h`: `$SPARSEGRAPH_ORT_INCLUDE`, a system install, or the
    copy `fetch_headers` unpacked; None if there is none."""
    for d in (os.environ.get("SPARSEGRAPH_ORT_INCLUDE"), "/usr/include/onnxruntime", _cache_headers()):
        if d and os.path.isfile(os.path.join(d, HEADER)):
            return d
    return None


def _deb_members(data: bytes, label: str) -> dict[str, bytes]:
    """The files of a .deb's data archive (an `ar` archive holding data.tar.{xz,gz,zst})."""
    if not data.startswith(b"!<arch>\n"):
        raise SparsegraphError(f"{label}: not a Debian package (no ar header)")
    pos, tar_bytes, kind = 8, None, None
    while pos + 60 <= len(data):
        name, size = data[pos:pos + 16].decode("ascii", "replace").strip().rstrip("/"), data[pos + 48:pos + 58]
        try:
            size = int(size.decode("ascii").strip())
        except ValueError:
            raise SparsegraphError(f"{label}: corrupt ar member header at byte {pos}") from None
        if pos + 60 + size > len(data):
            raise SparsegraphError(f"{label}: truncated (member {name} runs past the end of the file)")
        if name.startswith("data.tar"):
            tar_bytes, kind = data[pos + 60:pos + 60 + size], name[len("data.tar"):]
            break
        pos += 60 + size + size % 2
    if tar_bytes is None:
        raise SparsegraphError(f"{label}: no data.tar member")
    mode = {".xz": "r:xz", ".gz": "r:gz", "": "r:"}.get(kind)
    if mode is None:
        raise SparsegraphError(f"{label}: unsupported data archive data.tar{kind}")
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode=mode) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, EOFError, OSError) as e:
        raise SparsegraphError(f"{label}: corrupt data archive ({e})") from None


def fetch_headers(source: str | None = None, *, log=print) -> str:
    """Unpack ONNX Runtime's C API headers from Debian's `libonnxruntime-dev` into the cache and return
    the folder. `source`: a local .deb file or a URL (default: the pinned package in the Debian archive,
    checked against its SHA-256). A folder already unpacked is returned as it is."""
    target = _cache_headers()
    if source is None and os.path.isfile(os.path.join(target, HEADER)):
        return target
    url = source or DEB_URL
    if os.path.isfile(url):
        with open(url, "rb") as f:
            data = f.read()
    else:
        if "://" not in url:
            raise SparsegraphError(f"{url}: no such file")
        log(f"sparsegraph: downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=120) as r:
                data = r.read()
        except OSError as e:
            raise SparsegraphError(f"cannot download {url}: {e}") from None
    if source is None and hashlib.sha256(data).hexdigest() != DEB_SHA256:
        raise SparsegraphError(f"{url}: SHA-256 {hashlib.sha256(data).hexdigest()} is not the pinned {DEB_SHA256}")
    prefix = "./usr/include/onnxruntime/"
    headers = {name[len(prefix):]: body for name, body in _deb_members(data, url).items() if name.startswith(prefix)}
    if HEADER not in headers:
        raise SparsegraphError(f"{url}: no usr/include/onnxruntime/{HEADER} in the package")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".headers-")
    try:
        for rel, body in headers.items():
            path = os.path.join(tmp, *[p for p in rel.split("/") if p not in ("", ".", "..")])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(body)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # whole, or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"sparsegraph: ONNX Runtime C API headers ({len(headers)} files) in {target}")
    return target


def library() -> str:
    """The custom-op library's path, built on first call (a few seconds; cached per machine)."""
    global _lib
    from ..backends.cpu import _compiler, build_kernels

    include = include_dir()
    if include is None:
        raise SparsegraphError("the ort-native op needs ONNX Runtime's C API header (onnxruntime_c_api.h), which the "
                               "onnxruntime wheels do not ship: run `sparsegraph ort-headers` (Debian's "
                               "libonnxruntime-dev, unpacked into the cache) or set SPARSEGRAPH_ORT_INCLUDE")
    cc = _compiler()
    if cc is None:
        raise SparsegraphError(f"the ort-native op needs a C compiler ({os.environ.get('CC', 'gcc')} is not on PATH)")
    with open(SOURCE) as f:
        glue = f.read()
    with open(os.path.join(include, HEADER), "rb") as f:
        header_hash = hashlib.sha256(f.read()).hexdigest()
    try:
        path = build_kernels(cc, extra=glue, flags=(f"-I{include}",), prefix="libsparsegraph_ort-", name="ort_op.c",
                             key=header_hash, note="building the ONNX Runtime custom op (once)")
    except RuntimeError as e:
        raise SparsegraphError(f"cannot build the ort-native op: {e}") from None
    if _lib is None or _lib._name != path:  # (another cache folder: another library)
        _lib = ctypes.CDLL(path)  # the same handle ONNX Runtime's dlopen gets: one thread setting
        _lib.sg_ort_set_threads.argtypes = [ctypes.c_int]
    return path


def set_threads(n: int | None) -> None:
    """Pieces of each SparseLinear product for ONNX Runtime's threads, in this process (None or 0:
    OpenMP's thread count); use the sessions' intra-op thread count."""
    library()
    _lib.sg_ort_set_threads(int(n or 0))


__all__ = ["DOMAIN", "OP", "CONV_OP", "include_dir", "fetch_headers", "library", "set_threads"]
