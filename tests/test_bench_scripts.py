"""The benchmark scripts run as `python bench/<name>.py`, which puts bench/ first on sys.path: a script
named like a module that some library imports hides that module (bench/kernels.py once hid the
`kernels` package that transformers imports, and every benchmark of a Hugging Face model failed)."""
import importlib.util
import mmap
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


def test_page_faults_counts_the_pages_a_call_touches_anew():
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(BENCH, "common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)

    def touch():  # 16 MiB of fresh anonymous memory, one write per 4 KiB page
        buf = mmap.mmap(-1, 16 << 20)
        for i in range(0, 16 << 20, 4096):
            buf[i] = 1
        buf.close()

    assert common.page_faults(touch) >= 4096
    assert common.page_faults(lambda: None) < 64
