"""pytest-benchmark view of the Gram suite (not part of the test suite):

    python -m pytest benchmarks --benchmark-only
"""

import pytest
import torch

import repkern
from repkern import reference

PROVIDERS = {"repkern": repkern.gram, "reference": reference.gram}


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
@pytest.mark.parametrize("kernel", ["linear", "cosine", "rbf"])
@pytest.mark.parametrize("n,d", [(1024, 128), (2048, 768)])
def test_gram(benchmark, provider, kernel, n, d):
    x = torch.randn(n, d)
    benchmark.group = f"gram[{kernel}] n={n} d={d}"
    result = benchmark(PROVIDERS[provider], x, kernel)
    assert result.shape == (n, n)
