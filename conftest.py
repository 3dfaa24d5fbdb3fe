"""Shared by the test suite and the package's doctests (`pytest -n 2 --doctest-modules sparsegraph`).

Doctests run in a fresh temporary directory, so the files their examples write (`wide.onnx`,
`notes.txt`, ...) land there and nowhere else, with the same seed every time.

Lowering decisions come from the shipped cost model constants (SPARSEGRAPH_COST_MODEL=builtin), for
this process and the command-line runs it starts: the suite never calibrates implicitly, and its
choices are the same on every machine. Tests of the calibration unset it themselves.
"""
import os

import pytest
import torch

os.environ["SPARSEGRAPH_COST_MODEL"] = "builtin"


@pytest.fixture(autouse=True)
def _doctests_in_a_temporary_directory(request):
    if isinstance(request.node, pytest.DoctestItem):
        request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
        torch.manual_seed(0)
    yield
