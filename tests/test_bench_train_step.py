"""bench/train_step.py: what it counts and how it reports. Nothing here asserts on time."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

import sparsegraph as sg
from sparsegraph.backends import cost_model as cm

from .test_lower import _sparse_wins

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "train_step.py")


@pytest.fixture(scope="module")
def ts():
    spec = importlib.util.spec_from_file_location("train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_step"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module



def test_state_bytes_count_what_each_storage_keeps(ts, monkeypatch):
    monkeypatch.setattr(cm, "load", _sparse_wins)  # every sparse weight lowered
    options, batch = ts.TINY["gpt-mini"]
    w = ts.workload("gpt-mini", options, batch)
    models = ts.build_variants(w, 0.75, verify=False)
    assert list(models) == ["dense", "masked-dense", "compact", "compact+ckpt"]
    x, y = w.inputs()
    counts, grads = {}, {}
    for variant, model in models.items():
        opt = ts.optimizer(model)
        loss = ts.F.cross_entropy(ts.logits(model(x)).flatten(0, 1), y.flatten())
        loss.backward()  # the step's first half, to compare gradients
        grads[variant] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        assert math.isfinite(ts.train_step(model, opt, x, y))
        counts[variant] = ts.state_bytes(model, opt)
        n_params = sum(p.numel() for p in model.parameters())
        # AdamW: exp_avg and exp_avg_sq of every parameter's shape, and a float32 step scalar per parameter
        assert counts[variant]["optimizer"] == 2 * 4 * n_params + 4 * len(list(model.parameters())), variant
        assert counts[variant]["grads"] == counts[variant]["params"] == 4 * n_params
        assert counts[variant]["total"] == sum(v for k, v in counts[variant].items() if k != "total")
    assert counts["dense"]["buffers"] == 0
    plan = sg.plan_of(models["masked-dense"])
    dense_sparse = 4 * sum(math.prod(wp.shape) for wp in plan.sparse_weights)  # the masked weights, float32
    assert counts["masked-dense"]["buffers"] == dense_sparse  # one float mask per sparse weight
    low = models["compact"]
    stored = index = 0
    for wp in plan.sparse_weights:
        col = low.get_buffer(wp.name + "_col")
        b = low.get_parameter(wp.name + "_values").shape[-1]
        stored += 4 * col.numel() * b * b
        index += 4 * (low.get_buffer(wp.name + "_crow").numel() + low.get_buffer(wp.name + "_crow_t").numel()
                      + 3 * col.numel())  # int32 crow, crow_t, and col, col_t, perm_t of nnzb entries
    assert counts["compact"]["params"] == counts["masked-dense"]["params"] - dense_sparse + stored
    assert counts["compact"]["buffers"] == index
    assert stored < dense_sparse / 3  # s = 0.75 at least: a quarter of the entries or fewer
    assert counts["compact+ckpt"] == counts["compact"]
    # checkpointing recomputes the blocks in backward: the same gradients as the compact model's
    assert grads["compact+ckpt"].keys() == grads["compact"].keys()
    for name, g in grads["compact"].items():
        assert torch.allclose(grads["compact+ckpt"][name], g, rtol=1e-4, atol=1e-6), name


def test_ratios_compare_with_the_dense_row_of_the_same_model_and_sparsity(ts):
    rows = [{"model": "m", "sparsity": 0.9, "variant": "dense", "ms": 10.0, "peak_mb": 100.0, "state_mb": 40.0},
            {"model": "m", "sparsity": 0.9, "variant": "compact", "ms": 13.0, "peak_mb": 150.0, "state_mb": 50.0},
            {"model": "m", "sparsity": 0.75, "variant": "dense", "ms": 20.0, "peak_mb": None, "state_mb": 40.0},
            {"model": "m", "sparsity": 0.75, "variant": "masked-dense", "ms": 50.0, "peak_mb": 400.0,
             "state_mb": 160.0}]
    out = ts.ratios(rows)
    assert [(r["time_ratio"], r["peak_ratio"], r["state_ratio"]) for r in out] == [
        (1.0, 1.0, 1.0), (1.3, 1.5, 1.25), (1.0, None, 1.0), (2.5, None, 4.0)]  # no peak measured: no ratio
    with pytest.raises(ValueError, match=r"m s=0.5: expected one dense row to compare with, found 0"):
        ts.ratios(rows + [{"model": "m", "sparsity": 0.5, "variant": "compact", "ms": 1.0}])


def test_a_failed_memory_run_says_why(ts):
    job = {"model": "gpt-mini", "variant": "compact"}
    assert ts.parse_result("noise\nRESULT {\"a\": 1}\n", "", 0, job) == {"a": 1}
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit 1\): .*MemoryError: out of memory"):
        ts.parse_result("", "Traceback ...\nMemoryError: out of memory\n", 1, job)
    with pytest.raises(RuntimeError, match=r"failed \(exit 0\): no RESULT line"):
        ts.parse_result("hello", "", 0, job)


def test_a_memory_run_that_lowered_otherwise_is_refused(ts):
    job = {"model": "hf-gpt2", "variant": "compact+ckpt", "sparsity": 0.75}
    ts.check_same_lowering(job, {"bsr": 8}, {"bsr": 8})
    with pytest.raises(RuntimeError, match=r"hf-gpt2 s=0.75 compact\+ckpt: the memory run lowered to \{'dense': 8\}"):
        ts.check_same_lowering(job, {"bsr": 8}, {"dense": 8})


@pytest.mark.slow  # about 8 s: a fresh Python process that builds and trains
def test_a_memory_run_sees_at_least_the_state_it_counts(ts):
    """In a fresh process, the peak resident growth over the pre-build baseline must hold the parameters,
    gradients and AdamW state that exist together at the optimizer step."""
    job = {"model": "gpt-mini", "variant": "dense", "sparsity": 0.0, "steps": 2, "threads": 1,
           "options": {"n_layer": 2, "n_embd": 256, "n_head": 4}, "batch": [2, 32]}
    r = ts.measure_memory(job, timeout=600)
    state = r["state"]
    assert state["params"] > 6 * 2 ** 20 and state["buffers"] == 0
    assert r["resident_after_build"] >= 0.9 * state["params"]
    if r["note"] is None:
        assert r["step_peak"] >= 0.9 * (state["params"] + state["grads"] + state["optimizer"])
    else:  # a kernel without /proc/self/clear_refs: no peak is claimed
        assert r["step_peak"] is None and "clear_refs" in r["note"]
    assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"])


def test_step_flops_count_forward_and_backward_on_a_copy(ts):
    """The dense row's GFLOP/s divides one step's FLOPs: every product of a GPT runs once forward and
    twice backward (dX and dW, of the same size), so a step counts 3x the forward; the model's own
    weights are left as they were (the step runs on a copy)."""
    from sparsegraph.checks import count_flops

    options, batch = ts.TINY["gpt-mini"]
    w = ts.workload("gpt-mini", options, batch)
    dense = w.build().train()
    x, y = w.inputs()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    assert ts.step_flops(dense, x, y) == 3 * count_flops(dense, (x,)) > 0
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
