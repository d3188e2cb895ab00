"""Instruction-set levels of the CPU kernels: run-time choice, REPKERN_CPU_ISA, and the copies running
on CPUs that lack the higher levels (checked under qemu-user's CPU models where qemu is installed).

Every op test also runs each lower level this host supports (the ``cpu-<level>`` backends of conftest)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import repkern
from repkern import _C
from repkern._constants import SPARSITY_FEATURE_FIELDS, sparsity_row_channels

INFO = repkern.build_info()
COMPILED = INFO["cpu_isas_compiled"]
SUPPORTED = INFO["cpu_isas_supported"]
X86_LEVELS = COMPILED == ["baseline", "avx2", "avx512"]


def test_default_is_the_best_supported_level(monkeypatch):
    monkeypatch.delenv("REPKERN_CPU_ISA", raising=False)
    assert SUPPORTED and set(SUPPORTED) <= set(COMPILED)
    assert _C.cpu_isa() == SUPPORTED[-1]
    monkeypatch.setenv("REPKERN_CPU_ISA", "")
    assert _C.cpu_isa() == SUPPORTED[-1]


@pytest.mark.parametrize("level", SUPPORTED)
def test_forcing_a_supported_level(monkeypatch, level):
    monkeypatch.setenv("REPKERN_CPU_ISA", level)
    assert _C.cpu_isa() == level
    x = torch.randn(33, 7, dtype=torch.float64)
    torch.testing.assert_close(repkern.gram(x), x @ x.T)


@pytest.mark.parametrize("value, message", [
    ("garbage", "REPKERN_CPU_ISA must be one of baseline, avx2, avx512, native"),
    ("AVX2", "REPKERN_CPU_ISA must be one of"),
])
def test_unknown_level_is_an_error_naming_the_variable(monkeypatch, value, message):
    monkeypatch.setenv("REPKERN_CPU_ISA", value)
    with pytest.raises(ValueError, match=message):
        _C.cpu_isa()
    with pytest.raises(ValueError, match="REPKERN_CPU_ISA"):  # the ops too: native code reads it per call
        repkern.gram(torch.randn(5, 3))


def test_a_level_this_build_lacks_is_an_error(monkeypatch):
    missing = [lv for lv in ("baseline", "avx2", "avx512", "native") if lv not in COMPILED]
    monkeypatch.setenv("REPKERN_CPU_ISA", missing[0])
    with pytest.raises(ValueError, match=f"REPKERN_CPU_ISA={missing[0]}: this build has the levels"):
        _C.cpu_isa()


def test_levels_give_the_same_statistics(monkeypatch):
    """Each copy is the same algorithm in other vector widths: equal up to summation order."""
    x = torch.relu(torch.randn(300, 200, dtype=torch.float32))
    x[7, 3] = float("nan")
    results = {}
    for level in SUPPORTED:
        monkeypatch.setenv("REPKERN_CPU_ISA", level)
        results[level] = repkern.sparsity_stats(x).to_dict()
    first = results[SUPPORTED[0]]
    for level in SUPPORTED[1:]:
        for key, value in first.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(results[level][key], value, rtol=1e-5, atol=1e-6, equal_nan=True,
                                           msg=lambda m: f"{level} vs {SUPPORTED[0]}, {key}: {m}")


# ---- the copies on CPUs without the higher levels (qemu-user CPU models) -------------------------------

# Loads repkern._C without torch (the native core has no torch dependency: fast under emulation) and runs
# the vector-heaviest CPU kernels on numpy buffers; prints the level and the results as JSON.
_QEMU_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    path, channels, fields = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    spec = importlib.util.spec_from_file_location("repkern._C", path)
    C = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(C)
    def view(a, code):
        return (a.ctypes.data, list(a.shape), [s // a.itemsize for s in a.strides], code)
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((203, 150)), 0).astype(np.float32)
    top = np.array([0.1, 0.5], dtype=np.float64)
    state = np.zeros((fields, 150), dtype=np.float64)
    rows = np.zeros((channels, 203), dtype=np.float32)
    counts = np.zeros((2, 203), dtype=np.int64)
    C.sparsity_stats_cpu(view(x, 0), 1e-6, view(top, 1), True, view(state, 1), view(rows, 0), view(counts, 5), 2)
    g = rng.integers(-4, 5, (70, 9)).astype(np.float32)  # small integers: BLAS-independent exact products
    inner = (g @ g.T)[None].copy()
    out = np.zeros_like(inner)
    C.gram_epilogue_cpu(0, 0, view(inner, 0), None, view(out, 0), None, None, None, 2)
    print(json.dumps({"isa": C.cpu_isa(), "supported": C.build_info()["cpu_isas_supported"],
                      "state": state.tolist(), "rows": rows.tolist(), "counts": counts.tolist(),
                      "gram": out.ravel().tolist()}))
""")

# qemu-user CPU models: (model, the level it must select). TCG emulates AVX2 (qemu >= 7.2), no AVX-512.
QEMU_CPUS = [("EPYC-Milan", "avx2"), ("Nehalem", "baseline")]


def _run_script(env_extra, qemu_cpu=None):
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, "-c", _QEMU_SCRIPT, _C.__file__, str(sparsity_row_channels(2, True)),
           str(len(SPARSITY_FEATURE_FIELDS))]
    if qemu_cpu:
        cmd = [shutil.which("qemu-x86_64"), "-cpu", qemu_cpu] + cmd
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return proc


@pytest.mark.skipif(not X86_LEVELS, reason="the x86-64 levels are not compiled in this build")
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-user is not installed (apt-get install qemu-user): CPU models not emulated")
@pytest.mark.parametrize("model, level", QEMU_CPUS)
def test_copies_run_on_cpus_without_the_higher_levels(model, level):
    """The build must run on a CPU without AVX-512 (or without AVX): any instruction of a higher level
    anywhere on the path (the dispatch, a shared inline function the linker took from another copy)
    kills the process with SIGILL under the emulated CPU."""
    emulated = _run_script({"REPKERN_CPU_ISA": ""}, qemu_cpu=model)
    assert emulated.returncode == 0, f"under qemu -cpu {model}: rc {emulated.returncode}\n{emulated.stderr[-2000:]}"
    got = json.loads(emulated.stdout.strip().splitlines()[-1])
    assert got["isa"] == level and got["supported"][-1] == level
    native = _run_script({"REPKERN_CPU_ISA": level})  # the same copy on this CPU: the same bits
    assert native.returncode == 0, native.stderr[-2000:]
    want = json.loads(native.stdout.strip().splitlines()[-1])
    for key in ("state", "rows", "counts", "gram"):
        np.testing.assert_array_equal(np.array(got[key]), np.array(want[key]), err_msg=key)


@pytest.mark.skipif(not X86_LEVELS, reason="the x86-64 levels are not compiled in this build")
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-user is not installed")
def test_forcing_a_level_the_cpu_lacks_is_an_error():
    proc = _run_script({"REPKERN_CPU_ISA": "avx512"}, qemu_cpu="EPYC-Milan")
    assert proc.returncode != 0
    assert "REPKERN_CPU_ISA=avx512: this CPU does not support it (supported: baseline, avx2)" in proc.stderr
