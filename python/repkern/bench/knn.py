"""kNN benchmarks: repkern.knn against plain torch in the same run, with peak memory.

Baseline ("reference" provider, so the speed-up column compares with it): what a user writes
without repkern, the full similarity and torch.topk: x̂ = rows / ‖rows‖, S = x̂ x̂ᵀ (n × n),
the diagonal set to −inf, ``S.topk(k)`` (for euclidean: ``torch.cdist`` with the matmul
formula, the diagonal +inf, ``topk(largest=False)``). It is faster than
:func:`repkern.reference.knn`, whose stable sort of every row is the oracle, not a baseline,
and it breaks ties arbitrarily. repkern never holds the n × n matrix: its peak is the
normalized copy of x plus one 16 MiB tile plus the (n, k) lists.
Also: the alignment metrics end to end (two kNN searches each) at the first shape, and
``similarity_matrix(metric="mutual_knn")`` of 7 layers (one kNN search per layer) against the loop
of ``repkern.mutual_knn`` over the 28 pairs i <= j (the "reference" provider here: 56 searches);
CPU (4096, 256), GPU (16384, 1024), --quick the quick shape, k = 10.

GFLOP/s count the dense x xᵀ (2n²d) for every provider, as the gram suite does; repkern
computes about half of it (block pairs I <= J).

Shapes (n, d, k): CPU (16384, 768, 10) cosine (the target: >= 1.7x the baseline, peak <= 10%
of n² float32), (8192, 768, 10) ip and euclidean; GPU (65536, 4096, 10), (32768, 1024, 10);
--full adds n = 32768 on the CPU, 131072 on the GPU (the baseline's n × n float32 needs 68 GB);
--quick (1024, 128, 10). Default dtype float32."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import repkern
from repkern.bench import Case, generator, roofline, select_dtypes
from repkern.bench.timing import dtype_name

QUICK_SHAPES = [(1024, 128, 10, "cosine")]
CPU_SHAPES = [(16384, 768, 10, "cosine"), (8192, 768, 10, "ip"), (8192, 768, 10, "euclidean")]
CPU_FULL_SHAPES = [(32768, 768, 10, "cosine")]
GPU_SHAPES = [(65536, 4096, 10, "cosine"), (32768, 1024, 10, "cosine"), (32768, 1024, 10, "euclidean")]
GPU_FULL_SHAPES = [(131072, 4096, 10, "cosine")]
MATRIX_LAYERS = 7  # similarity_matrix: 7 kNN searches against 56 for the per-pair loop over i <= j
SLOW_TIMING = {"warmup": 1, "min_repeats": 3, "max_repeats": 3, "min_time_s": 0.0}  # calls of seconds


def torch_knn(x: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch baseline: n × n similarities (or distances), diagonal excluded, topk."""
    xa = x.float() if x.dtype != torch.float64 else x
    if metric == "euclidean":
        s = torch.cdist(xa, xa)
        s.fill_diagonal_(float("inf"))
        return s.topk(k, dim=1, largest=False)
    if metric == "cosine":
        xa = torch.nn.functional.normalize(xa, dim=1)
    s = xa @ xa.T
    s.fill_diagonal_(float("-inf"))
    return s.topk(k, dim=1)


def _knn_case(n, d, k, metric, dtype, device, timing) -> Case:
    def build():
        x = torch.randn(n, d, device=device, generator=generator(device, 0)).to(dtype)
        return {"repkern": lambda: repkern.knn(x, k, metric=metric),
                "reference": lambda: torch_knn(x, k, metric)}

    return Case(op=f"knn[{metric}]", shape=f"n={n} d={d} k={k}", dtype=dtype, providers=("repkern", "reference"),
                build=build, flops=2.0 * n * n * d, timing=timing,
                model=roofline.knn(n, d, k, metric, dtype_name(dtype)) if device.type == "cuda" else None)


def _alignment_case(n, d, k, dtype, device, timing) -> Case:
    def build():
        g = generator(device, 1)
        x = torch.randn(n, d, device=device, generator=g).to(dtype)
        y = (x[:, : d // 2] + torch.randn(n, d // 2, device=device, generator=g)).to(dtype)
        return {"mutual_knn": lambda: repkern.mutual_knn(x, y, k),
                "cycle_knn": lambda: repkern.cycle_knn(x, y, k),
                "cknna": lambda: repkern.cknna(x, y, k)}

    return Case(op="knn_alignment", shape=f"n={n} d={d}/{d // 2} k={k}", dtype=dtype,
                providers=("mutual_knn", "cycle_knn", "cknna"), build=build, timing=timing)


def pairwise_mutual_knn(layers: list[torch.Tensor], k: int) -> torch.Tensor:
    """The per-pair loop a user writes without similarity_matrix: mutual_knn for every pair i <= j of
    layers (two kNN searches per call), mirrored."""
    out = torch.empty(len(layers), len(layers))
    for i, x in enumerate(layers):
        for j in range(i, len(layers)):
            out[i, j] = out[j, i] = repkern.mutual_knn(x, layers[j], k)
    return out


def _matrix_case(n, d, k, layers, dtype, device, timing) -> Case:
    def build():
        g = generator(device, 2)
        base = torch.randn(n, d, device=device, generator=g)
        xs = [(base + 0.5 * l * torch.randn(n, d, device=device, generator=g)).to(dtype) for l in range(layers)]
        return {"repkern": lambda: repkern.similarity_matrix(xs, metric="mutual_knn", k=k),
                "reference": lambda: pairwise_mutual_knn(xs, k)}

    return Case(op="similarity_matrix[mutual_knn]", shape=f"{layers} layers n={n} d={d} k={k}", dtype=dtype,
                providers=("repkern", "reference"), build=build, timing=timing)


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    gpu = device.type == "cuda"
    if quick:
        shapes, timing = QUICK_SHAPES, {}
    else:
        shapes = (GPU_SHAPES + (GPU_FULL_SHAPES if full else [])) if gpu else (
            CPU_SHAPES + (CPU_FULL_SHAPES if full else []))
        timing = {} if gpu else SLOW_TIMING
    out = []
    for dtype in select_dtypes(dtypes, [torch.float32]):
        out += [_knn_case(n, d, k, metric, dtype, device, timing) for n, d, k, metric in shapes]
        n, d, k = QUICK_SHAPES[0][:3] if quick else (32768, 1024, 10) if gpu else (8192, 768, 10)
        out.append(_alignment_case(n, d, k, dtype, device, timing))
        n, d = (QUICK_SHAPES[0][:2]) if quick else (16384, 1024) if gpu else (4096, 256)
        out.append(_matrix_case(n, d, 10, MATRIX_LAYERS, dtype, device, timing))
    return out
