"""pytest-benchmark view of the sparsity suite (not part of the test suite):

    python -m pytest benchmarks --benchmark-only
"""

import pytest
import torch

import repkern
from repkern import reference

PROVIDERS = {"repkern": repkern.sparsity_stats, "reference": reference.sparsity_stats}


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("rows,d", [(4096, 1024)])
def test_sparsity_stats(benchmark, provider, ordered, rows, d):
    x = torch.relu(torch.randn(rows, d) - 0.5)
    benchmark.group = f"sparsity_stats ordered={ordered} {rows}x{d}"
    result = benchmark(PROVIDERS[provider], x, ordered=ordered)
    assert result.l0.shape == (rows,)
