"""Timing and memory helpers shared by every benchmark.

Time: CUDA events on GPU, perf_counter on CPU; warm-up first; median, p20, p80
over repeats. Peak memory: extra bytes held at the peak of one call beyond what
was allocated before it (CUDA: the caching allocator's statistics; CPU: the
"Total Allocated" of torch's profiler memory events), so it counts every
allocation torch makes for the call, which is every allocation repkern makes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import tempfile
import time
from typing import Callable

import torch


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


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, min_repeats: int = 3,
            max_repeats: int = 50, min_time_s: float = 0.5) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start_all < min_time_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
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


@dataclasses.dataclass
class Ceilings:
    """What this device does in the same run: the practical limits."""

    copy_gbps: float  # clone of a large tensor: bytes read + written per second
    matmul_gflops: float  # large float32 torch.matmul
    read_gbps: float  # sum of the same large tensor: bytes read per second (single-read kernels)


def measure_ceilings(device: torch.device, *, quick: bool = False) -> Ceilings:
    n = (1 << 24) if quick else (1 << 26)  # float32 elements: 64 / 256 MB
    src = torch.empty(n, device=device).uniform_()
    copy_ms = statistics.median(time_ms(src.clone, device, min_time_s=0.3))
    read_ms = statistics.median(time_ms(src.sum, device, min_time_s=0.3))
    m = 1024 if quick or device.type == "cpu" else 8192
    a = torch.randn(m, m, device=device)
    mm_ms = statistics.median(time_ms(lambda: a @ a, device, min_time_s=0.3))
    return Ceilings(copy_gbps=2 * 4 * n / copy_ms / 1e6, matmul_gflops=2 * m**3 / mm_ms / 1e6,
                    read_gbps=4 * n / read_ms / 1e6)


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
