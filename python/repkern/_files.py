"""Writing files atomically: every file repkern saves (workflow results, benchmark tables and plots, the
demo's report) is written to a temporary file in the destination's folder and moved over the destination
with ``os.replace`` once complete, so a failure part-way (an unencodable value, a full disk, an
interrupt) leaves the previous file, or none, and never a truncated one."""

from __future__ import annotations

import contextlib
import os
import tempfile


def _temporary(path: str) -> tuple[int, str]:
    """A new temporary file in the folder of `path` (os.replace is atomic within a file system)."""
    return tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                            suffix=".tmp")


def _publish(tmp: str, path: str) -> None:
    """Moves the complete temporary file over `path`, with the permissions `path` had (or, for a new file,
    those the umask gives: mkstemp's own are 0600)."""
    try:
        permissions = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        permissions = 0o666 & ~mask
    os.chmod(tmp, permissions)
    os.replace(tmp, path)


def write_together(writers) -> None:
    """Writes files that belong together (a result's ``.pt`` and ``.json``): for each ``(path, mode,
    write)``, ``write(f)`` fills a temporary file opened with `mode`; only when all are complete are they
    moved into place, in the given order. A failure in any ``write`` leaves every path as it was."""
    staged = []
    try:
        for path, mode, write in writers:
            path = os.fspath(path)
            fd, tmp = _temporary(path)
            staged.append((tmp, path))
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            _publish(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def write_file(path, mode: str, write) -> None:
    """One file written atomically: ``write(f)`` fills a temporary file opened with `mode`."""
    write_together([(path, mode, write)])


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """``with atomic_write(path) as f: ...``: `f` is a temporary file next to `path` that replaces `path`
    when the block completes; when the block raises, it is removed and `path` is left as it was."""
    path = os.fspath(path)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
