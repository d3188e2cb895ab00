"""Readable output of a benchmark run: one table per suite (op family) and a PNG of the speed-ups.

Each table row is a case × provider other than the reference, next to the reference's time and
peak memory for the same case; the last column is the achieved rate against this device's limit
measured in the same run: GB/s and the fraction of the copy bandwidth for memory-bound cases, GFLOP/s
and the fraction of the float32 torch.matmul rate for compute-bound ones.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Sequence


def _mib(value) -> str:
    return f"{value / 2**20:.1f}"


def _limit(row: dict) -> str:
    if row["gbps"] != "":
        return f"{row['gbps']:.2f} GB/s ({100 * row['copy_fraction']:.0f}% of copy)"
    if row["gflops"] != "":
        return f"{row['gflops']:.1f} GFLOP/s ({100 * row['matmul_fraction']:.0f}% of matmul)"
    return ""


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
        lines = [f"### {suite} ({first['device']}, torch {first['torch']}, commit {first['git_sha']})", "", header]
        for r, ref in entries:
            lines.append(
                f"| {r['op']} | {r['provider']} | {r['shape']} | {r['dtype']} | {r['median_ms']:.3f} | "
                + (f"{ref['median_ms']:.3f}" if ref else "–") + " | "
                + (f"{r['speedup_vs_reference']:.2f}×" if r["speedup_vs_reference"] != "" else "–") + " | "
                + f"{_mib(r['peak_mem_bytes'])} | " + (_mib(ref["peak_mem_bytes"]) if ref else "–") + " | "
                + f"{_limit(r)} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(rows: Sequence[dict], path: str) -> str:
    """Horizontal bars of each provider's speed-up over the reference (log scale, 1× marked), one panel
    per suite; cases without a reference are left out. Returns ``path``."""
    from repkern.plots import pyplot

    plt = pyplot()
    cases = {suite: [(r, ref) for r, ref in entries if ref] for suite, entries in _cases(rows).items()}
    cases = {suite: entries for suite, entries in cases.items() if entries}
    if not cases:
        raise ValueError("rows: no case has a reference to compare with")
    heights = [max(1.6, 0.28 * len(entries) + 0.9) for entries in cases.values()]
    fig, axes = plt.subplots(len(cases), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
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
    fig.suptitle(f"{first['device']}, torch {first['torch']}, commit {first['git_sha']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
