"""What this installation is and whether it runs on this machine: the data of ``repkern info``.

Per visible GPU: which code of the build runs on it (SASS for its architecture, or PTX the driver
JIT-compiles), whether the driver is new enough for the CUDA runtime the module is linked with, and a
one-line verdict. For the CPU: the instruction-set level the kernels run at and the levels compiled.
Settings in the environment that repkern reads are validated, so that garbage is an error naming the
variable instead of a silent default.
"""

from __future__ import annotations

import os
import platform
import re
from typing import Optional

import torch

from repkern import _C, _native

ENV_VARS = ("REPKERN_BACKEND", "REPKERN_CPU_ISA", "REPKERN_EMU_SCHEDULE", "REPKERN_MAX_GRAM_BYTES",
            "REPKERN_SAE_CHUNK_BYTES")


def cuda_version_text(code: int) -> Optional[str]:
    """CUDA's version code (1000 * major + 10 * minor) as "12.4"; None for 0 (no driver / no CUDA)."""
    return f"{code // 1000}.{code % 1000 // 10}" if code else None


def parse_archs(archs: str) -> list[tuple[int, str, str]]:
    """CMake architecture entries ("80-real 90a-real 120") -> (number, suffix, kind) with kind "sass",
    "ptx" or "unknown" ("native", "all": resolved by CMake at build time); plain "120" is both."""
    entries = []
    for entry in archs.replace(";", " ").split():
        m = re.fullmatch(r"(\d+)([af]?)(-real|-virtual)?", entry)
        if not m:
            entries.append((0, "", "unknown"))
            continue
        number, suffix, kind = int(m.group(1)), m.group(2), m.group(3)
        if kind in (None, "-real"):
            entries.append((number, suffix, "sass"))
        if kind in (None, "-virtual"):
            entries.append((number, suffix, "ptx"))
    return entries


def code_for(archs: str, capability: tuple[int, int]) -> Optional[str]:
    """The build's code that runs on a GPU of compute capability (major, minor): "sass sm_86",
    "ptx compute_80" (JIT-compiled by the driver), "unknown" (built for "native"/"all"), or None.

    SASS runs on the same major architecture at an equal or higher minor version ("a" variants only on
    their exact architecture); PTX runs on any equal or newer architecture ("a" PTX only on its own)."""
    major, minor = capability
    device = major * 10 + minor
    best_sass, best_ptx, unknown = None, None, False
    for number, suffix, kind in parse_archs(archs):
        if kind == "unknown":
            unknown = True
            continue
        arch_major, arch_minor = divmod(number, 10)
        if kind == "sass":
            runs = (number == device) if suffix == "a" else (arch_major == major and arch_minor <= minor)
            if runs and (best_sass is None or number > best_sass[0]):
                best_sass = (number, suffix)
        else:
            runs = (number == device) if suffix == "a" else number <= device
            if runs and (best_ptx is None or number > best_ptx[0]):
                best_ptx = (number, suffix)
    if best_sass:
        return f"sass sm_{best_sass[0]}{best_sass[1]}"
    if best_ptx:
        return f"ptx compute_{best_ptx[0]}{best_ptx[1]}"
    return "unknown" if unknown else None


