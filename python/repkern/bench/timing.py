"""Timing and memory helpers shared by every benchmark.

Time: CUDA events on GPU, perf_counter on CPU; warm-up first; median, p20, p80
over repeats. On CUDA the L2 cache is flushed before every timed run (a buffer
larger than L2 is written between repeats, outside the timed region), so each
run starts from DRAM as a real call on fresh data would. Peak memory: extra bytes
held at the peak of one call beyond what was allocated before it (CUDA: the
caching allocator's statistics; CPU: the "Total Allocated" of torch's profiler
memory events), so it counts every allocation torch makes for the call, which is
every allocation repkern makes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch

DEFAULT_L2_FLUSH_BYTES = 256 << 20  # when the device does not report its L2 size


@dataclasses.dataclass
class Measurement:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_bytes: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(sorted_values, q):
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def l2_flush_bytes(device: torch.device) -> int:
    """Bytes written between timed CUDA runs: twice the L2 size the device reports, else 256 MB."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    return 2 * int(l2) if l2 > 0 else DEFAULT_L2_FLUSH_BYTES


_flush_buffers: dict = {}


def l2_flusher(device: torch.device) -> Optional[Callable[[], object]]:
    """A function that writes a buffer larger than the L2 cache of `device` (None on the CPU:
    CPU timing is unchanged). The buffer is allocated once per device and kept."""
    if device.type != "cuda":
        return None
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(l2_flush_bytes(device), dtype=torch.uint8, device=device)
    return _flush_buffers[key].zero_


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of fn (CUDA: between two events on the current stream)."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, min_repeats: int = 3,
            max_repeats: int = 50, min_time_s: float = 0.5) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    flush = l2_flusher(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start_all < min_time_s):
        if flush is not None:
            flush()  # enqueued before the first event: the events time fn alone
        times.append(_timed_call(fn, device))
    return times


def alternating_ms(fns: dict, device: torch.device, rounds: int) -> dict:
    """{name: [ms per round]}: each callable once per round after one warm-up call each, in the given
    order in even rounds and reversed in odd ones, so a shared machine's load drifts over all alike."""
    items = list(fns.items())
    for _, fn in items:
        fn()
    _sync(device)
    times: dict = {name: [] for name, _ in items}
    for r in range(rounds):
        for name, fn in (items if r % 2 == 0 else items[::-1]):
            times[name].append(_timed_call(fn, device))
    return times


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return int(max(totals, default=0))


def measure(fn: Callable[[], object], device: torch.device, **kwargs) -> Measurement:
    times = sorted(time_ms(fn, device, **kwargs))
    return Measurement(
        median_ms=statistics.median(times),
        p20_ms=_percentile(times, 0.2),
        p80_ms=_percentile(times, 0.8),
        peak_mem_bytes=peak_memory_bytes(fn, device),
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA OOM, a CPU allocation failure, or a library's allocation error reported as a RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(s in text for s in ("out of memory", "can't allocate memory", "cublas_status_alloc_failed"))
    return False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass
class Ceilings:
    """What this device does in the same run: the practical limits."""

    copy_gbps: float  # clone of a large tensor: bytes read + written per second
    read_gbps: float  # sum of the same large tensor: bytes read per second (single-read kernels)
    matmul_gflops: dict = dataclasses.field(default_factory=dict)  # dtype name -> large torch.matmul GFLOP/s
    matmul_size: dict = dataclasses.field(default_factory=dict)  # dtype name -> m of the m×m @ m×m product
    notes: list = dataclasses.field(default_factory=list)

    def matmul(self, dtype) -> Optional[float]:
        """GFLOP/s of a large matmul in `dtype` (a torch.dtype or its name), None if not measured."""
        return self.matmul_gflops.get(dtype if isinstance(dtype, str) else dtype_name(dtype))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# On the CPU, 16-bit matmuls without native instructions run ~100x slower than float32: a 512² product
# first, few repeats; 1024² (closer to the peak) only where that takes under a quarter of a second.
_CPU_SLOW_MATMUL = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}
_CPU_BIG_MATMUL_MS = 250.0


