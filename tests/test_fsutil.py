"""Atomic writes: whole files or nothing, one clear error when a file cannot be written, and the
temporary files of killed writers cleaned up."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import sparsegraph.io
from sparsegraph.fsutil import TMP_PREFIX, OutputError, atomic_write, check_writable, remove_stale_temps


def _write_text(text: str):
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return write


def _temps(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.startswith(TMP_PREFIX))


def test_io_keeps_atomic_write_importable():
    assert sparsegraph.io.atomic_write is atomic_write


def test_writes_whole_file_with_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # missing folders are created
    atomic_write(target, _write_text("hello"))
    assert target.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _temps(target.parent) == []


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("previous")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise ValueError("the writer's own bug")

    with pytest.raises(ValueError, match="the writer's own bug"):  # not a write failure: passed through as it is
        atomic_write(target, half_then_fail)
    assert target.read_text() == "previous"
    assert _temps(tmp_path) == []


def test_a_directory_as_target(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match=r"cannot write .*d: it is a directory"):
        atomic_write(tmp_path / "d", _write_text("x"))
    with pytest.raises(OutputError, match="it is a directory"):
        check_writable(tmp_path / "d")
    assert os.listdir(tmp_path / "d") == [] and _temps(tmp_path) == []


def test_a_place_no_file_can_be_created():
    with pytest.raises(OutputError, match=r"cannot write /proc/x.sgm: cannot create a file in /proc"):
        atomic_write("/proc/x.sgm", _write_text("x"))
    with pytest.raises(OutputError, match=r"cannot write /proc/x.sgm: cannot create a file in /proc"):
        check_writable("/proc/x.sgm")


def test_check_writable_creates_nothing(tmp_path):
    check_writable(tmp_path / "a" / "b" / "out.sgm")
    check_writable(tmp_path / "run", directory=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot use .*file as a run directory: it is a file"):
        check_writable(tmp_path / "file", directory=True)
    with pytest.raises(OutputError, match="file is not a directory"):
        check_writable(tmp_path / "file" / "out.sgm")


def test_an_errno_quoted_by_a_non_python_writer_is_named(tmp_path):
    """Rust and C++ writers (safetensors, torch.save) raise their own exception types; the errno they
    quote becomes the reason."""
    def rust_style(tmp: str) -> None:
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(OutputError, match=r"cannot write .*out.bin: No space left on device$"):
        atomic_write(tmp_path / "out.bin", rust_style)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["torch.save", "open"])
def test_a_file_size_limit_is_a_clean_error(tmp_path, writer):
    """`ulimit -f` (RLIMIT_FSIZE) in a child process: torch.save fails with a RuntimeError that names
    no errno, plain writes with EFBIG. Either way: OutputError naming the limit, the old file kept."""
    target = tmp_path / "big.bin"
    target.write_bytes(b"previous")
    script = textwrap.dedent(f"""
        import resource, sys, torch
        from sparsegraph.fsutil import atomic_write
        from sparsegraph.graph import SparsegraphError
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        def write(tmp):
            if {writer!r} == "open":
                with open(tmp, "wb") as f:
                    f.write(bytes(100000))
            else:
                torch.save(torch.zeros(100000), tmp)
        try:
            atomic_write(sys.argv[1], write)
        except SparsegraphError as e:
            print(e)
            sys.exit(2)
    """)
    r = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stdout.strip().startswith(f"cannot write {target}: File too large")
    assert target.read_bytes() == b"previous" and _temps(tmp_path) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f"{TMP_PREFIX}{_dead_pid()}@{host}-abc123.tmp"
    live = tmp_path / f"{TMP_PREFIX}{os.getpid()}@{host}-def456.tmp"
    old_style_old = tmp_path / f"{TMP_PREFIX}k2swa2sk.tmp"  # the earlier naming, no owner: by age
    old_style_new = tmp_path / f"{TMP_PREFIX}q8x1m0ab.tmp"
    other_host_new = tmp_path / f"{TMP_PREFIX}1@elsewhere-ghi789.tmp"
    unrelated = tmp_path / "notes.tmp"
    for p in (dead, live, old_style_old, old_style_new, other_host_new, unrelated):
        p.write_text("partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old_style_old, (two_days_ago, two_days_ago))
    assert sorted(remove_stale_temps(tmp_path)) == sorted([str(dead), str(old_style_old)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, old_style_new, other_host_new, unrelated))


def test_a_writer_killed_mid_save_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"good")
    script = textwrap.dedent("""
        import sys, time
        from sparsegraph.fsutil import atomic_write
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"half a model")
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
        atomic_write(sys.argv[1], write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_temps(tmp_path)) == 1 and target.read_bytes() == b"good"  # the kill left its temporary
    atomic_write(target, lambda tmp: open(tmp, "wb").close())
    assert _temps(tmp_path) == [] and target.read_bytes() == b""

