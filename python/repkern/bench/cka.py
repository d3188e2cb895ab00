"""CKA benchmarks (DESIGN.md §7 and issue 3), repkern against plain PyTorch in the same run.

Providers:
  repkern      the op as a user calls it (method="auto")
  repkern-X    the op with method="X" forced
  reference    repkern.reference: plain PyTorch written the way a careful user would;
               for cka_matrix that means each layer's Gram built and centered ONCE
  loop[Pp]     the usual per-pair loop, reference.cka(x_i, x_j) for P pairs i < j (both
               Grams recomputed per pair); all L(L−1)/2 pairs, or where that would take
               minutes the first P of them (per-pair cost = time / P)

Cases:
  cka_matrix, RBF, debiased, 6 layers, n=1024, d=384      (§7: >= 1.5× reference, >= 5× loop)
  cka_matrix, linear, 12 layers, n=4096, d=768 (§7: the feature path >= 70% of the matmul rate;
               "auto" takes Gram space here: its FLOPs are (L+1)·d/n = 2.4× fewer for L layers)
  cka_matrix, RBF, 12 layers, n=4096, d=768               (issue 3)
  cka, RBF, n=16384, d=768: tiled (auto), untiled, reference (issue 3, §7: time <= 1.3× untiled)
  cka, RBF, n=32768, d=768: tiled only (full mode: the n×n approaches need > 12 GB here)
Peak memory is what torch allocates during the call beyond what existed before it.
"""

from __future__ import annotations

import torch

import repkern
from repkern import reference
from repkern.bench import Case

SLOW = {"warmup": 0, "min_repeats": 1, "max_repeats": 1}  # multi-second calls: one timed run
FEW = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}


def _layers(count: int, n: int, d: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Layer activations that drift from layer to layer (CKA between 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    layers = []
    for _ in range(count):
        x = torch.tanh(x @ (torch.randn(d, d, generator=g) / d**0.5)) + 0.3 * torch.randn(n, d, generator=g)
        layers.append(x.to(device))
    return layers


def _loop(layers, pairs, **kwargs):
    return [reference.cka(layers[i], layers[j], **kwargs) for i, j in pairs]


def _matrix_case(kernel: str, debiased: bool, count: int, n: int, d: int, device: torch.device, *,
                 loop_pairs=None, timing=None) -> Case:
    layers = _layers(count, n, d, device)
    distinct = [(i, j) for i in range(count) for j in range(i + 1, count)]  # what a careful loop computes
    pairs = distinct if loop_pairs is None else distinct[:loop_pairs]
    kw = {"kernel": kernel, "debiased": debiased}
    providers = {"repkern": lambda: repkern.cka_matrix(layers, **kw)}
    if kernel == "linear":  # the feature path's rate (auto may prefer Gram space for many layers)
        providers["repkern-feature"] = lambda: repkern.cka_matrix(layers, method="feature", **kw)
    providers["reference"] = lambda: reference.cka_matrix(layers, **kw)
    providers[f"loop[{len(pairs)}p]"] = lambda: _loop(layers, pairs, **kw)
    if kernel == "linear":  # feature path: the GEMMs x_iᵀ x_j, i <= j (GFLOP/s is meaningful for repkern-feature)
        flops = 2.0 * n * d * d * count * (count + 1) / 2
    else:  # one Gram x xᵀ per layer
        flops = 2.0 * count * n * n * d
    label = kernel + (" debiased" if debiased else "")
    return Case(op=f"cka_matrix[{label}]", shape=f"{count} layers n={n} d={d}", dtype=torch.float32,
                providers=providers, flops=flops, timing=timing or {})


def _tiled_case(n: int, d: int, device: torch.device, *, untiled: bool, with_reference: bool) -> Case:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    y = (torch.tanh(x @ (torch.randn(d, d, generator=g) / d**0.5)) + 0.5 * torch.randn(n, d, generator=g))
    x, y = x.to(device), y.to(device)
    providers = {"repkern": lambda: repkern.cka(x, y, "rbf")}
    if untiled:
        providers["repkern-gram"] = lambda: repkern.cka(x, y, "rbf", method="gram")
    if with_reference:
        providers["reference"] = lambda: reference.cka(x, y, "rbf")
    plan = repkern.cka_plan(x, y, "rbf")
    return Case(op=f"cka[rbf {plan.method} median={plan.median}]", shape=f"n={n} d={d}", dtype=torch.float32,
                providers=providers, flops=2.0 * 2 * n * n * d, timing=SLOW)


def cases(device: torch.device, quick: bool, full: bool = False) -> list[Case]:
    if quick:
        return [
            _matrix_case("rbf", True, 4, 512, 64, device, timing=FEW),
            _matrix_case("linear", False, 4, 1024, 128, device, timing=FEW),
            _tiled_case(2048, 64, device, untiled=True, with_reference=True),
        ]
    out = [
        _matrix_case("rbf", True, 6, 1024, 384, device, timing=FEW),
        _matrix_case("linear", False, 12, 4096, 768, device, loop_pairs=6, timing=SLOW),
        _matrix_case("rbf", False, 12, 4096, 768, device, loop_pairs=2, timing=SLOW),
        _tiled_case(16384, 768, device, untiled=True, with_reference=True),
    ]
    if full:
        out.append(_tiled_case(32768, 768, device, untiled=False, with_reference=False))
    return out
