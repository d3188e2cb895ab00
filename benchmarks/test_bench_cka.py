"""pytest-benchmark view of the CKA suite (not part of the test suite):

    python -m pytest benchmarks --benchmark-only
"""

import pytest
import torch

import repkern
from repkern import reference

PROVIDERS = {"repkern": repkern.cka_matrix, "reference": reference.cka_matrix}


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_matrix(benchmark, provider, kernel):
    layers = [torch.randn(1024, 128) for _ in range(4)]
    benchmark.group = f"cka_matrix[{kernel}] 4 layers n=1024 d=128"
    result = benchmark(PROVIDERS[provider], layers, None, kernel, debiased=True)
    assert result.shape == (4, 4)
