"""Streaming and minibatch CKA benchmarks, same run.

Providers:
  repkern          StreamingCKA / MinibatchCKA fed batch by batch
  repkern-oneshot  cka_matrix over the concatenated batches (all data in memory at once)
  reference        plain PyTorch: feature-space linear CKA per pair over the concatenated data
                   (StreamingCKA); reference.minibatch_cka (MinibatchCKA)

Cases:
  StreamingCKA, linear (biased, debiased), 4 + 4 layers d=256, N=16384 in batches of 2048
  MinibatchCKA, RBF debiased, 4 layers d=256, 8 batches of 512
GPU (CUDA device): StreamingCKA 4 + 4 layers d=1024, N=262144 in batches of 16384; MinibatchCKA 4
  layers d=1024, 16 batches of 4096.
Default dtype float32; ``dtypes`` runs every case in each of them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import repkern
from repkern import reference
from repkern.bench import Case, generator, select_dtypes

FEW = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}


def _model(count: int, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = generator(device, seed)
    x = torch.randn(n, d, generator=g, device=device)
    layers = []
    for _ in range(count):
        w = torch.randn(d, d, generator=g, device=device) / d**0.5
        x = torch.tanh(x @ w) + 0.3 * torch.randn(n, d, generator=g, device=device) + 1.0
        layers.append(x.to(dtype))
    return layers


def _streaming_case(debiased: bool, layers: int, n: int, d: int, batch: int, dtype, device, timing) -> Case:
    def build():
        xs, ys = _model(layers, n, d, dtype, device, 0), _model(layers, n, d, dtype, device, 1)
        batches = list(zip(zip(*[t.split(batch) for t in xs]), zip(*[t.split(batch) for t in ys])))

        def stream():
            acc = repkern.StreamingCKA(debiased=debiased)
            for bx, by in batches:
                acc.update(bx, by)
            return acc.compute()

        def per_pair():
            return [[reference.feature_space_linear_cka(x, y, debiased=debiased) for y in ys] for x in xs]

        return {"repkern": stream,
                "repkern-oneshot": lambda: repkern.cka_matrix(xs, ys, debiased=debiased, method="feature"),
                "reference": per_pair}

    pairs = layers * layers + 2 * layers  # cross pairs and self pairs: d×d products each
    return Case(op=f"StreamingCKA[linear{' debiased' if debiased else ''}]",
                shape=f"{layers}+{layers} layers N={n} d={d} b={batch}", dtype=dtype,
                providers=("repkern", "repkern-oneshot", "reference"), build=build,
                flops=2.0 * n * d * d * pairs, timing=timing)


def _minibatch_case(layers: int, batches: int, batch: int, d: int, dtype, device, timing) -> Case:
    def build():
        xs = _model(layers, batches * batch, d, dtype, device, 2)
        split = list(zip(*[t.split(batch) for t in xs]))

        def minibatch():
            acc = repkern.MinibatchCKA("rbf")
            for bx in split:
                acc.update(bx)
            return acc.compute()

        return {"repkern": minibatch,
                "reference": lambda: reference.minibatch_cka([(list(b), None) for b in split], "rbf")}

    return Case(op="MinibatchCKA[rbf debiased]", shape=f"{layers} layers {batches}x b={batch} d={d}", dtype=dtype,
                providers=("repkern", "reference"), build=build,
                flops=2.0 * layers * batches * batch * batch * d, timing=timing)


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    out = []
    for dtype in select_dtypes(dtypes, [torch.float32]):
        if quick:
            out += [
                _streaming_case(True, 2, 4096, 64, 1024, dtype, device, FEW),
                _minibatch_case(2, 4, 256, 64, dtype, device, FEW),
            ]
        elif device.type == "cuda":
            out += [
                _streaming_case(False, 4, 262144, 1024, 16384, dtype, device, FEW),
                _streaming_case(True, 4, 262144, 1024, 16384, dtype, device, FEW),
                _minibatch_case(4, 16, 4096, 1024, dtype, device, FEW),
            ]
        else:
            out += [
                _streaming_case(False, 4, 16384, 256, 2048, dtype, device, FEW),
                _streaming_case(True, 4, 16384, 256, 2048, dtype, device, FEW),
                _minibatch_case(4, 8, 512, 256, dtype, device, FEW),
            ]
    return out