def _matmul_ms(m: int, device: torch.device, dtype: torch.dtype, options: dict) -> float:
    a = torch.randn(m, m, device=device, generator=torch.Generator(device=device).manual_seed(0)).to(dtype)
    return statistics.median(time_ms(lambda: a @ a, device, **options))


def measure_matmul(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> tuple[float, int]:
    """(GFLOP/s, m) of an m×m @ m×m torch.matmul in `dtype`."""
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        m, ms = 512, _matmul_ms(512, device, dtype, _CPU_SLOW_MATMUL)
        if 8 * ms < _CPU_BIG_MATMUL_MS:
            m, ms = 1024, _matmul_ms(1024, device, dtype, _CPU_SLOW_MATMUL)
    else:
        m = 1024 if device.type == "cpu" else 2048 if quick else 4096 if dtype == torch.float64 else 8192
        ms = _matmul_ms(m, device, dtype, {"min_time_s": 0.3})
    return 2 * m**3 / ms / 1e6, m


def measure_ceilings(device: torch.device, *, quick: bool = False,
                     dtypes: Sequence[torch.dtype] = (torch.float32,)) -> Ceilings:
    """Copy and single-read bandwidth (float32 tensor), and a large matmul in each of `dtypes`
    (float32 always, the reference point of the log line)."""
    n = (1 << 24) if quick else (1 << 26)  # float32 elements: 64 / 256 MB
    src = torch.empty(n, device=device).uniform_()
    copy_ms = statistics.median(time_ms(src.clone, device, min_time_s=0.3))
    read_ms = statistics.median(time_ms(src.sum, device, min_time_s=0.3))
    del src
    ceilings = Ceilings(copy_gbps=2 * 4 * n / copy_ms / 1e6, read_gbps=4 * n / read_ms / 1e6)
    ordered = [torch.float32] + [d for d in dict.fromkeys(dtypes) if d != torch.float32]
    for dtype in ordered:
        name = dtype_name(dtype)
        try:
            gflops, m = measure_matmul(device, dtype, quick=quick)
        except Exception as exc:  # noqa: BLE001 - a dtype this device cannot multiply: no ceiling, said so
            if not (is_out_of_memory(exc) or isinstance(exc, (RuntimeError, NotImplementedError))):
                raise
            ceilings.notes.append(f"{name} matmul not measured ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            continue
        ceilings.matmul_gflops[name], ceilings.matmul_size[name] = gflops, m
    fp32 = ceilings.matmul_gflops.get("float32")
    for name, gflops in ceilings.matmul_gflops.items():
        if device.type == "cpu" and name in ("bfloat16", "float16"):
            note = f"{name} matmul measured on a {ceilings.matmul_size[name]}² product (CPU: kept short)"
            if fp32 and gflops < fp32 / 10:
                note += (f"; it runs {fp32 / gflops:.0f}x slower than float32 here (no native {name} "
                         f"instructions?), so {name} rows are compared with that slow ceiling")
            ceilings.notes.append(note)
    return ceilings


def git_sha() -> str:
    """Commit of the source tree the benchmarks are run from (the working directory)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def build_sha() -> tuple[str, str]:
    """(sha, source): the commit the installed repkern was built from when the build embeds it
    (``build_info()["git_sha"]``, "unknown" when built outside git), else the working directory's
    commit (older builds, which do not record it)."""
    import repkern

    info = repkern.build_info()
    if "git_sha" in info:
        return str(info["git_sha"]), "build"
    return git_sha(), "working directory (this build does not record its commit)"


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux, platform.processor() elsewhere."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def parse_nvidia_proc_version(text: str) -> str:
    """The driver version in the text of /proc/driver/nvidia/version ("" if absent)."""
    import re

    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else ""


def driver_version() -> str:
    """The NVIDIA driver's version when it can be read without requiring anything (the kernel
    module's /proc file, pynvml if installed, nvidia-smi if on PATH); "" when none answers."""
    import shutil

    try:
        with open("/proc/driver/nvidia/version") as f:
            version = parse_nvidia_proc_version(f.read())
        if version:
            return version
    except OSError:
        pass
    try:
        import pynvml  # optional (nvidia-ml-py)

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - absent or unusable: try the next source
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"
