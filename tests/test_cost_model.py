"""The lowering cost model: calibration on first use, its per-machine cache, pinning, `sparsegraph calibrate`.

Calibrations here run on tiny layers with a tiny budget (the mechanics, not the numbers); no test
asserts on time.
"""
import json
import math
import os

import pytest
import torch

from sparsegraph.backends import cost_model as cm
from sparsegraph.backends import cpu
from sparsegraph.cli import main
from sparsegraph.passes.lower import decide


@pytest.fixture
def calibrations(monkeypatch, tmp_path):
    """A fresh cache folder, SPARSEGRAPH_COST_MODEL unset, tiny calibration layers at one thread (no
    waiting on a second thread when other processes hold the cores), and a count of the calibrations
    run (the list of models they returned)."""
    cpu.library()  # built (or found) in the usual cache before the cache folder moves
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("SPARSEGRAPH_CACHE", str(tmp_path))
    monkeypatch.delenv(cm.ENV, raising=False)
    monkeypatch.setattr(cm, "_loaded", {})
    monkeypatch.setattr(cm, "LINEAR_SHAPES", ((96, 64),))
    monkeypatch.setattr(cm, "CSR_SHAPE", (16, 48))
    monkeypatch.setattr(cm, "CONV_SHAPES", ((1, 16, 6),))
    monkeypatch.setattr(cm, "BUDGET_S", 0.1)
    monkeypatch.setattr(cm, "QUICK_BUDGET_S", 0.05)
    monkeypatch.setattr(cm, "CHECK_SHAPES", ((64, 64),))
    monkeypatch.setattr(cm, "CHECK_ROWS", (1, 64))
    runs = []
    calibrate = cm.calibrate

    def counted(*args, **kwargs):
        runs.append(calibrate(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(cm, "calibrate", counted)
    yield runs
    torch.set_num_threads(threads)


def _cache_files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("cost_model-") and f.endswith(".json"))


def _rates(m):
    sparse = (r for by_b in m.flops_sparse.values() for t in by_b.values() for r in t.values())
    cols = (r for by_b in m.flops_cols.values() for r in by_b.values())
    return [*m.flops_dense.values(), *sparse, m.flops_conv, *cols]


def test_first_load_calibrates_and_caches_per_cpu(calibrations, tmp_path, capsys):
    m = cm.load()
    assert len(calibrations) == 1 and cm.load() is m
    assert all(math.isfinite(r) and r > 0 for r in _rates(m)) and m.c_sparse > 0 and m.c_dense > 0
    assert set(m.flops_dense) == {str(M) for M in cm.ROWS}
    assert set(m.flops_sparse) == set(m.flops_cols) == {"10", "25"}  # measured at each of DENSITIES, in % stored
    assert all(set(by_b) == {str(b) for b in cm.BLOCKS} for t in (m.flops_sparse, m.flops_cols) for by_b in t.values())
    if torch.backends.mkldnn.is_available():  # oneDNN with pre-packed weights, measured beside F.linear
        assert set(m.flops_dense_packed) == set(m.flops_dense) and all(r > 0 for r in m.flops_dense_packed.values())
    t = [m.linear_sparse(M, 3072, 768, 230, 32) for M in range(1, 600)]
    assert all(a <= b * (1 + 1e-12) for a, b in zip(t, t[1:]))  # more rows never predicted faster
    assert cm.cpu_name() in m.source
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibrating the lowering cost model" in err[0] and "cached in" in err[0], err
    [name] = _cache_files(tmp_path)
    assert name.startswith(f"cost_model-t{torch.get_num_threads()}-")
    data = json.loads((tmp_path / name).read_text())
    assert data["key"] == cm.machine_key() and data["key"]["cpu"] == cm.cpu_name()
    assert cm.CostModel.from_dict(data["model"], name) == m
    cm._loaded.clear()  # a new process: the cache is read, nothing is measured
    assert cm.load() == m and len(calibrations) == 1 and capsys.readouterr().err == ""


@pytest.mark.parametrize("change", ["cpu_name", "kernel_key"])
def test_another_cpu_or_kernel_build_misses_the_cache(calibrations, tmp_path, monkeypatch, change):
    first = cm.load()
    monkeypatch.setattr(cm, change, lambda: "something else")
    cm._loaded.clear()
    second = cm.load()
    assert len(calibrations) == 2 and second is not first
    assert len(_cache_files(tmp_path)) == 2  # both kept: a shared cache folder serves several machines


@pytest.mark.parametrize("content, reason", [
    ("{not json", "unreadable"),
    ('{"model": {}}', "not a cache file"),
    ("FOREIGN", "another machine or build (cpu differ)"),
    ("NEGATIVE", "flops_conv must be a finite positive number"),
])
def test_corrupt_or_foreign_cache_warns_and_recalibrates(calibrations, content, reason):
    key = cm.machine_key()
    path = cm.cache_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if content == "FOREIGN":
        content = json.dumps({"key": {**key, "cpu": "Other CPU"}, "model": json.loads(cm.CostModel().to_json())})
    elif content == "NEGATIVE":
        content = json.dumps({"key": key, "model": {**json.loads(cm.CostModel().to_json()), "flops_conv": -1.0}})
    with open(path, "w") as f:
        f.write(content)
    with pytest.warns(RuntimeWarning, match="recalibrating") as w:
        m = cm.load()
    assert reason in str(w[0].message) and path in str(w[0].message)
    assert len(calibrations) == 1
    assert cm._read_cache(path, key) == m  # replaced by the new calibration


def test_environment_pins_the_model(calibrations, tmp_path, monkeypatch):
    monkeypatch.setenv(cm.ENV, "builtin")
    assert cm.load() == cm.CostModel()
    mine = cm.CostModel(c_sparse=1e-3, source="mine")
    mine.save(str(tmp_path / "mine.json"))
    monkeypatch.setenv(cm.ENV, str(tmp_path / "mine.json"))
    assert cm.load() == mine
    cache = cm.save_cache(mine)  # a cache file pins too (copied from another machine, say)
    monkeypatch.setenv(cm.ENV, cache)
    assert cm.load() == mine
    assert calibrations == []
    monkeypatch.setenv(cm.ENV, str(tmp_path / "missing.json"))
    with pytest.raises(cm.CostModelError, match="SPARSEGRAPH_COST_MODEL=.*missing.json.*no such file"):
        cm.load()


def test_csr_transposes_are_measured_and_charged(calibrations, monkeypatch):
    """CSR from 4 rows works on x^T and y^T: the calibration times it on a tall, narrow layer
    (`CSR_SHAPE`) and charges what its nonzeros do not explain per element of x and y. With that
    layer taking 1 ms at 512 rows and every other call 10 us, t_transpose is 1 ms less the fixed
    cost (the nonzeros at the measured rate are negligible) over 512 (n + k)."""
    def fake_medians(fns, rounds=10000, seconds=None, min_rounds=3, inner=1):
        return {name: 1e-3 if set(fns) == {"csr"} else 1e-5 for name in fns}

    monkeypatch.setattr(cm, "medians", fake_medians)
    m = cm.calibrate(save=False)
    n, k = cm.CSR_SHAPE
    assert m.t_transpose == pytest.approx((1e-3 - m.c_sparse) / (512 * (n + k)), rel=1e-3)
    plain = cm.CostModel(**{**m.__dict__, "t_transpose": 0.0})
    assert m.linear_sparse(64, 64, 576, 100, 1) == pytest.approx(
        plain.linear_sparse(64, 64, 576, 100, 1) + 64 * (64 + 576) * m.t_transpose)
    assert m.linear_sparse(2, 64, 576, 100, 1) == plain.linear_sparse(2, 64, 576, 100, 1)  # dot products
    assert m.linear_sparse(64, 64, 576, 100, 16) == plain.linear_sparse(64, 64, 576, 100, 16)  # rows kernel


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("c_sparse"), "missing c_sparse"),
    (lambda d: d.update(bw_copy=1.0), "unknown bw_copy"),
    (lambda d: d["flops_sparse"]["10"]["32"].update({"x": 1.0}),
     "flops_sparse[10][32]: key 'x' is not a positive integer"),
    (lambda d: d.update(flops_cols={"16": 1e11, "32": {"16": 1e11}}), "flops_cols[16] must be a non-empty object"),
    (lambda d: d.update(flops_sparse=d["flops_sparse"]["10"], flops_cols=d["flops_cols"]["10"]),  # an earlier format
     "no density level (a model written by an earlier sparsegraph"),
    (lambda d: d["flops_dense"].update({"8": "fast"}), "flops_dense[8] must be a finite positive number"),
    (lambda d: d.update(flops_dense_packed={"8": 0}), "flops_dense_packed[8] must be a finite positive number"),
    (lambda d: d.update(c_dense=float("nan")), "c_dense must be a finite non-negative number"),
])
def test_bad_model_file_names_the_entry(tmp_path, monkeypatch, edit, message):
    data = json.loads(cm.CostModel().to_json())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(cm, "_loaded", {})
    monkeypatch.setenv(cm.ENV, str(path))
    with pytest.raises(cm.CostModelError) as e:
        cm.load()
    assert str(path) in str(e.value) and message in str(e.value)