def gpu_verdict(build: dict, capability: tuple[int, int]) -> tuple[bool, Optional[str], str]:
    """(runs, code, one-line verdict) for one GPU."""
    cap = f"{capability[0]}.{capability[1]}"
    if not build["cuda"]:
        reason = build.get("cuda_skipped") or "no nvcc at build time"
        return False, None, (f"NO: repkern was built without CUDA kernels ({reason}); reinstall with nvcc on PATH "
                             "and REPKERN_CUDA=ON")
    code = code_for(build["cuda_archs"], capability)
    runtime, driver = build.get("cuda_runtime_version", 0), build.get("cuda_driver_version", 0)
    if code is None:
        return False, None, (f"NO: the build has no code for compute capability {cap} (built for "
                             f"{build['cuda_archs']}); reinstall with REPKERN_CUDA_ARCHS=\"{cap.replace('.', '')}-real\" "
                             "(or without it, on this machine, to build for the visible GPUs)")
    if not driver:
        return False, code, "NO: no CUDA driver found"
    # Minor-version compatibility: a driver of the same major CUDA version runs the module's SASS; PTX needs
    # a driver at least as new as the toolkit that wrote it.
    too_old = driver // 1000 < runtime // 1000 or (code.startswith("ptx") and driver < runtime)
    if too_old:
        return False, code, (f"NO: the driver supports CUDA {cuda_version_text(driver)}, the module needs "
                             f"{cuda_version_text(runtime)}; update the driver or build with an older toolkit")
    if code == "unknown":
        return True, code, f"probably: built for {build['cuda_archs']} (resolved at build time)"
    if code.startswith("ptx"):
        return True, code, f"yes, by JIT: {code} is compiled by the driver at first use (a minute, cached)"
    return True, code, f"yes: {code}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_errors() -> list[str]:
    """Settings repkern reads that it cannot use, each naming its variable (checked by the code that reads
    them, so this list cannot disagree with what the ops do)."""
    from repkern.ops import cka, sae

    errors = []
    for check in (_native.backend_setting, _C.cpu_isa, lambda: cka.gram_budget(None),
                  lambda: sae.chunk_budget(None)):
        try:
            check()
        except ValueError as exc:
            errors.append(str(exc))
    schedule = os.environ.get("REPKERN_EMU_SCHEDULE")
    if schedule:
        if _native.has_emulator():
            try:
                _native.emu_module().check_schedule()
            except ValueError as exc:
                errors.append(str(exc))
        else:
            errors.append("REPKERN_EMU_SCHEDULE is set but this build has no emulator (repkern._emu)")
    return errors


def collect() -> dict:
    """Everything ``repkern info --json`` prints."""
    import repkern

    build = repkern.build_info()
    errors = environment_errors()
    try:
        isa = _C.cpu_isa()
    except ValueError:
        isa = None
    devices = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        capability = tuple(torch.cuda.get_device_capability(i))
        runs, code, verdict = gpu_verdict(build, capability)
        devices.append({"index": i, "name": torch.cuda.get_device_name(i),
                        "capability": f"{capability[0]}.{capability[1]}", "code": code, "runs": runs,
                        "verdict": verdict})
    return {
        "version": build["version"],
        "git_sha": build["git_sha"],
        "torch": build["torch"],
        "cpu": {
            "model": cpu_model(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "isa": isa,
            "isas_compiled": build["cpu_isas_compiled"],
            "isas_supported": build["cpu_isas_supported"],
            "build_arch": build["cpu_build_arch"],
            "compiler": build["cxx_compiler"],
        },
        "cuda": {
            "built": build["cuda"],
            "archs": build["cuda_archs"].split(),
            "compiler": build["cuda_compiler"] or None,
            "runtime_version": cuda_version_text(build["cuda_runtime_version"]),
            "driver_version": cuda_version_text(build["cuda_driver_version"]),
            "skipped": build["cuda_skipped"] or None,
            "devices": devices,
        },
        "emulator": build["emulator"],
        "environment": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
        "errors": errors,
    }


def format_text(info: dict) -> str:
    cpu, cuda = info["cpu"], info["cuda"]
    lines = [f"repkern {info['version']} (commit {info['git_sha']}; torch {info['torch']})"]
    isa = cpu["isa"] or "none (see errors)"
    lines.append(f"  CPU:          {cpu['model']} ({cpu['cores']} cores, {cpu['threads']} torch threads)")
    lines.append(f"  CPU kernels:  running at {isa}; compiled: {', '.join(cpu['isas_compiled'])} "
                 f"(build arch {cpu['build_arch']}, {cpu['compiler']}); this CPU runs: "
                 f"{', '.join(cpu['isas_supported']) or 'none'}")
    if cuda["built"]:
        lines.append(f"  CUDA kernels: nvcc {cuda['compiler']} for {' '.join(cuda['archs'])}; runtime "
                     f"{cuda['runtime_version']}, driver {cuda['driver_version'] or 'none'}")
    else:
        lines.append(f"  CUDA kernels: not compiled ({cuda['skipped'] or 'no nvcc at build time'})")
    for d in cuda["devices"]:
        lines.append(f"  cuda:{d['index']}       {d['name']} (compute capability {d['capability']}): {d['verdict']}")
    if not cuda["devices"]:
        lines.append("  GPUs:         none visible")
    lines.append(f"  emulator:     {'repkern._emu present' if info['emulator'] else 'absent'}")
    for name, value in info["environment"].items():
        lines.append(f"  {name}={value}")
    for error in info["errors"]:
        lines.append(f"  ERROR: {error}")
    return "\n".join(lines)
