"""pytest-benchmark view of the SAE suite (not part of the test suite):

    python -m pytest benchmarks --benchmark-only
"""

import pytest
import torch

import repkern
from repkern import reference

PROVIDERS = {"repkern": repkern.sae_encode, "reference": reference.sae_encode}


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
@pytest.mark.parametrize("k", [32, 64])
def test_sae_topk_encode(benchmark, provider, k):
    n, d_in, d_sae = 2048, 512, 16384
    x, W_enc, b_enc = torch.randn(n, d_in), torch.randn(d_in, d_sae) / d_in**0.5, torch.zeros(d_sae)
    benchmark.group = f"sae_encode[topk->sparse] N={n} d_in={d_in} d_sae={d_sae} k={k}"
    codes = benchmark(PROVIDERS[provider], x, W_enc, b_enc, activation="topk", k=k, output="sparse")
    assert codes.values.shape == (n, k)