def test_convolutions_pay_their_own_fixed_cost(tmp_path):
    """sparse_linear calls pay `c_sparse` (its C++ kernel), sparse_conv2d calls `c_sparse_conv` (its
    Python body); a model file without the latter (written before the C++ kernel) charges `c_sparse`."""
    m = cm.CostModel(c_sparse=1e-6, c_sparse_conv=5e-5)
    free = cm.CostModel(c_sparse=0.0, c_sparse_conv=0.0)
    assert m.linear_sparse(8, 64, 64, 4, 16) == pytest.approx(1e-6 + free.linear_sparse(8, 64, 64, 4, 16))
    assert m.conv_sparse(2, 9, 64, 64, 4, 16) == pytest.approx(5e-5 + free.conv_sparse(2, 9, 64, 64, 4, 16))
    data = json.loads(m.to_json())
    del data["c_sparse_conv"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = cm.read(str(tmp_path / "old.json"))
    assert old.c_sparse_conv is None
    assert old.conv_sparse(2, 9, 64, 64, 4, 16) == pytest.approx(1e-6 + free.conv_sparse(2, 9, 64, 64, 4, 16))


def test_rates_interpolate_in_log_rows_log_block_and_log_density():
    m = cm.CostModel(flops_dense={"1": 1.0, "16": 5.0},
                     flops_sparse={"10": {"1": {"1": 1.0, "16": 3.0}, "16": {"1": 5.0, "16": 7.0}},
                                   "40": {"1": {"1": 4.0, "16": 12.0}, "16": {"1": 20.0, "16": 28.0}}},
                     flops_cols={"10": {"1": 1.0, "16": 9.0}, "40": {"1": 4.0, "16": 36.0}})
    assert m.rate_dense(4) == pytest.approx(5 ** 0.5)  # a power law: halfway in log M, halfway in log F
    assert m.rate_dense(1000) == 5.0 and m.rate_dense(1) == 1.0  # held beyond the measured rows
    assert m.rate_sparse(4, 4, 0.1) == pytest.approx((1 * 3 * 5 * 7) ** 0.25)  # halfway in both
    assert m.rate_sparse(16, 64, 0.1) == 7.0  # larger blocks than measured: the largest measured block's rate
    assert m.rate_sparse(4, 4, 0.2) == pytest.approx(2 * (1 * 3 * 5 * 7) ** 0.25)  # halfway in log d: x sqrt(4)
    assert m.rate_sparse(1, 1, 0.9) == 4.0 and m.rate_sparse(1, 1, 0.01) == 1.0  # held beyond the densities
    assert m.rate_cols(4, 0.2) == pytest.approx(2 * 3.0)  # halfway in log b (3 at 10%), then in log d
    # predictions take the density from the layer: 25% of a 64 x 64 weight in 16 x 16 blocks is 4 blocks
    c = m.c_sparse
    assert m.linear_sparse(16, 64, 64, 4, 16) == pytest.approx(c + 2 * 16 * 4 * 256 / m.rate_sparse(16, 16, 0.25))
    assert m.conv_sparse(2, 9, 64, 64, 4, 16) == pytest.approx(c + 2 * 2 * 9 * 4 * 256 / m.rate_cols(16, 0.25))
    capped = cm.CostModel(flops_dense={"1": 1.0, "8": 100.0})  # 8 rows predicted faster than 1: noise
    assert capped.rate_dense(8) == 8.0 and capped.linear_dense(8, 4, 4) >= capped.linear_dense(1, 4, 4)


def test_decisions_follow_the_model():
    bm = torch.zeros(24, 24, dtype=torch.bool)
    bm[:, :3] = True
    mask = bm.repeat_interleave(32, 0).repeat_interleave(32, 1)  # 768 x 768, 1/8 of the blocks stored
    args = ("w", "op", "linear", mask, (64, 1), "auto", torch.device("cpu"))
    base = cm.CostModel()
    slow = cm.CostModel(flops_sparse={d: {b: {M: r / 100 for M, r in t.items()} for b, t in by_b.items()}
                                      for d, by_b in base.flops_sparse.items()})
    fast = cm.CostModel(flops_dense={M: r / 100 for M, r in base.flops_dense.items()})
    assert decide(*args, model=slow).format == "dense"
    choice = decide(*args, model=fast)
    assert (choice.format, choice.block) == ("bsr", 32)
    assert choice.predicted_speedup == pytest.approx(fast.linear_dense(64, 768, 768) /
                                                     fast.linear_sparse(64, 768, 768, 72, 32), rel=1e-2)
    # the same sparse layer against oneDNN's pre-packed dense, 10^4 x MKL's rate here: dense is kept
    packed = cm.CostModel(flops_dense=fast.flops_dense,
                          flops_dense_packed={M: r * 100 for M, r in base.flops_dense.items()})
    assert decide(*args, model=packed).format == "bsr"
    kept = decide(*args, model=packed, dense="onednn")
    assert kept.format == "dense" and "oneDNN" in kept.reason
    assert decide(*args, model=fast, dense="onednn").format == "bsr"  # no oneDNN rates: judged against MKL's


def test_decisions_use_the_rate_at_the_layers_density():
    """A sparse kernel runs faster per FLOP the more of its weight is stored. A 3 x 3 convolution
    (64 outputs, 64 channels: 64 x 576) with a quarter of its 16 x 16 blocks stored does 1/4 of
    dense's work: at the 25% rate (dense's) it is predicted 4x faster and lowered; judged at the 10%
    rate, a tenth of that, it would be 2.5x slower and kept dense."""
    bm = torch.zeros(4, 36, dtype=torch.bool)
    bm[:, ::4] = True  # 9 of 36 blocks in every block-row
    mask = bm.repeat_interleave(16, 0).repeat_interleave(16, 1)
    args = ("w", "op", "conv", mask, (8, 256), "auto", torch.device("cpu"))
    rates = dict(c_dense=0.0, c_sparse=0.0, flops_conv=1e11)
    both = cm.CostModel(**rates, flops_cols={"10": {"16": 1e10}, "25": {"16": 1e11}})
    choice = decide(*args, model=both)
    assert (choice.format, choice.block) == ("bsr", 16) and choice.predicted_speedup == pytest.approx(4.0)
    only_10 = cm.CostModel(**rates, flops_cols={"10": {"16": 1e10}})
    assert decide(*args, model=only_10).format == "dense"


def test_cli_calibrate_caches_and_prints(calibrations, tmp_path, capsys):
    assert main(["calibrate", "--quick", "--threads", "2", "-o", str(tmp_path / "pinned.json")]) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == 1  # restored
    assert "2 thread(s)" in out and "fp32 FMA peak" in out and "dense GEMM at 512 rows" in out
    assert "linear rates" in out and "sparse b=32" in out
    [name] = _cache_files(tmp_path)
    assert name.startswith("cost_model-t2-") and f"cached in {tmp_path / name}" in out
    assert cm.read(str(tmp_path / "pinned.json")) == calibrations[0]


def test_cli_calibrate_check_json(calibrations, capsys):
    assert main(["calibrate", "--quick", "--check", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert cm.CostModel.from_dict(data["model"], "out") == calibrations[0] and os.path.isfile(data["cache"])
    rows = data["check"]
    assert len(rows) == len(cm.CHECK_SHAPES) * len(cm.CHECK_ROWS) * len(cm.CHECK_BLOCKS) * len(cm.CHECK_SPARSITIES)
    for r in rows:
        assert r["picked"] == (r["choice"] != "dense") and r["ok"] == (r["measured_x"] >= 1 or not r["picked"])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_cli_check_against_onednn(calibrations, capsys):
    assert main(["calibrate", "--quick", "--check", "--onednn"]) == 0
    out = capsys.readouterr().out
    assert "dense (oneDNN, pre-packed)" in out and "check: dense oneDNN (pre-packed) vs the op" in out
    assert main(["calibrate", "--onednn"]) == 2
    assert "--onednn chooses the dense baseline of --check" in capsys.readouterr().err


def test_cli_check_only_uses_the_pinned_model(calibrations, monkeypatch, capsys):
    monkeypatch.setenv(cm.ENV, "builtin")
    assert main(["calibrate", "--check-only", "--quick"]) == 0
    out = capsys.readouterr().out
    assert calibrations == [] and cm.CostModel().source in out and "the model picks sparse in" in out


def test_module_entry_routes_to_the_command(calibrations, capsys):
    assert cm.main(["--calibrate", "--quick", "--json"]) == 0
    assert len(calibrations) == 1 and json.loads(capsys.readouterr().out)["model"]["source"].startswith("calibrated")


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--check", "--check-only"], "not both"),
    (["--check-only", "-o", "m.json"], "--check-only does not calibrate"),
])
def test_cli_calibrate_bad_options(calibrations, capsys, args, message):
    assert main(["calibrate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsegraph calibrate: error: ") and message in err[0], err
    assert calibrations == []


def test_cli_calibrate_unparsable_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--threads", "two"])
    assert e.value.code == 2 and "invalid int value: 'two'" in capsys.readouterr().err


def test_medians_shuffle_the_order_so_no_candidate_always_follows_the_same_one():
    calls = []
    cm.medians({k: (lambda k=k: calls.append(k)) for k in "abcd"}, rounds=24)
    warmup, rounds = calls[:4], [calls[4 + 4 * i: 8 + 4 * i] for i in range(24)]
    assert warmup == list("abcd")
    assert all(sorted(r) == list("abcd") for r in rounds)  # every candidate once per round
    assert len({"".join(r) for r in rounds}) > 6  # not a rotation (which has 4 orders)
    before = {k: [calls[i - 1] for i in range(4, len(calls)) if calls[i] == k] for k in "abcd"}
    for k, prev in before.items():
        assert k not in prev  # never straight after itself (its caches still warm)
        assert max(prev.count(p) for p in set(prev)) <= 12, (k, prev)  # no neighbour in half the rounds or more
        assert set(prev) == set("abcd") - {k}
    calls.clear()
    cm.medians({k: (lambda k=k: calls.append(k)) for k in "abcd"}, rounds=24)
    assert [calls[4 + 4 * i: 8 + 4 * i] for i in range(24)] == rounds  # seeded: runs repeat


def test_medians_take_the_middle_round_and_stop_once_the_time_is_spent(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(cm.time, "perf_counter", lambda: clock["t"])
    warm = {"a": 1, "b": 1}  # the warm-up call of each is not timed
    durations = {"a": [5, 1, 9, 3, 7], "b": [2, 2, 2, 2, 8]}

    def fn(k):
        def call():
            if warm[k]:
                warm[k] -= 1
            else:
                clock["t"] += durations[k].pop(0)
        return call

    assert cm.medians({k: fn(k) for k in durations}, rounds=5) == {"a": 5, "b": 2}
    calls = []
    seconds = cm.medians({"a": lambda: calls.append(clock.__setitem__("t", clock["t"] + 1))}, seconds=4.5)
    assert seconds == {"a": 1} and len(calls) == 1 + 5  # warm-up, then rounds until 4.5 s had passed
    calls.clear()
    cm.medians({"a": lambda: calls.append(clock.__setitem__("t", clock["t"] + 10))}, seconds=1, min_rounds=3)
    assert len(calls) == 1 + 3  # at least min_rounds rounds, however long they take
