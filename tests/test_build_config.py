"""What the build targets and what `repkern info` says about it: the CUDA architecture choice
(cmake/cuda_archs.cmake, run in CMake script mode), which GPUs a build runs on, and the info command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import repkern
import torch
from repkern import _info
from repkern.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS_CMAKE = os.path.join(ROOT, "cmake", "cuda_archs.cmake")
NVCC13 = "75;80;86;87;88;89;90;100;103;110;120;121"  # `nvcc --list-gpu-arch` of CUDA 13.0


def _cmake(script: str) -> subprocess.CompletedProcess:
    if shutil.which("cmake") is None or not os.path.exists(ARCHS_CMAKE):
        pytest.skip("needs cmake and the source tree")
    with tempfile.TemporaryDirectory() as tmp:  # a file: cmake < 3.27 cannot read a script from a pipe
        path = os.path.join(tmp, "script.cmake")
        with open(path, "w") as f:
            # the policies of CMakeLists.txt's cmake_minimum_required (IN_LIST), which a script lacks
            f.write(f"cmake_policy(VERSION 3.20)\ninclude({ARCHS_CMAKE})\n{script}")
        return subprocess.run(["cmake", "-P", path], capture_output=True, text=True, timeout=60)


def _choose(requested="", source="REPKERN_CUDA_ARCHS", visible="", known=NVCC13):
    proc = _cmake(textwrap.dedent(f"""
        repkern_choose_cuda_archs("{requested}" "{source}" "{visible}" "{known}" archs src)
        message("ARCHS=${{archs}}")
        message("SOURCE=${{src}}")
    """))
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split("=", 1) for line in proc.stderr.splitlines() if line.startswith(("ARCHS=", "SOURCE=")))
    return lines["ARCHS"], lines["SOURCE"], " ".join(proc.stderr.split())  # CMake wraps warnings


def test_default_without_a_gpu_is_turing_to_the_newest_plus_ptx():
    archs, source, _ = _choose()
    assert archs == ("75-real;80-real;86-real;87-real;88-real;89-real;90-real;100-real;103-real;110-real;"
                     "120-real;121-real;121-virtual")
    assert "from sm_75" in source


def test_default_with_visible_gpus_builds_for_them():
    archs, source, _ = _choose(visible="8.6;9.0")
    assert archs == "86-real;90-real" and "visible GPUs" in source


def test_a_visible_gpu_newer_than_nvcc_gets_ptx_of_the_newest():
    archs, _, log = _choose(visible="13.0", known="75;80;90")
    assert archs == "90-virtual" and "newer than this nvcc knows" in log


def test_requested_architectures_nvcc_lacks_are_dropped_with_a_warning():
    archs, _, log = _choose(requested="52;80-real;90a-real;200-real;native;bogus", source="CUDAARCHS")
    assert archs == "80-real;90a-real;native"
    assert "CUDAARCHS asks for CUDA architecture '52'" in log and "'200-real'" in log
    assert "'bogus' is not a CUDA architecture" in log


def test_torch_arch_list_is_translated():
    proc = _cmake('repkern_from_torch_arch_list("7.5 8.6+PTX;9.0a Ampere" out)\nmessage("OUT=${out}")')
    assert proc.returncode == 0, proc.stderr
    assert "OUT=75-real;86;90a-real" in proc.stderr
    assert "entry 'Ampere' is not of the form" in " ".join(proc.stderr.split())


# ---- which GPUs a build runs on -----------------------------------------------------------------------

@pytest.mark.parametrize("archs, capability, expected", [
    ("80-real 90a-real", (8, 0), "sass sm_80"),
    ("80-real 90a-real", (8, 6), "sass sm_80"),      # same major, newer minor: binary compatible
    ("80-real 90a-real", (9, 0), "sass sm_90a"),
    ("80-real 90a-real", (10, 0), None),             # no SASS of major 10, no PTX
    ("80-real 90a-real", (7, 5), None),              # older than every architecture
    ("75-real 121-virtual", (12, 1), "ptx compute_121"),
    ("75-real 120-virtual", (13, 0), "ptx compute_120"),  # PTX runs on newer GPUs (JIT)
    ("86-real", (8, 0), None),                       # SASS does not run on an older minor
    ("90a-virtual", (10, 0), None),                  # "a" PTX only on its own architecture
    ("80", (8, 9), "sass sm_80"),                    # plain: SASS and PTX
    ("80", (9, 0), "ptx compute_80"),
    ("native", (9, 0), "unknown"),
])
def test_code_for(archs, capability, expected):
    assert _info.code_for(archs, capability) == expected


def _build(**overrides):
    build = {"cuda": True, "cuda_archs": "80-real 90a-real", "cuda_runtime_version": 13000,
             "cuda_driver_version": 13000, "cuda_skipped": ""}
    build.update(overrides)
    return build


@pytest.mark.parametrize("build, capability, runs, phrase", [
    (_build(), (9, 0), True, "yes: sass sm_90a"),
    (_build(cuda_driver_version=12080), (9, 0), False, "the driver supports CUDA 12.8, the module needs 13.0"),
    (_build(cuda_runtime_version=12040, cuda_driver_version=12020), (8, 6), True, "yes: sass sm_80"),  # minor compat
    (_build(cuda_archs="80-virtual", cuda_runtime_version=12040, cuda_driver_version=12020), (9, 0), False,
     "the module needs 12.4"),  # PTX needs a driver as new as the toolkit
    (_build(cuda_archs="80-virtual"), (9, 0), True, "yes, by JIT"),
    (_build(), (7, 5), False, 'no code for compute capability 7.5 (built for 80-real 90a-real); reinstall with '
                              'REPKERN_CUDA_ARCHS="75-real"'),
    (_build(cuda_driver_version=0), (9, 0), False, "no CUDA driver"),
    (_build(cuda=False, cuda_skipped="an NVIDIA GPU was visible at build time but no nvcc was found"), (9, 0), False,
     "built without CUDA kernels (an NVIDIA GPU was visible"),
])
def test_gpu_verdict(build, capability, runs, phrase):
    got_runs, _, verdict = _info.gpu_verdict(build, capability)
    assert got_runs == runs and phrase in verdict


# ---- repkern info ---------------------------------------------------------------------------------------

def test_info_json_has_the_cpu_level_and_cuda(capsys, monkeypatch):
    monkeypatch.delenv("REPKERN_CPU_ISA", raising=False)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    build = repkern.build_info()
    assert info["cpu"]["isa"] == build["cpu_isas_supported"][-1]
    assert info["cpu"]["build_arch"] == build["cpu_build_arch"] != "native"
    assert info["cpu"]["isas_compiled"] == build["cpu_isas_compiled"]
    assert info["cuda"]["built"] == build["cuda"] and isinstance(info["cuda"]["devices"], list)
    assert info["git_sha"] == build["git_sha"] and info["errors"] == []


def test_info_lists_each_gpu_with_a_verdict(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (7, 5)][i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["NVIDIA H100", "Tesla T4"][i])
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cuda:0       NVIDIA H100 (compute capability 9.0): " in out
    assert "cuda:1       Tesla T4 (compute capability 7.5): " in out
    expected = _info.gpu_verdict(repkern.build_info(), (7, 5))[2]
    assert expected in out


@pytest.mark.parametrize("variable, value", [
    ("REPKERN_BACKEND", "garbage"),
    ("REPKERN_CPU_ISA", "garbage"),
    ("REPKERN_EMU_SCHEDULE", "sideways"),
    ("REPKERN_MAX_GRAM_BYTES", "lots"),
    ("REPKERN_SAE_CHUNK_BYTES", "-3"),
])
def test_info_rejects_garbage_settings(variable, value):
    env = dict(os.environ, **{variable: value})
    proc = subprocess.run([sys.executable, "-m", "repkern", "info"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"ERROR: {variable}" in proc.stdout


# ---- a build that skipped CUDA although a GPU was there ----------------------------------------------------

def _skipped_build(monkeypatch):
    build = dict(repkern._C.build_info(), cuda=False,
                 cuda_skipped="an NVIDIA GPU was visible at build time but no nvcc was found")
    monkeypatch.setattr(repkern._C, "build_info", lambda: build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_cuda_tensors_get_an_error_naming_the_fix(monkeypatch):
    _skipped_build(monkeypatch)
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels \(an NVIDIA GPU was visible at build time "
                                           r"but no nvcc was found\); reinstall with nvcc on PATH .*REPKERN_CUDA=ON"):
        repkern._native.backend_for(torch.device("cuda", 0))


def test_import_warns_when_a_gpu_is_here_but_cuda_was_skipped(monkeypatch):
    _skipped_build(monkeypatch)
    with pytest.warns(RuntimeWarning, match="built without CUDA kernels .*Reinstall with nvcc on PATH"):
        repkern._warn_if_built_without_cuda()
