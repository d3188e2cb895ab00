"""pytest-benchmark view of the benchmark suites (not part of the test suite): the same case lists as
``repkern bench`` (repkern.bench.<suite>.cases), one benchmark per case and provider.

    python -m pytest benchmarks --benchmark-only                      # the --quick shapes, CPU
    REPKERN_BENCH_FULL=1 python -m pytest benchmarks --benchmark-only  # the full shapes
    REPKERN_BENCH_DEVICE=cuda python -m pytest benchmarks --benchmark-only
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from repkern.bench import SUITES

QUICK = os.environ.get("REPKERN_BENCH_FULL", "") in ("", "0")
DEVICE = torch.device(os.environ.get("REPKERN_BENCH_DEVICE", "cpu"))


def _params():
    for suite in SUITES:
        for case in importlib.import_module(f"repkern.bench.{suite}").cases(DEVICE, QUICK):
            for provider in case.providers:
                yield pytest.param(case, provider, id=f"{suite}:{case.op}:{case.shape}:{case.dtype}:{provider}")


@pytest.fixture(scope="module")
def built():
    cache = {}

    def make(case):
        if id(case) not in cache:
            cache.clear()  # one case's inputs alive at a time
            cache[id(case)] = case.make()
        return cache[id(case)]

    return make


@pytest.mark.parametrize("case, provider", list(_params()))
def test_bench(benchmark, built, case, provider):
    benchmark.group = f"{case.op} {case.shape} {str(case.dtype).replace('torch.', '')}"
    fn = built(case)[provider]
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize(DEVICE)

        benchmark(timed)
    else:
        benchmark(fn)
