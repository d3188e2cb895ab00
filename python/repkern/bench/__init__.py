"""Benchmark suite: repkern against the pure-PyTorch reference, same run, same device.

Every case reports time (median/p20/p80), peak memory, the speed-up over the
reference, and how close the kernel gets to this device's limits measured in the
same run: GB/s against a large copy (and against a large sum, the single-read
ceiling) for memory-bound work, GFLOP/s against a large matmul in the case's own
dtype for compute-bound work.

Each suite module ``repkern.bench.<suite>`` has ``cases(device, quick, dtypes=None)``
returning :class:`Case` objects. Listing cases allocates nothing: a case holds a
builder that allocates its inputs right before the case is timed (and they are
released after it), so GPU-sized cases can be listed anywhere, and a case or provider
that runs out of memory becomes a skipped row instead of ending the run.

Run: ``repkern bench`` (``python -m repkern bench``), or ``python -m pytest benchmarks --benchmark-only``
(the same cases through pytest-benchmark).
Results: a CSV (:data:`CSV_FIELDS`) and a JSON file next to it (the same rows and a
header: device, driver, versions, build commit, CPU, threads, ceilings).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
from typing import Callable, Optional, Sequence, Union

import torch

from repkern._files import atomic_write
from repkern.bench import roofline
from repkern.bench.timing import (
    Ceilings,
    build_sha,
    cpu_model,
    device_name,
    driver_version,
    dtype_name,
    is_out_of_memory,
    l2_flush_bytes,
    measure,
    measure_ceilings,
)

SUITES = ("gram", "sae", "cka", "cka_test", "sparsity", "streaming", "knn", "shape", "cca", "rsa")  # repkern.bench.<suite>.cases(device, quick, dtypes, full)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

CSV_FIELDS = (
    "op", "provider", "shape", "dtype", "device", "device_name", "status", "median_ms", "p20_ms", "p80_ms",
    "peak_mem_bytes", "speedup_vs_reference", "gbps", "copy_fraction", "read_fraction", "gflops", "matmul_fraction",
    "matmul_ceiling_gflops", "roofline_ms", "roofline_fraction", "torch", "driver", "cuda_runtime", "git_sha",
    "suite", "note",
)
OK = "ok"
SKIPPED_OOM = "skipped (out of memory)"
FORMAT = "repkern-bench"  # the JSON file's "format"
FORMAT_VERSION = 1


@dataclasses.dataclass
class Case:
    """One problem, several providers. `bytes_moved` / `flops`: the floor of the
    work (inputs read once, outputs written once), used for GB/s and GFLOP/s.

    ``providers``: the provider names and ``build()``, called right before the case
    is timed, allocates the inputs and returns {name: zero-argument callable}. A dict
    of callables with no ``build`` is an eager case (inputs already allocated)."""

    op: str
    shape: str
    dtype: torch.dtype
    providers: Union[Sequence[str], dict]
    build: Optional[Callable[[], dict]] = None
    bytes_moved: Optional[float] = None
    flops: Optional[float] = None
    timing: dict = dataclasses.field(default_factory=dict)  # time_ms options (fewer repeats for slow cases)
    model: Optional[roofline.Model] = None  # the "repkern" provider's floor (GPU cases that run CUDA kernels)

    def __post_init__(self):
        if self.build is None:
            if not isinstance(self.providers, dict):
                raise TypeError("Case: give build=... or providers as a dict of callables")
            fns = dict(self.providers)
            self.build = lambda: fns
        self.providers = tuple(self.providers)

    def make(self) -> dict:
        fns = self.build()
        if tuple(fns) != self.providers:
            raise ValueError(f"{self.op} {self.shape}: build() returned providers {tuple(fns)}, "
                             f"declared {self.providers}")
        return fns


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on `device` (inputs are generated where they are used)."""
    return torch.Generator(device=device).manual_seed(seed)


def select_dtypes(dtypes: Optional[Sequence[torch.dtype]], default: Sequence[torch.dtype]) -> list[torch.dtype]:
    """The dtypes a family of cases runs in: the requested ones, else the suite's default."""
    return list(default) if dtypes is None else list(dict.fromkeys(dtypes))


