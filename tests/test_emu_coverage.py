"""Emulator coverage of the CUDA kernels' barriers and warp collectives (see tests/emu_coverage.py):
the source scanner on known snippets, and the check over the whole emulator test run."""

from __future__ import annotations

import pytest

from repkern import _native
from tests import emu_coverage as cov

SNIPPET = """
#include "x.h"  // __syncthreads() in a comment or "__syncthreads()" in a string is not a site
namespace a {
namespace {
struct S { int f() { return 0; } };
template <int N>
__device__ __forceinline__ void helper(double (&v)[N]) {
  v[0] = __shfl_xor_sync(kFullMask, v[0], 1);
  __syncthreads();
}
__device__ void lone() { __syncwarp(); }
template <typename T, bool B>
__global__ void __launch_bounds__(256, 2)
    kern(const T* x, int n) {
  const char* text = "for (;;) { __syncthreads(); }";  // nor is __syncwarp() here
  const char quote = '"';
  __syncthreads();
  for (int i = __shfl_sync(kFullMask, 0, 0); i < __ballot_sync(kFullMask, 1); ++i) {
    double v[2];
    if (i) helper(v);
  }
  for (int k = 0; k < 4; ++k) x += __shfl_down_sync(kFullMask, k, 1);
  while (n--)
    if (n) {
      __syncthreads();
    } else
      __syncwarp();
  do {
    n = __any_sync(kFullMask, n);
  } while (__all_sync(kFullMask, n));
  lone();
  __syncthreads();
}
}  // namespace
}  // namespace a
"""


def _scan(tmp_path, text):
    path = tmp_path / "cuda" / "k.cu"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return {s.line: s for s in cov.scan_sites([path], root=tmp_path)}


def test_scanner_finds_sites_loops_and_helpers(tmp_path):
    sites = _scan(tmp_path, SNIPPET)
    lines = SNIPPET.split("\n")

    def line_of(text, nth=0):
        return [i + 1 for i, line in enumerate(lines) if text in line][nth]

    expect = {  # line: (function, kernel, in_loop, repeats)
        line_of("v[0] = __shfl_xor_sync"): ("helper", False, False, True),  # called from a loop
        line_of("  __syncthreads();", 0): ("helper", False, False, True),
        line_of("__syncwarp(); }"): ("lone", False, False, False),  # called once, not in a loop
        line_of("  __syncthreads();", 1): ("kern", True, False, False),
        line_of("for (int i = __shfl_sync"): ("kern", True, True, True),  # the ballot in the condition repeats
        line_of("x += __shfl_down_sync"): ("kern", True, True, True),  # brace-less loop body
        line_of("      __syncthreads();"): ("kern", True, True, True),  # while body: an if
        line_of("      __syncwarp();"): ("kern", True, True, True),  # ... and its else
        line_of("n = __any_sync"): ("kern", True, True, True),
        line_of("while (__all_sync"): ("kern", True, True, True),
        line_of("  __syncthreads();", 3): ("kern", True, False, False),
    }
    got = {line: (s.function, s.kernel, s.in_loop, s.repeats) for line, s in sites.items()}
    assert got == expect
    assert sites[line_of("for (int i = __shfl_sync")].what == "__shfl_sync+__ballot_sync"
    assert all(s.file == "cuda/k.cu" for s in sites.values())


def test_scanner_init_of_a_for_runs_once(tmp_path):
    sites = _scan(tmp_path, "__global__ void k() {\n  for (int i = __shfl_sync(m, 0, 0);\n       i < 3; ++i) {}\n}\n")
    (site,) = sites.values()
    assert site.line == 2 and not site.in_loop and not site.repeats


def test_scanner_agrees_with_a_plain_text_count():
    """Every textual rendezvous call in csrc/cuda is a site of the scan (per line)."""
    import re

    sites = {s.key for s in cov.scan_sites()}
    pattern = re.compile(r"\b(" + "|".join(cov.RENDEZVOUS) + r")\s*\(")
    textual = set()
    for path in sorted((cov.CSRC / "cuda").glob("*.cu*")):
        for i, line in enumerate(path.read_text().split("\n"), start=1):
            code = line.split("//")[0]
            if pattern.search(code):
                textual.add(f"cuda/{path.name}:{i}")
    assert sites == textual


def test_coverage_problems_are_named():
    sites = [
        cov.Site("cuda/a.cu", 10, "__syncthreads", "k", True, False, False),
        cov.Site("cuda/a.cu", 20, "__syncthreads", "k", True, True, True),
        cov.Site("cuda/r.cuh", 5, "__shfl_xor_sync", "warp_sum", False, False, True),
        cov.Site("cuda/a.cu", 30, "__syncthreads", "k", True, True, True),
    ]
    covered = {"cuda/a.cu:20": {"k": 1}, "cuda/r.cuh:5": {"k": 1, "other": 3}, "cuda/a.cu:30": {"k": 2},
               "cuda/a.cu:99": {"k": 1}, "emu/selftest.cu:1": {"x": 1}}
    problems = cov.coverage_problems(sites, covered)
    assert problems == [
        "cuda/a.cu:10 __syncthreads in k: never reached by the emulator tests",
        "cuda/a.cu:20 __syncthreads in k: inside a loop, but no block passed it twice (reached by k (1x))",
        "cuda/a.cu:99: passed by the emulator but not found by the source scan (tests/emu_coverage.py)",
    ]
    assert cov.csrc_relative("/x/y/csrc/cuda/sae.cu") == "cuda/sae.cu"


def test_every_kernel_rendezvous_is_exercised(emu_coverage_partial):
    """Over the whole emulator test run (this test runs last): every barrier and warp collective in
    csrc/cuda was reached, and one in a loop (or in a helper called from a loop) was passed twice by
    one block. Skipped for partial runs (-k/-m subsets, single files, failures)."""
    if emu_coverage_partial is not None:
        pytest.skip(f"coverage is checked over the whole emulator test set only: {emu_coverage_partial}")
    if not _native.has_emulator():
        pytest.skip("no repkern._emu in this build")
    sites = cov.scan_sites()
    problems = cov.coverage_problems(sites, cov.emulator_coverage(_native.emu_module()))
    assert not problems, "emulator tests leave rendezvous points unexercised:\n  " + "\n  ".join(problems)
