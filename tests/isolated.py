"""Running a snippet of Python in a child process: a crash there (SIGSEGV, abort) fails the one test that
asked for it instead of killing the whole test session.

The child gets this process's environment (so the ``backend`` fixture's ``REPKERN_BACKEND``,
``REPKERN_EMU_SCHEDULE``, ``REPKERN_CPU_ISA`` and a ``REPKERN_EMU_LIBRARY`` sanitizer build carry over)
and imports the same ``repkern`` package as the tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import repkern

PACKAGE_ROOT = str(Path(repkern.__file__).resolve().parents[1])  # the directory holding the repkern package


def run_snippet(code: str, *, env: Optional[dict] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `code` (dedented) with ``python -c`` and returns the finished process (stdout/stderr as text)."""
    environ = dict(os.environ)
    environ.update(env or {})
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                          text=True, timeout=timeout)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


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
