"""sparsegraph ort-headers: get ONNX Runtime's C API headers, which the ort-native op is built against.

    sparsegraph ort-headers                    download Debian's libonnxruntime-dev (pinned version and
                                               SHA-256) and unpack its headers into the cache
    sparsegraph ort-headers --deb FILE.deb     unpack them from a copy of the package (offline machines)
    sparsegraph ort-headers --build            then build the custom-op library (a few seconds, cached)

The onnxruntime wheels ship no headers. `SPARSEGRAPH_ORT_INCLUDE` or a system install
(`/usr/include/onnxruntime`) take precedence over the unpacked copy.
"""
from __future__ import annotations

import argparse

from ..cli import console

HELP = "get ONNX Runtime's C API headers (Debian's libonnxruntime-dev) for the ort-native custom op"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deb", default=None, help="a local copy of the libonnxruntime-dev .deb (or a URL) to unpack")
    p.add_argument("--build", action="store_true", help="then build the custom-op library")


def run(args: argparse.Namespace) -> int:
    from ..onnx import native

    con = console()
    found = native.include_dir()
    if found and args.deb is None:
        con.print(f"ONNX Runtime C API headers: {found}")
    else:
        native.fetch_headers(args.deb, log=con.print)
    if args.build:
        con.print(f"custom-op library: {native.library()}")
    return 0