def environment(device: torch.device) -> dict:
    """What a result depends on besides the code: the header of the JSON file (ceilings added by `run`)."""
    import repkern

    sha, sha_source = build_sha()
    info = {k: v for k, v in repkern.build_info().items() if k != "cuda_devices"}
    env = {
        "device": str(device),
        "device_name": device_name(device),
        "driver": driver_version() if device.type == "cuda" else "",
        "cuda_runtime": torch.version.cuda or "",
        "torch": torch.__version__,
        "repkern": repkern.__version__,
        "git_sha": sha,
        "git_sha_source": sha_source,
        "repkern_build": info,
        "backend": os.environ.get("REPKERN_BACKEND", "auto") or "auto",
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if getattr(torch.version, "hip", None):
        env["hip_runtime"] = torch.version.hip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_properties"] = {
            "compute_capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": int(props.total_memory),
            "multi_processor_count": int(props.multi_processor_count),
            "L2_cache_size": int(getattr(props, "L2_cache_size", 0) or 0),
        }
        env["cuda_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        env["l2_flush_bytes"] = l2_flush_bytes(device)
    return env


def _release(device: torch.device) -> None:
    """Frees what a finished or failed case held (the caching allocator's blocks included)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _oom_note(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return first[:300]


def _row(case: Case, provider: str, device: torch.device, env: dict, ceilings: Ceilings) -> dict:
    row = dict.fromkeys(CSV_FIELDS, "")
    dtype = dtype_name(case.dtype)
    mm = ceilings.matmul(dtype)
    row.update(op=case.op, provider=provider, shape=case.shape, dtype=dtype, device=str(device),
               device_name=env["device_name"], torch=env["torch"], driver=env["driver"],
               cuda_runtime=env["cuda_runtime"], git_sha=env["git_sha"],
               matmul_ceiling_gflops=round(mm, 1) if mm else "")
    return row


def run_case(case: Case, device: torch.device, ceilings: Ceilings, env: dict, *, log=print) -> list[dict]:
    """Builds the case's inputs, times each provider, releases the inputs. Running out of memory
    while building skips every provider; while timing one provider, that provider only."""
    skipped = fns = None
    try:
        fns = case.make()
    except Exception as exc:  # noqa: BLE001 - only an allocation failure is turned into a row
        if not is_out_of_memory(exc):
            raise
        skipped = _oom_note(exc)
    results: dict = {}
    if skipped is not None:
        _release(device)
        results = dict.fromkeys(case.providers, skipped)
    else:
        for provider in case.providers:
            note = None
            try:
                results[provider] = measure(fns[provider], device, **case.timing)
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc):
                    raise
                note = _oom_note(exc)
            if note is not None:
                results[provider] = note
                _release(device)
        fns = None
        _release(device)
    ref = results.get("reference")
    ref_ms = None if ref is None or isinstance(ref, str) else ref.median_ms
    rows = []
    for provider, m in results.items():
        row = _row(case, provider, device, env, ceilings)
        if isinstance(m, str):
            row.update(status=SKIPPED_OOM, note=m)
        else:
            row.update(status=OK, median_ms=round(m.median_ms, 4), p20_ms=round(m.p20_ms, 4),
                       p80_ms=round(m.p80_ms, 4), peak_mem_bytes=m.peak_mem_bytes,
                       speedup_vs_reference=round(ref_ms / m.median_ms, 3) if ref_ms else "")
            if case.bytes_moved:
                gbps = case.bytes_moved / m.median_ms / 1e6
                row["gbps"], row["copy_fraction"] = round(gbps, 2), round(gbps / ceilings.copy_gbps, 3)
                row["read_fraction"] = round(gbps / ceilings.read_gbps, 3)
            if case.flops:
                gflops = case.flops / m.median_ms / 1e6
                row["gflops"] = round(gflops, 1)
                mm = ceilings.matmul(case.dtype)
                row["matmul_fraction"] = round(gflops / mm, 3) if mm else ""
            if case.model is not None and device.type == "cuda" and provider == "repkern":
                row.update(roofline_columns(case.model, m.median_ms, ceilings))
        rows.append(row)
        log(format_row(row))
    return rows


def roofline_columns(model: roofline.Model, median_ms: float, ceilings: Ceilings) -> dict:
    """The row's roofline columns: the model's time at this device's measured ceilings
    (:func:`roofline.expected_s`) and its share of the measured time (1: at the roofline)."""
    expected_ms = roofline.expected_s(model, ceilings.copy_gbps, ceilings.matmul) * 1e3
    return {"roofline_ms": round(expected_ms, 4), "roofline_fraction": round(expected_ms / median_ms, 3)}


def run_cases(cases: Sequence[Case], device: torch.device, ceilings: Ceilings, *, env: Optional[dict] = None,
              log=print) -> list[dict]:
    env = env or environment(device)
    rows = []
    for case in cases:
        rows += run_case(case, device, ceilings, env, log=log)
    return rows


def format_row(row: dict) -> str:
    head = f"{row['op']:<14} {row['provider']:<10} {row['shape']:<26} {row['dtype']:<9} "
    if row.get("status", OK) != OK:
        return head + f"{row['status']}: {row.get('note', '')}"
    mem_mib = row["peak_mem_bytes"] / 2**20
    extra = ""
    if row["speedup_vs_reference"] != "":
        extra += f"  x{row['speedup_vs_reference']:<6} vs ref"
    if row["gbps"] != "":
        extra += (f"  {row['gbps']:8.2f} GB/s ({100 * row['copy_fraction']:.0f}% of copy, "
                  f"{100 * row['read_fraction']:.0f}% of read)")
    if row["gflops"] != "":
        extra += f"  {row['gflops']:8.1f} GFLOP/s"
        if row["matmul_fraction"] != "":
            extra += f" ({100 * row['matmul_fraction']:.0f}% of {row['dtype']} matmul)"
    if row.get("roofline_fraction", "") != "":
        extra += f"  roofline {row['roofline_ms']:.3f} ms ({100 * row['roofline_fraction']:.0f}% of it)"
    return head + f"{row['median_ms']:10.3f} ms  {mem_mib:9.1f} MiB{extra}"


def ceilings_line(env: dict, ceilings: Ceilings) -> str:
    mm = ", ".join(f"{name} {gflops:.1f}" for name, gflops in ceilings.matmul_gflops.items())
    driver = f"; driver {env['driver']}" if env.get("driver") else ""
    return (f"device: {env['device_name']} ({env['device']}{driver}); copy {ceilings.copy_gbps:.1f} GB/s; "
            f"read (sum) {ceilings.read_gbps:.1f} GB/s; matmul GFLOP/s: {mm} (same run); torch {env['torch']}; "
            f"repkern {env['repkern']} at {env['git_sha']} ({env['git_sha_source']})")


class Results(list):
    """The rows of a run (a list of dicts), with the run's header as ``.header``."""

    header: Optional[dict] = None


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def run(suites: Sequence[str] = SUITES, *, device: Union[None, str, torch.device] = None, quick: bool = False,
        full: bool = False, dtypes: Optional[Sequence[torch.dtype]] = None, csv_path: Optional[str] = None,
        json_path: Optional[str] = None, log=print) -> Results:
    """Runs the suites on `device` (default: CUDA if available, else the CPU) in `dtypes` (default: each
    suite's own; ``full``: also the largest cases), writes the CSV and the JSON next to it (``json_path``:
    another place)."""
    device = resolve_device(device)
    case_lists = {suite: importlib.import_module(f"repkern.bench.{suite}").cases(device, quick, dtypes, full=full)
                  for suite in suites}
    return run_suites(case_lists, device, quick=quick, dtypes=dtypes, csv_path=csv_path, json_path=json_path,
                      log=log)


def run_suites(case_lists: dict, device: torch.device, *, quick: bool = False,
               dtypes: Optional[Sequence[torch.dtype]] = None, csv_path: Optional[str] = None,
               json_path: Optional[str] = None, log=print) -> Results:
    """Runs {suite: [Case]} (see `run`): ceilings first, in every dtype the cases use."""
    device = resolve_device(device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        env = environment(device)
        used = [case.dtype for cases in case_lists.values() for case in cases]
        ceilings = measure_ceilings(device, quick=quick, dtypes=used)
        log(ceilings_line(env, ceilings))
        for note in ceilings.notes:
            log(f"note: {note}")
        rows = Results()
        for suite, cases in case_lists.items():
            if not cases:
                log(f"{suite}: no case in the requested dtypes")
                continue
            rows += [{**row, "suite": suite} for row in run_cases(cases, device, ceilings, env=env, log=log)]
    rows.header = {
        **env,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick, "suites": list(case_lists),
        "dtypes": [dtype_name(d) for d in dtypes] if dtypes is not None else "suite defaults",
        "ceilings": ceilings.as_dict(),
    }
    if csv_path:
        write_csv(rows, csv_path)
        log(f"wrote {csv_path}")
    json_path = json_path or (os.path.splitext(csv_path)[0] + ".json" if csv_path else None)
    if json_path:
        write_json(rows, rows.header, json_path)
        log(f"wrote {json_path}")
    return rows


def write_csv(rows: Sequence[dict], path: str) -> None:
    with atomic_write(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _json_value(value):
    if value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


def write_json(rows: Sequence[dict], header: dict, path: str) -> None:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "header": header,
               "rows": [{k: _json_value(row.get(k, "")) for k in CSV_FIELDS} for row in rows]}
    text = json.dumps(payload, indent=1)  # encoded before anything is written
    with atomic_write(path, "w") as f:
        f.write(text)
        f.write("\n")
