"""CKA benchmarks (targets: docs/benchmarks.md), repkern against plain PyTorch in the same run.

Providers:
  repkern      the op as a user calls it (method="auto")
  repkern-X    the op with method="X" forced
  reference    repkern.reference: plain PyTorch written the way a careful user would;
               for cka_matrix that means each layer's Gram built and centered ONCE
  loop[Pp]     the usual per-pair loop, reference.cka(x_i, x_j) for P pairs i < j (both
               Grams recomputed per pair); all L(L−1)/2 pairs, or where that would take
               minutes the first P of them (per-pair cost = time / P)

Cases:
  cka_matrix, RBF, debiased, 6 layers, n=1024, d=384      (target: >= 1.5× reference, >= 5× loop)
  cka_matrix, linear, 12 layers, n=4096, d=768 (target: the feature path >= 70% of the matmul rate;
               "auto" takes Gram space here: its FLOPs are (L+1)·d/n = 2.4× fewer for L layers)
  cka_matrix, RBF, 12 layers, n=4096, d=768
  cka, linear debiased, one pair n=4096, d=768 (feature path) against reference.feature_space_linear_cka,
               plain PyTorch ‖YᵀX‖²/(‖XᵀX‖‖YᵀY‖) after centering (target: >= 1.3× it);
               GPU n=16384, d=4096
  cka, RBF, n=16384, d=768: tiled (auto), untiled, reference (target: time <= 1.3× untiled)
  cka, RBF, n=32768, d=768: tiled only (full mode: the n×n approaches need > 12 GB here)
GPU (CUDA device): the same cases scaled up: cka_matrix RBF debiased 6 layers n=4096 d=1024; linear
  12 layers n=16384 d=4096; RBF 12 layers n=16384 d=1024; cka RBF n=65536 d=1024 (tiled, untiled,
  reference: the n×n approaches need tens of GB, and are reported as skipped where they do not fit);
  full mode adds n=131072 tiled only. Timing on GPU: one warm-up, two or three timed runs.
Default dtype float32; ``dtypes`` runs every case in each of them.
Peak memory is what torch allocates during the call beyond what existed before it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import repkern
from repkern import reference
from repkern.bench import Case, generator, roofline, select_dtypes
from repkern.bench.timing import dtype_name

SLOW = {"warmup": 0, "min_repeats": 1, "max_repeats": 1}  # multi-second calls: one timed run
FEW = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}


def _layers(count: int, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Layer activations that drift from layer to layer (CKA between 0 and 1)."""
    g = generator(device, seed)
    x = torch.randn(n, d, generator=g, device=device)
    layers = []
    for _ in range(count):
        w = torch.randn(d, d, generator=g, device=device) / d**0.5
        x = torch.tanh(x @ w) + 0.3 * torch.randn(n, d, generator=g, device=device)
        layers.append(x.to(dtype))
    return layers


def _loop(layers, pairs, **kwargs):
    return [reference.cka(layers[i], layers[j], **kwargs) for i, j in pairs]


def _matrix_case(kernel: str, debiased: bool, count: int, n: int, d: int, dtype: torch.dtype, device: torch.device,
                 *, loop_pairs=None, timing=None) -> Case:
    distinct = [(i, j) for i in range(count) for j in range(i + 1, count)]  # what a careful loop computes
    pairs = distinct if loop_pairs is None else distinct[:loop_pairs]
    kw = {"kernel": kernel, "debiased": debiased}
    names = ["repkern"] + (["repkern-feature"] if kernel == "linear" else []) + ["reference", f"loop[{len(pairs)}p]"]

    def build():
        layers = _layers(count, n, d, dtype, device)
        providers = {"repkern": lambda: repkern.cka_matrix(layers, **kw)}
        if kernel == "linear":  # the feature path's rate (auto may prefer Gram space for many layers)
            providers["repkern-feature"] = lambda: repkern.cka_matrix(layers, method="feature", **kw)
        providers["reference"] = lambda: reference.cka_matrix(layers, **kw)
        providers[f"loop[{len(pairs)}p]"] = lambda: _loop(layers, pairs, **kw)
        return providers

    if kernel == "linear":  # feature path: the GEMMs x_iᵀ x_j, i <= j (GFLOP/s is meaningful for repkern-feature)
        flops = 2.0 * n * d * d * count * (count + 1) / 2
    else:  # one Gram x xᵀ per layer
        flops = 2.0 * count * n * n * d
    label = kernel + (" debiased" if debiased else "")
    model = (roofline.cka_matrix_rbf(count, n, d, dtype_name(dtype), debiased)
             if device.type == "cuda" and kernel == "rbf" else None)  # linear: the feature path is GEMMs only
    return Case(op=f"cka_matrix[{label}]", shape=f"{count} layers n={n} d={d}", dtype=dtype, providers=names,
                build=build, flops=flops, timing=timing or {}, model=model)


