"""pytest-benchmark view of the streaming suite (not part of the test suite):

    python -m pytest benchmarks --benchmark-only
"""

import pytest
import torch

import repkern
from repkern import reference


@pytest.mark.parametrize("provider", ["repkern", "loop"])
def test_cka_test_permutations(benchmark, provider):
    x, y = torch.randn(512, 64), torch.randn(512, 32)
    benchmark.group = "cka_test 100 permutations n=512"
    if provider == "repkern":
        result = benchmark(lambda: repkern.cka_test(x, y, n_permutations=100, n_bootstrap=0))
        assert result.null.shape == (100,)
    else:
        perms, _ = reference.replicate_indices(512, 100, 0, 0)
        k, l = reference.gram(x), reference.gram(y)
        result = benchmark(lambda: [reference.cka_from_grams(k, l[p][:, p]) for p in perms])
        assert len(result) == 100


@pytest.mark.parametrize("provider", ["repkern", "reference"])
def test_streaming_cka(benchmark, provider):
    xs = [torch.randn(4096, 64) for _ in range(2)]
    benchmark.group = "StreamingCKA 2 layers N=4096 d=64 (4 batches) vs one-shot reference"

    def stream():
        acc = repkern.StreamingCKA()
        for batch in zip(*[t.split(1024) for t in xs]):
            acc.update(batch)
        return acc.compute()

    fn = stream if provider == "repkern" else lambda: reference.cka_matrix(xs, None, "linear")
    assert benchmark(fn).shape == (2, 2)
