"""Streaming / minibatch CKA and cka_test benchmarks (issue 4, DESIGN.md §7), same run.

Providers:
  repkern          StreamingCKA / MinibatchCKA fed batch by batch; cka_test
  repkern-oneshot  cka_matrix over the concatenated batches (all data in memory at once)
  reference        plain PyTorch: feature-space linear CKA per pair over the concatenated data
                   (StreamingCKA); reference.minibatch_cka (MinibatchCKA)
  loop[Pp]         cka_test's baseline: a loop that permutes y's Gram and recomputes CKA with the
                   reference (cka_from_grams), for P of the permutations (per-permutation cost =
                   time / P; the DESIGN §7 target compares 1000 permutations: 1000/P × this time)
  loop[Pb]         the same for bootstrap draws (resampled Grams, CKA recomputed)

Cases:
  StreamingCKA, linear (biased, debiased), 4 + 4 layers d=256, N=16384 in batches of 2048
  MinibatchCKA, RBF debiased, 4 layers d=256, 8 batches of 512
  cka_test, linear, n=2048 (x d=256, y d=128): 1000 permutations; 1000 bootstrap draws (§7: >= 20×)
"""

from __future__ import annotations

import torch

import repkern
from repkern import _common, reference
from repkern.bench import Case

SLOW = {"warmup": 0, "min_repeats": 1, "max_repeats": 1}
FEW = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}


def _model(count: int, n: int, d: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    layers = []
    for _ in range(count):
        x = torch.tanh(x @ (torch.randn(d, d, generator=g) / d**0.5)) + 0.3 * torch.randn(n, d, generator=g) + 1.0
        layers.append(x.to(device))
    return layers


def _streaming_case(debiased: bool, layers: int, n: int, d: int, batch: int, device, timing) -> Case:
    xs, ys = _model(layers, n, d, device, 0), _model(layers, n, d, device, 1)
    batches = list(zip(zip(*[t.split(batch) for t in xs]), zip(*[t.split(batch) for t in ys])))

    def stream():
        acc = repkern.StreamingCKA(debiased=debiased)
        for bx, by in batches:
            acc.update(bx, by)
        return acc.compute()

    def per_pair():
        return [[reference.feature_space_linear_cka(x, y, debiased=debiased) for y in ys] for x in xs]

    pairs = layers * layers + 2 * layers  # cross pairs and self pairs: d×d products each
    return Case(op=f"StreamingCKA[linear{' debiased' if debiased else ''}]",
                shape=f"{layers}+{layers} layers N={n} d={d} b={batch}", dtype=torch.float32,
                providers={"repkern": stream,
                           "repkern-oneshot": lambda: repkern.cka_matrix(xs, ys, debiased=debiased, method="feature"),
                           "reference": per_pair},
                flops=2.0 * n * d * d * pairs, timing=timing)


def _minibatch_case(layers: int, batches: int, batch: int, d: int, device, timing) -> Case:
    xs = _model(layers, batches * batch, d, device, 2)
    split = list(zip(*[t.split(batch) for t in xs]))

    def minibatch():
        acc = repkern.MinibatchCKA("rbf")
        for bx in split:
            acc.update(bx)
        return acc.compute()

    return Case(op="MinibatchCKA[rbf debiased]", shape=f"{layers} layers {batches}x b={batch} d={d}",
                dtype=torch.float32,
                providers={"repkern": minibatch,
                           "reference": lambda: reference.minibatch_cka([(list(b), None) for b in split], "rbf")},
                flops=2.0 * layers * batches * batch * batch * d, timing=timing)


def _test_case(n: int, replicates: int, loop: int, bootstrap: bool, device, timing) -> Case:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 256, generator=g)
    y = torch.tanh(x[:, :128]) + torch.randn(n, 128, generator=g)
    x, y = x.to(device), y.to(device)
    perms, boots = _common.replicate_indices(n, replicates, replicates, 0, device)

    def run():
        if bootstrap:
            return repkern.cka_test(x, y, n_permutations=0, n_bootstrap=replicates)
        return repkern.cka_test(x, y, n_permutations=replicates, n_bootstrap=0)

    def baseline():
        k, l = reference.gram(x), reference.gram(y)
        if bootstrap:
            return [reference.cka_from_grams(k[b][:, b], l[b][:, b]) for b in boots[:loop]]
        return [reference.cka_from_grams(k, l[p][:, p]) for p in perms[:loop]]

    kind = "bootstrap" if bootstrap else "permutations"
    # bytes through the kernel's cache per replicate: a row of the centered K, a gathered row of L,
    # the plan's column indices/weights (float32 Grams)
    return Case(op=f"cka_test[linear {replicates} {kind}]", shape=f"n={n} d=256/128", dtype=torch.float32,
                providers={"repkern": run, f"loop[{loop}{'b' if bootstrap else 'p'}]": baseline},
                bytes_moved=float(replicates) * n * n * 12, timing=timing)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [
            _streaming_case(True, 2, 4096, 64, 1024, device, FEW),
            _minibatch_case(2, 4, 256, 64, device, FEW),
            _test_case(512, 100, 10, False, device, FEW),
            _test_case(512, 100, 10, True, device, FEW),
        ]
    return [
        _streaming_case(False, 4, 16384, 256, 2048, device, FEW),
        _streaming_case(True, 4, 16384, 256, 2048, device, FEW),
        _minibatch_case(4, 8, 512, 256, device, FEW),
        _test_case(2048, 1000, 50, False, device, SLOW),
        _test_case(2048, 1000, 50, True, device, SLOW),
    ]
