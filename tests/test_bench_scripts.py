"""The benchmark scripts run as `python bench/<name>.py`, which puts bench/ first on sys.path: a script
named like a module that some library imports hides that module (bench/kernels.py once hid the
`kernels` package that transformers imports, and every benchmark of a Hugging Face model failed)."""
import importlib.util
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_no_bench_script_shadows_an_installed_or_standard_module():
    names = [f[:-3] for f in os.listdir(BENCH) if f.endswith(".py")]
    assert "end_to_end" in names
    for name in names:
        assert name not in sys.stdlib_module_names, name
        spec = importlib.util.find_spec(name)
        assert spec is None or os.path.dirname(spec.origin or "") == BENCH, (name, spec.origin)
