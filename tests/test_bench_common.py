"""bench/common.py's timing: interleaved rounds in rotating order, medians per candidate."""
from __future__ import annotations

import importlib.util
import os

import pytest

COMMON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "common.py")


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_medians_rotate_the_order_so_no_candidate_always_follows_the_same_one(common):
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    common.medians(fns, rounds=6)
    warmup, rounds = calls[:3], [calls[3 + 3 * i: 6 + 3 * i] for i in range(6)]
    assert warmup == list("abc")
    assert rounds == [list("abc"), list("bca"), list("cab")] * 2
    before = {k: {calls[i - 1] for i in range(4, len(calls)) if calls[i] == k} for k in "abc"}
    assert all(len(v) == 2 for v in before.values()), before  # each follows both others in turn


def test_medians_are_the_middle_round_of_each_candidate(common, monkeypatch):
    ticks = iter(range(10_000))
    durations = {"a": [5, 1, 9, 3, 7], "b": [2, 2, 2, 2, 8]}
    clock = {"t": 0.0}

    def perf_counter():
        return clock["t"]

    def fn(k):
        def call():
            if next(ticks) >= 2:  # past the warm-up calls
                clock["t"] += durations[k].pop(0)
        return call

    monkeypatch.setattr(common.time, "perf_counter", perf_counter)
    out = common.medians({k: fn(k) for k in durations}, rounds=5)
    assert out == {"a": 5, "b": 2}
