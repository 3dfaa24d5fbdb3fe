"""Files written whole or not at all, and one clear error when they cannot be written.

`atomic_write(path, write)` calls `write(tmp)` on a temporary file beside `path` and renames the
finished file into place, so a failure (a full disk, a kill, an exception in `write`) never leaves
a half-written file at `path` and never touches the file that was there before. A failure to write
is an `OutputError` naming the file and the reason ("No space left on device", "File too large",
"it is a directory", ...), whatever library `write` used underneath.

Temporary files are named `.sparsegraph-<pid>@<host>-<random>.tmp`. A process killed in the middle
of a write leaves its temporary file behind; the next `atomic_write` into the same directory
removes the ones whose process is gone (`remove_stale_temps`).

>>> import os
>>> atomic_write("notes.txt", lambda tmp: open(tmp, "w").write("hello"))
>>> open("notes.txt").read()
'hello'
>>> [f for f in os.listdir(".") if f.endswith(".tmp")]
[]
"""
from __future__ import annotations

import errno
import os
import re
import resource
import socket
import tempfile
import time
from typing import Callable

from .graph import SparsegraphError

__all__ = ["OutputError", "atomic_write", "check_writable", "remove_stale_temps", "TMP_PREFIX", "TMP_SUFFIX"]

TMP_PREFIX = ".sparsegraph-"
TMP_SUFFIX = ".tmp"
FOREIGN_TEMP_AGE = 24 * 3600  # seconds: temporary files of other hosts (shared file systems) are kept this long


class OutputError(SparsegraphError, OSError):
    """A file could not be written: one line naming the file and why; nothing was written."""


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ---------------------------------------------------------------------------------------------
# checking a target before the work
# ---------------------------------------------------------------------------------------------
def _existing_ancestor(folder: str) -> str:
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder or "."


def check_writable(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Raise `OutputError` unless a file (or, with `directory`, a run directory) can be created at
    `path`: what an `-o` option is checked with before any work is done. Creates nothing."""
    path = os.fspath(path)
    if not path:
        raise OutputError("cannot write '': the output path is empty")
    if directory:
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputError(f"cannot use {path} as a run directory: it is a file")
        folder = os.path.abspath(path)
    else:
        if os.path.isdir(path):
            raise OutputError(f"cannot write {path}: it is a directory")
        folder = os.path.dirname(os.path.abspath(path))
    ancestor = _existing_ancestor(folder)
    if not os.path.isdir(ancestor):
        raise OutputError(f"cannot write {path}: {ancestor} is not a directory")
    try:  # a real probe: permissions, read-only file systems, /proc and friends
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=_tmp_prefix(), suffix=TMP_SUFFIX)
    except OSError as e:
        raise OutputError(f"cannot write {path}: cannot create a file in {ancestor}: {_reason(e)}") from None
    os.close(fd)
    os.unlink(probe)


# ---------------------------------------------------------------------------------------------
# stale temporary files
# ---------------------------------------------------------------------------------------------
def _tmp_prefix() -> str:
    return f"{TMP_PREFIX}{os.getpid()}@{socket.gethostname()}-"


def _owner(name: str) -> tuple[int, str] | None:
    """(pid, host) from a temporary file's name, None for names without them."""
    core = name[len(TMP_PREFIX):-len(TMP_SUFFIX)]
    owner = core.rsplit("-", 1)[0]
    pid, sep, host = owner.partition("@")
    return (int(pid), host) if sep and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _is_stale(name: str, path: str) -> bool:
    owner = _owner(name)
    if owner is not None and owner[1] == socket.gethostname():
        return not _alive(owner[0])
    try:  # another host's file (a shared file system), or an older naming: only when old
        return time.time() - os.path.getmtime(path) > FOREIGN_TEMP_AGE
    except OSError:
        return False


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove the `.sparsegraph-*.tmp` files in `folder` that a killed process left behind (their
    process is gone); returns the removed paths. Files of running processes are never touched."""
    folder = os.fspath(folder) or "."
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if not (name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)):
            continue
        path = os.path.join(folder, name)
        if _is_stale(name, path):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass  # removed by someone else meanwhile, or not ours to remove
    return removed


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
_ERRNO_IN_TEXT = re.compile(r"(?:\[Errno |os error )(\d+)")


def _write_failure(e: BaseException, tmp: str, folder: str) -> str | None:
    """Why a write failed, when the file system refused it, whichever library wrote: an OSError's
    own reason, an errno quoted in the message (Rust and C++ writers), a file that reached the
    size limit (`ulimit -f`), or a full disk. None for failures that are not about writing."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    found = _ERRNO_IN_TEXT.search(str(e))
    if (e.errno if isinstance(e, OSError) else int(found.group(1)) if found else None) == errno.EFBIG \
            and limit != resource.RLIM_INFINITY:
        return f"{os.strerror(errno.EFBIG)} (the file size limit, ulimit -f, is {limit} bytes)"
    if isinstance(e, OSError):
        return _reason(e)
    if found:
        return os.strerror(int(found.group(1)))
    try:
        size = os.path.getsize(tmp)
    except OSError:
        size = -1
    if limit != resource.RLIM_INFINITY and size >= limit:
        return f"{os.strerror(errno.EFBIG)} (the file size limit, ulimit -f, is {limit} bytes)"
    try:
        if os.statvfs(folder).f_bavail == 0:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, then move the finished file to `path` (see the module docstring).

    Raises `OutputError` when the file cannot be written; `path` is then as it was before."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: it is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {path}: cannot create {folder}: {_reason(e)}") from None
    remove_stale_temps(folder)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=_tmp_prefix(), suffix=TMP_SUFFIX)
    except OSError as e:
        raise OutputError(f"cannot write {path}: cannot create a file in {folder}: {_reason(e)}") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result gets the usual permissions
        os.replace(tmp, path)
    except Exception as e:
        reason = None if isinstance(e, SparsegraphError) else _write_failure(e, tmp, folder)
        _unlink_quietly(tmp)
        if reason is None:
            raise
        raise OutputError(f"cannot write {path}: {reason}") from e
    except BaseException:  # KeyboardInterrupt, SystemExit: nothing half-written either
        _unlink_quietly(tmp)
        raise
