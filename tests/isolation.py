"""Crash isolation for tests that run native code on generated or corrupted input.

A segfault or abort in a kernel would kill the whole pytest process; run such code through
:func:`run_isolated` instead and it runs in a worker process, so a crash fails the one test that
caused it, with the case that was running, and the next call starts a fresh worker::

    from tests.isolation import note_case, run_isolated

    def _decode_cases(seed):                 # module level: the worker imports it by name
        for case in cases(seed):
            note_case(case)                   # what a crash report names
            ...

    def test_decode_fuzz(backend):
        run_isolated(_decode_cases, 0)        # returns its result, re-raises its exception

The worker is one long-lived ``python -m tests.isolation`` process (importing torch once, not once
per test). Each call carries the caller's ``REPKERN_*`` environment variables (the ``backend``
fixture sets them with monkeypatch), so it runs on the same backend as an in-process call would.
``note_case`` works in-process too (a no-op there), so a function runs either way.

For a one-off child whose exit status is the point (a crash reproducer, an environment setting),
:func:`assert_snippet` runs a snippet with ``python -c`` and checks its status and output.

Children import the same ``repkern`` package as the tests (an installed one or the source tree).
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import select
import signal
import struct
import subprocess
import re
import sys
import tempfile
import textwrap
import traceback
from typing import Optional

import repkern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds the tests package
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(repkern.__file__)))  # holds repkern
PROGRESS_ENV = "REPKERN_ISOLATION_PROGRESS"
DEFAULT_TIMEOUT = 600


class WorkerCrash(AssertionError):
    """The worker died (a signal, an abort, os._exit) or timed out while running a case."""


def note_case(description) -> None:
    """Records the case about to run (in the worker: the last one recorded is what a crash report names)."""
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    text = description if isinstance(description, str) else repr(description)
    with open(path, "w") as f:  # only the latest matters
        f.write(text[:4000])
        f.flush()
        os.fsync(f.fileno())


# ---- wire format: 8-byte length, then a pickle --------------------------------------------------


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _recv(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    return pickle.loads(data) if len(data) == size else None


# ---- parent side --------------------------------------------------------------------------------


class Worker:
    """One worker process, started on first use and again after a crash."""

    def __init__(self):
        self._proc: Optional[subprocess.Popen] = None
        self._progress: Optional[str] = None

    def _start(self) -> None:
        fd, self._progress = tempfile.mkstemp(prefix="repkern-isolation-", suffix=".txt")
        os.close(fd)
        env = dict(os.environ)
        env["PYTHONPATH"] = _child_path(env)
        env[PROGRESS_ENV] = self._progress
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.isolation"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, cwd=ROOT)

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._progress:
            try:
                os.unlink(self._progress)
            except OSError:
                pass
            self._progress = None

    def _last_case(self) -> str:
        try:
            with open(self._progress) as f:
                return f.read() or "(no case recorded: before the first note_case)"
        except OSError:
            return "(unknown)"

    def _died(self, what: str, timeout: bool) -> WorkerCrash:
        proc = self._proc
        if timeout:
            proc.kill()
        how = describe_exit(proc.wait())
        if timeout:
            how = f"timed out ({how})"
        case = self._last_case()
        self._proc = None
        self.close()
        return WorkerCrash(f"{what}: the isolated worker process {how} in case: {case}")

    def call(self, func, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs):
        """func(*args, **kwargs) in the worker (func: a module-level function). Returns its result or
        re-raises its exception (with the worker's traceback as a note); a crash or a timeout raises
        WorkerCrash naming the case noted last."""
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        with open(self._progress, "w"):
            pass
        env = {k: v for k, v in os.environ.items() if k.startswith("REPKERN_") and k != PROGRESS_ENV}
        what = f"{func.__module__}.{func.__qualname__}"
        try:
            _send(self._proc.stdin, (func.__module__, func.__qualname__, args, kwargs, env))
        except (BrokenPipeError, OSError):
            raise self._died(what, False) from None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            raise self._died(what, True)
        reply = _recv(self._proc.stdout)
        if reply is None:
            raise self._died(what, False)
        status, value, text = reply
        if status == "ok":
            return value
        if isinstance(value, BaseException):
            value.add_note(f"raised in the isolated worker:\n{text}")
            raise value
        raise AssertionError(f"{what} raised in the isolated worker (exception not picklable):\n{text}")


_WORKER = Worker()
atexit.register(_WORKER.close)


def run_isolated(func, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs):
    """Runs func(*args, **kwargs) in the shared worker process (see the module docstring)."""
    return _WORKER.call(func, *args, timeout=timeout, **kwargs)


# ---- one-off snippets ---------------------------------------------------------------------------


def run_snippet(code: str, *, env: Optional[dict] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `code` (dedented) with ``python -c`` in this process's environment (the ``backend`` fixture's
    ``REPKERN_*`` settings carry over) updated by `env`; returns the finished process (text output)."""
    environ = dict(os.environ)
    environ.update(env or {})
    environ["PYTHONPATH"] = _child_path(environ)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                          text=True, timeout=timeout)


def assert_snippet(code: str, *, returncode: int = 0, stderr: Optional[str] = None, stdout: Optional[str] = None,
                   env: Optional[dict] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `code` and asserts its exit status and that `stderr` / `stdout` (regular expressions) occur in
    its output. An uncaught exception in the snippet exits with status 1 and its traceback on stderr."""
    proc = run_snippet(code, env=env, timeout=timeout)
    detail = f"\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == returncode, (
        f"snippet ended with {describe_exit(proc.returncode)}, expected {describe_exit(returncode)}{detail}")
    if stderr is not None:
        assert re.search(stderr, proc.stderr), f"stderr lacks {stderr!r}{detail}"
    if stdout is not None:
        assert re.search(stdout, proc.stdout), f"stdout lacks {stdout!r}{detail}"
    return proc


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _child_path(env: dict) -> str:
    return os.pathsep.join(p for p in (PACKAGE_ROOT, ROOT, env.get("PYTHONPATH", "")) if p)


# ---- worker side ---------------------------------------------------------------------------------


def _serve() -> None:
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints (and native writes) go to stderr, not the replies
    while True:
        request = _recv(requests)
        if request is None:
            return
        module, qualname, args, kwargs, env = request
        for key in [k for k in os.environ if k.startswith("REPKERN_") and k != PROGRESS_ENV and k not in env]:
            del os.environ[key]
        os.environ.update(env)
        try:
            func = getattr(importlib.import_module(module), qualname)
            reply = ("ok", func(*args, **kwargs), "")
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            text = "".join(traceback.format_exception(exc))
            try:
                pickle.dumps(exc)
                reply = ("error", exc, text)
            except Exception:  # noqa: BLE001
                reply = ("error", None, text)
        try:
            _send(replies, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            _send(replies, ("error", None, f"the result could not be sent back: {exc!r}"))


if __name__ == "__main__":
    _serve()
