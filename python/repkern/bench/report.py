"""Readable output of a benchmark run: one table per suite (op family) and a PNG of the speed-ups.

Each table row is a case × provider other than the reference, next to the reference's time and
peak memory for the same case; the last column is the achieved rate against this device's limit
measured in the same run: GB/s and the fraction of the copy bandwidth for memory-bound cases, GFLOP/s
and the fraction of the torch.matmul rate in the row's dtype for compute-bound ones. Rows skipped
(out of memory) are listed as such; :func:`compare` puts two runs side by side.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Optional, Sequence

from repkern import plots


def _mib(value) -> str:
    return f"{value / 2**20:.1f}"


def _ok(row: dict) -> bool:
    return row.get("status", "ok") in ("ok", "", None)


def _limit(row: dict) -> str:
    if row["gbps"] != "":
        return f"{row['gbps']:.2f} GB/s ({100 * row['copy_fraction']:.0f}% of copy)"
    if row["gflops"] != "":
        share = row.get("matmul_fraction", "")
        rate = f"{row['gflops']:.1f} GFLOP/s"
        return rate + (f" ({100 * share:.0f}% of {row['dtype']} matmul)" if share != "" else "")
    return ""


def _where(row: dict) -> str:
    return row.get("device_name") or row["device"]


def _cases(rows: Sequence[dict]) -> dict:
    """suite -> [(row, reference row of the same case or None)] for every non-reference provider."""
    reference = {(r["op"], r["shape"], r["dtype"]): r for r in rows if r["provider"] == "reference"}
    out = defaultdict(list)
    for r in rows:
        if r["provider"] != "reference":
            out[r["suite"]].append((r, reference.get((r["op"], r["shape"], r["dtype"]))))
    return out


def tables(rows: Sequence[dict]) -> str:
    """Markdown tables, one per suite."""
    header = ("| case | provider | shape | dtype | ms | reference ms | speed-up | peak MiB | reference peak MiB "
              "| rate (share of this device's limit) |\n|---|---|---|---|---:|---:|---:|---:|---:|---|")
    parts = []
    for suite, entries in _cases(rows).items():
        first = entries[0][0]
        lines = [f"### {suite} ({_where(first)}, torch {first['torch']}, commit {first['git_sha']})", "", header]
        for r, ref in entries:
            ref_ms = (f"{ref['median_ms']:.3f}" if _ok(ref) else ref["status"]) if ref else "–"
            ref_mib = (_mib(ref["peak_mem_bytes"]) if _ok(ref) else "–") if ref else "–"
            if not _ok(r):
                lines.append(f"| {r['op']} | {r['provider']} | {r['shape']} | {r['dtype']} | {r['status']} | "
                             f"{ref_ms} | – | – | {ref_mib} | |")
                continue
            lines.append(
                f"| {r['op']} | {r['provider']} | {r['shape']} | {r['dtype']} | {r['median_ms']:.3f} | {ref_ms} | "
                + (f"{r['speedup_vs_reference']:.2f}×" if r["speedup_vs_reference"] != "" else "–") + " | "
                + f"{_mib(r['peak_mem_bytes'])} | {ref_mib} | {_limit(r)} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(rows: Sequence[dict], path: Optional[str] = None):
    """Horizontal bars of each provider's speed-up over the reference (log scale, 1× marked), one panel
    per suite; cases without a reference are left out. Returns the ``matplotlib.figure.Figure`` (made
    without pyplot), saved to ``path`` when given."""
    cases = {suite: [(r, ref) for r, ref in entries if ref and _ok(ref) and _ok(r)]
             for suite, entries in _cases(rows).items()}
    cases = {suite: entries for suite, entries in cases.items() if entries}
    if not cases:
        raise ValueError("rows: no case has a reference to compare with")
    heights = [max(1.6, 0.28 * len(entries) + 0.9) for entries in cases.values()]
    fig = plots.new_figure(figsize=(9, sum(heights)))
    axes = fig.subplots(len(cases), 1, squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, (suite, entries) in zip(axes[:, 0], cases.items()):
        labels = [f"{r['op']} {r['provider']} {r['shape']} {r['dtype']}" for r, _ in entries]
        speedups = [ref["median_ms"] / r["median_ms"] for r, ref in entries]
        ax.barh(range(len(entries)), speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
        ax.set_yticks(range(len(entries)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{suite}: speed-up over the pure-PyTorch reference", fontsize=9)
        ax.grid(axis="x", alpha=0.3, which="both")
    first = next(iter(cases.values()))[0][0]
    fig.suptitle(f"{_where(first)}, torch {first['torch']}, commit {first['git_sha']}", fontsize=9)
    fig.tight_layout()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        plots.save_figure(fig, path, dpi=120)
    return fig


# ---- two runs side by side -----------------------------------------------------------------

REQUIRED_COLUMNS = ("op", "provider", "shape", "dtype", "median_ms")
NUMERIC_COLUMNS = ("median_ms", "p20_ms", "p80_ms", "peak_mem_bytes", "speedup_vs_reference", "gbps", "copy_fraction",
                   "read_fraction", "gflops", "matmul_fraction", "matmul_ceiling_gflops", "roofline_ms",
                   "roofline_fraction")


class BenchFileError(Exception):
    """A file given to compare is missing, unreadable or not a `repkern bench` result."""


def _number(value):
    if value is None or value == "":
        return ""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _normalize(rows: list, path: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in REQUIRED_COLUMNS if not isinstance(row, dict) or c not in row]
        if missing:
            raise BenchFileError(f"{path}: not a repkern bench result (row {i + 1} lacks {', '.join(missing)})")
        row = {k: ("" if v is None else v) for k, v in row.items()}
        for column in NUMERIC_COLUMNS:
            if column in row:
                row[column] = _number(row[column])
        out.append(row)
    return out


def load(path: str) -> tuple[dict, list[dict]]:
    """(header, rows) of a `repkern bench` result: its JSON file, or its CSV (then the header is what the
    rows' columns say). Raises BenchFileError with a readable message otherwise."""
    import csv
    import io
    import json

    if not os.path.exists(path):
        raise BenchFileError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchFileError(f"{path}: cannot read it as text ({exc})") from None
    if text.lstrip().startswith("{"):
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise BenchFileError(f"{path}: not a repkern bench result (invalid JSON: {exc})") from None
        if payload.get("format") != "repkern-bench" or not isinstance(payload.get("rows"), list):
            raise BenchFileError(f"{path}: not a repkern bench result (a JSON file without format 'repkern-bench' "
                                 "and a list of rows)")
        header = payload.get("header") if isinstance(payload.get("header"), dict) else {}
        return header, _normalize(payload["rows"], path)
    try:
        reader = csv.DictReader(io.StringIO(text))
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise BenchFileError(f"{path}: not a repkern bench result (no column {', '.join(missing)}; "
                                 "expected the CSV or JSON that `repkern bench` writes)")
        rows = _normalize(list(reader), path)
    except csv.Error as exc:
        raise BenchFileError(f"{path}: not a repkern bench result (CSV: {exc})") from None
    first = rows[0] if rows else {}
    header = {k: first[k] for k in ("device", "device_name", "driver", "torch", "git_sha") if first.get(k)}
    return header, rows


def _key(row: dict) -> tuple:
    return (row["op"], row["provider"], row["shape"], row["dtype"])


def _time(row: dict) -> str:
    if not _ok(row):
        return str(row["status"])
    return f"{row['median_ms']:.3f}" if isinstance(row["median_ms"], float) else "–"


def _share(row: dict) -> str:
    """The row's fraction of its own run's ceiling: the matmul in its dtype, else the copy."""
    if not _ok(row):
        return "–"
    matmul, copy = row.get("matmul_fraction", ""), row.get("copy_fraction", "")
    if isinstance(matmul, float):
        return f"{100 * matmul:.0f}% of {row['dtype']} matmul"
    if isinstance(copy, float):
        return f"{100 * copy:.0f}% of copy"
    return "–"


def _describe(label: str, path: str, header: dict) -> str:
    parts = [header.get("device_name") or header.get("device") or "device not recorded"]
    if header.get("driver"):
        parts[0] += f" (driver {header['driver']})"
    if header.get("torch"):
        parts.append(f"torch {header['torch']}")
    if header.get("repkern"):
        parts.append(f"repkern {header['repkern']}")
    if header.get("git_sha"):
        parts.append(f"commit {header['git_sha']}")
    return f"{label}: {path}: " + ", ".join(parts)


def compare(a: tuple[dict, list[dict]], b: tuple[dict, list[dict]], path_a: str = "A", path_b: str = "B") -> str:
    """Two runs (``load`` results) side by side per (op, provider, shape, dtype): time in A and in B,
    B/A, and each run's fraction of its own ceiling; rows present in one run only are listed apart."""
    (header_a, rows_a), (header_b, rows_b) = a, b
    lines = [_describe("A", path_a, header_a), _describe("B", path_b, header_b),
             "B/A: B's median time over A's (below 1: B is faster)", ""]
    index_a, index_b, duplicates = {}, {}, 0
    for rows, index in ((rows_a, index_a), (rows_b, index_b)):
        for r in rows:
            if _key(r) in index:
                duplicates += 1
            else:
                index[_key(r)] = r
    both = [k for k in index_a if k in index_b]
    lines += ["| op | provider | shape | dtype | A ms | B ms | B/A | A: share of its ceiling "
              "| B: share of its ceiling |", "|---|---|---|---|---:|---:|---:|---|---|"]
    for k in both:
        ra, rb = index_a[k], index_b[k]
        ratio = "–"
        if _ok(ra) and _ok(rb) and isinstance(ra["median_ms"], float) and isinstance(rb["median_ms"], float) \
                and ra["median_ms"] > 0:
            ratio = f"{rb['median_ms'] / ra['median_ms']:.3f}"
        lines.append(f"| {' | '.join(k)} | {_time(ra)} | {_time(rb)} | {ratio} | {_share(ra)} | {_share(rb)} |")
    if not both:
        lines.append("| (no row in both runs) | | | | | | | | |")
    for label, path, index, other in (("A", path_a, index_a, index_b), ("B", path_b, index_b, index_a)):
        only = [k for k in index if k not in other]
        plural = "s" if len(only) != 1 else ""
        lines += ["", f"Only in {label} ({path}): {len(only)} row{plural}" + (":" if only else "")]
        if only:
            lines += [f"| op | provider | shape | dtype | {label} ms | share of its ceiling |",
                      "|---|---|---|---|---:|---|"]
            lines += [f"| {' | '.join(k)} | {_time(index[k])} | {_share(index[k])} |" for k in only]
    if duplicates:
        plural = "s" if duplicates != 1 else ""
        lines += ["", f"({duplicates} repeated row{plural} ignored: the first of each key is used)"]
    return "\n".join(lines)
