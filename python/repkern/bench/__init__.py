"""Benchmark suite: repkern against the pure-PyTorch reference, same run, same device.

Every case reports time (median/p20/p80), peak memory, the speed-up over the
reference, and how close the kernel gets to this device's limits measured in the
same run: GB/s against a large copy (and against a large sum, the single-read
ceiling) for memory-bound work, GFLOP/s against a large float32 matmul for
compute-bound work.

Run: ``python benchmarks/bench_gram.py`` (or ``python -m repkern bench``).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
from typing import Callable, Optional, Sequence

import torch

from repkern.bench.timing import Ceilings, device_name, git_sha, measure, measure_ceilings

SUITES = ("gram", "cka", "sparsity", "sae", "streaming")  # modules repkern.bench.<suite> with cases(device, quick)

CSV_FIELDS = (
    "op", "provider", "shape", "dtype", "device", "median_ms", "p20_ms", "p80_ms", "peak_mem_bytes",
    "speedup_vs_reference", "gbps", "copy_fraction", "read_fraction", "gflops", "matmul_fraction", "torch", "git_sha",
    "suite",
)


@dataclasses.dataclass
class Case:
    """One problem, several providers. `bytes_moved` / `flops`: the floor of the
    work (inputs read once, outputs written once), used for GB/s and GFLOP/s."""

    op: str
    shape: str
    dtype: torch.dtype
    providers: dict[str, Callable[[], object]]
    bytes_moved: Optional[float] = None
    flops: Optional[float] = None
    timing: dict = dataclasses.field(default_factory=dict)  # time_ms options (fewer repeats for slow cases)


def run_cases(cases: Sequence[Case], device: torch.device, ceilings: Ceilings, *, log=print) -> list[dict]:
    rows = []
    sha, name = git_sha(), device_name(device)
    for case in cases:
        results = {p: measure(fn, device, **case.timing) for p, fn in case.providers.items()}
        ref_ms = results["reference"].median_ms if "reference" in results else None
        for provider, m in results.items():
            row = {
                "op": case.op, "provider": provider, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
                "device": name, "median_ms": round(m.median_ms, 4), "p20_ms": round(m.p20_ms, 4),
                "p80_ms": round(m.p80_ms, 4), "peak_mem_bytes": m.peak_mem_bytes,
                "speedup_vs_reference": round(ref_ms / m.median_ms, 3) if ref_ms else "",
                "gbps": "", "copy_fraction": "", "read_fraction": "", "gflops": "", "matmul_fraction": "",
                "torch": torch.__version__, "git_sha": sha,
            }
            if case.bytes_moved:
                gbps = case.bytes_moved / m.median_ms / 1e6
                row["gbps"], row["copy_fraction"] = round(gbps, 2), round(gbps / ceilings.copy_gbps, 3)
                row["read_fraction"] = round(gbps / ceilings.read_gbps, 3)
            if case.flops:
                gflops = case.flops / m.median_ms / 1e6
                row["gflops"], row["matmul_fraction"] = round(gflops, 1), round(gflops / ceilings.matmul_gflops, 3)
            rows.append(row)
            log(format_row(row))
    return rows


def format_row(row: dict) -> str:
    mem_mib = row["peak_mem_bytes"] / 2**20
    extra = ""
    if row["speedup_vs_reference"] != "":
        extra += f"  x{row['speedup_vs_reference']:<6} vs ref"
    if row["gbps"] != "":
        extra += (f"  {row['gbps']:8.2f} GB/s ({100 * row['copy_fraction']:.0f}% of copy, "
                  f"{100 * row['read_fraction']:.0f}% of read)")
    if row["gflops"] != "":
        extra += f"  {row['gflops']:8.1f} GFLOP/s ({100 * row['matmul_fraction']:.0f}% of matmul)"
    return (f"{row['op']:<14} {row['provider']:<10} {row['shape']:<26} {row['dtype']:<9} "
            f"{row['median_ms']:10.3f} ms  {mem_mib:9.1f} MiB{extra}")


def run(suites: Sequence[str] = SUITES, *, device: Optional[torch.device] = None, quick: bool = False,
        csv_path: Optional[str] = None, log=print) -> list[dict]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ceilings = measure_ceilings(device, quick=quick)
    log(f"device: {device_name(device)}; copy {ceilings.copy_gbps:.1f} GB/s; read (sum) {ceilings.read_gbps:.1f} GB/s; "
        f"float32 matmul {ceilings.matmul_gflops:.1f} GFLOP/s (same run); torch {torch.__version__}; sha {git_sha()}")
    rows = []
    for suite in suites:
        module = importlib.import_module(f"repkern.bench.{suite}")
        suite_rows = run_cases(module.cases(device, quick), device, ceilings, log=log)
        rows += [{**row, "suite": suite} for row in suite_rows]
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        log(f"wrote {csv_path}")
    return rows
