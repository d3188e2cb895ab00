"""Shape-metric benchmarks: ``repkern.shape_distance`` and ``StreamingAlignment``'s shape distance.

Providers:
  repkern          shape_distance (one-shot) / StreamingAlignment fed batch by batch, then
                   compute("shape_distance", alpha=0.5)
  repkern-oneshot  (streaming cases) shape_distance over the concatenated batches: all rows in memory
  reference        repkern.reference.shape_distance: netrep's steps on the data matrices (SVD of the
                   padded, centered data; whitened copies; the rotation formed)

Cases:
  shape_distance alpha=0.5, n=4096, d=512 vs 384 (a layer comparison: zero-padding)
  StreamingAlignment shape_distance, d=256 vs 192, batches of 4096, n=100000 and n=25000: the same
    peak memory at both n (the state is per pair of layers, d_a·d_b float64; the batches come from a
    fixed pool of 4 pre-built batches, shifted per batch, so inputs are O(pool) too)
GPU (CUDA device): one-shot n=16384, d=1024 vs 768; streaming d=1024 vs 768, batches of 16384,
  n=1000000 and 250000.
Default dtype float32; ``dtypes`` runs every case in each of them. FLOPs: the Gram blocks (2n(d1+d2)²/2
for one-shot and streaming; float64 products in both).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import repkern
from repkern import reference
from repkern.bench import Case, generator, select_dtypes

FEW = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}
ONCE = {"warmup": 0, "min_repeats": 1, "max_repeats": 1}


def pair(n: int, d1: int, d2: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Two related representations (y a noisy nonlinear map of x), mean-shifted."""
    g = generator(device, seed)
    x = torch.randn(n, d1, generator=g, device=device)
    w = torch.randn(d1, d2, generator=g, device=device) / d1**0.5
    y = torch.tanh(x @ w) + 0.5 * torch.randn(n, d2, generator=g, device=device) + 1.0
    return (x + 3.0).to(dtype), y.to(dtype)


def _gram_flops(n: int, d1: int, d2: int) -> float:
    return float(n) * (d1 * d1 + d2 * d2 + 2 * d1 * d2)  # A, B, C: 2·n·d·d' each, A and B symmetric halves


def _one_shot_case(n, d1, d2, dtype, device, timing) -> Case:
    def build():
        x, y = pair(n, d1, d2, dtype, device)
        return {"repkern": lambda: repkern.shape_distance(x, y, alpha=0.5),
                "reference": lambda: reference.shape_distance(x, y, alpha=0.5)}

    return Case(op="shape_distance[alpha=0.5]", shape=f"n={n} d={d1}/{d2}", dtype=dtype,
                providers=("repkern", "reference"), build=build, flops=_gram_flops(n, d1, d2), timing=timing)


def streaming_batches(n: int, batch: int, pool):
    """n rows in batches of `batch` from a pool of pre-built (x, y) batches, each shifted by its index
    (distinct data without memory that grows with n)."""
    done, i = 0, 0
    while done < n:
        x, y = pool[i % len(pool)]
        b = min(batch, n - done)
        yield x[:b] + 0.001 * i, y[:b] - 0.001 * i
        done, i = done + b, i + 1


def _streaming_case(n, d1, d2, batch, dtype, device, timing, with_oneshot=True) -> Case:
    names = ("repkern", "repkern-oneshot") if with_oneshot else ("repkern",)

    def build():
        pool = [pair(batch, d1, d2, dtype, device, seed) for seed in range(4)]

        def stream():
            acc = repkern.StreamingAlignment()
            for x, y in streaming_batches(n, batch, pool):
                acc.update([x], [y])
            return acc.compute("shape_distance", alpha=0.5)

        providers = {"repkern": stream}
        if with_oneshot:
            def one_shot():
                parts = list(streaming_batches(n, batch, pool))
                return repkern.shape_distance(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                              alpha=0.5)

            providers["repkern-oneshot"] = one_shot
        return providers

    return Case(op="StreamingAlignment[shape_distance alpha=0.5]", shape=f"N={n} d={d1}/{d2} b={batch}", dtype=dtype,
                providers=names, build=build, flops=_gram_flops(n, d1, d2), timing=timing)


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    out = []
    for dtype in select_dtypes(dtypes, [torch.float32]):
        if quick:
            out += [_one_shot_case(1024, 96, 64, dtype, device, FEW),
                    _streaming_case(8192, 64, 48, 1024, dtype, device, FEW),
                    _streaming_case(2048, 64, 48, 1024, dtype, device, FEW)]
        elif device.type == "cuda":
            out += [_one_shot_case(16384, 1024, 768, dtype, device, FEW),
                    _streaming_case(1000000, 1024, 768, 16384, dtype, device, ONCE),
                    _streaming_case(250000, 1024, 768, 16384, dtype, device, ONCE)]
        else:
            out += [_one_shot_case(4096, 512, 384, dtype, device, FEW),
                    _streaming_case(100000, 256, 192, 4096, dtype, device, ONCE),
                    _streaming_case(25000, 256, 192, 4096, dtype, device, ONCE)]
    return out