def _feature_pair_case(n: int, d: int, dtype: torch.dtype, device: torch.device, timing) -> Case:
    def build():
        g = generator(device, 2)
        x = torch.randn(n, d, generator=g, device=device)
        y = torch.tanh(x @ (torch.randn(d, d, generator=g, device=device) / d**0.5))
        y = y + 0.5 * torch.randn(n, d, generator=g, device=device)
        x, y = x.to(dtype), y.to(dtype)
        return {"repkern": lambda: repkern.cka(x, y, debiased=True),
                "reference": lambda: reference.feature_space_linear_cka(x, y, debiased=True)}

    # the plain computation's FLOPs: the GEMMs YᵀX, XᵀX, YᵀY (repkern's CPU self products take half of theirs,
    # so its rate can show above the matmul rate)
    return Case(op="cka[linear debiased feature]", shape=f"n={n} d={d}", dtype=dtype,
                providers=("repkern", "reference"), build=build, flops=3 * 2.0 * n * d * d, timing=timing)


def _tiled_case(n: int, d: int, dtype: torch.dtype, device: torch.device, *, untiled: bool, with_reference: bool,
                timing) -> Case:
    names = ["repkern"] + (["repkern-gram"] if untiled else []) + (["reference"] if with_reference else [])

    def build():
        g = generator(device, 1)
        x = torch.randn(n, d, generator=g, device=device)
        w = torch.randn(d, d, generator=g, device=device) / d**0.5
        y = torch.tanh(x @ w) + 0.5 * torch.randn(n, d, generator=g, device=device)
        x, y = x.to(dtype), y.to(dtype)
        providers = {"repkern": lambda: repkern.cka(x, y, "rbf")}
        if untiled:
            providers["repkern-gram"] = lambda: repkern.cka(x, y, "rbf", method="gram")
        if with_reference:
            providers["reference"] = lambda: reference.cka(x, y, "rbf")
        return providers

    # The plan depends on shapes and dtype only: zero-strided stand-ins, nothing allocated.
    stand_in = torch.zeros((), dtype=dtype).expand(n, d)
    plan = repkern.cka_plan(stand_in, stand_in, "rbf")
    return Case(op=f"cka[rbf {plan.method} median={plan.median}]", shape=f"n={n} d={d}", dtype=dtype,
                providers=names, build=build, flops=2.0 * 2 * n * n * d, timing=timing)


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    out = []
    for dtype in select_dtypes(dtypes, [torch.float32]):
        if quick:
            out += [
                _matrix_case("rbf", True, 4, 512, 64, dtype, device, timing=FEW),
                _matrix_case("linear", False, 4, 1024, 128, dtype, device, timing=FEW),
                _tiled_case(2048, 64, dtype, device, untiled=True, with_reference=True, timing=SLOW),
            ]
        elif device.type == "cuda":
            out += [
                _matrix_case("rbf", True, 6, 4096, 1024, dtype, device, timing=FEW),
                _matrix_case("linear", False, 12, 16384, 4096, dtype, device, loop_pairs=6, timing=FEW),
                _matrix_case("rbf", False, 12, 16384, 1024, dtype, device, loop_pairs=2, timing=FEW),
                _feature_pair_case(16384, 4096, dtype, device, timing=FEW),
                _tiled_case(65536, 1024, dtype, device, untiled=True, with_reference=True, timing=FEW),
            ]
            if full:
                out.append(_tiled_case(131072, 1024, dtype, device, untiled=False, with_reference=False, timing=FEW))
        else:
            out += [
                _matrix_case("rbf", True, 6, 1024, 384, dtype, device, timing=FEW),
                _matrix_case("linear", False, 12, 4096, 768, dtype, device, loop_pairs=6, timing=SLOW),
                _matrix_case("rbf", False, 12, 4096, 768, dtype, device, loop_pairs=2, timing=SLOW),
                _feature_pair_case(4096, 768, dtype, device, timing={}),
                _tiled_case(16384, 768, dtype, device, untiled=True, with_reference=True, timing=SLOW),
            ]
            if full:
                out.append(_tiled_case(32768, 768, dtype, device, untiled=False, with_reference=False, timing=SLOW))
    return out
