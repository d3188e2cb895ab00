"""RSA benchmarks: ``repkern.rdm`` and ``repkern.rsa`` against repkern.reference in the same run.

Providers:
  repkern    the op (row blocks of the Gram matrix straight into the condensed RDM, sort-based ranks)
  reference  repkern.reference: torch.corrcoef's full n×n matrix (correlation) or the row-by-row
             differences (euclidean), then the upper triangle; ranks through torch.unique

Cases (RSA sizes: hundreds to a few thousand stimuli): rdm correlation and euclidean, rsa
(correlation RDMs, Spearman), n=1000 patterns, d=2048 vs 1024.
GPU (CUDA device): n=4096 patterns, d=4096 vs 2048.
Default dtype float32; ``dtypes`` runs every case in each of them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import repkern
from repkern import reference
from repkern.bench import Case, select_dtypes
from repkern.bench.shape import pair

FEW = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}


def _rdm_case(metric: str, n: int, d: int, dtype, device) -> Case:
    def build():
        x, _ = pair(n, d, 8, dtype, device, seed=2)
        return {"repkern": lambda: repkern.rdm(x, metric), "reference": lambda: reference.rdm(x, metric)}

    return Case(op=f"rdm[{metric}]", shape=f"n={n} d={d}", dtype=dtype, providers=("repkern", "reference"),
                build=build, flops=float(n) * n * d, timing=FEW)


def _rsa_case(n: int, d1: int, d2: int, dtype, device) -> Case:
    def build():
        x, y = pair(n, d1, d2, dtype, device, seed=3)
        return {"repkern": lambda: repkern.rsa(x, y), "reference": lambda: reference.rsa(x, y)}

    return Case(op="rsa[correlation spearman]", shape=f"n={n} d={d1}/{d2}", dtype=dtype,
                providers=("repkern", "reference"), build=build, flops=float(n) * n * (d1 + d2), timing=FEW)


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    n, d1, d2 = (200, 128, 64) if quick else (4096, 4096, 2048) if device.type == "cuda" else (1000, 2048, 1024)
    out = []
    for dtype in select_dtypes(dtypes, [torch.float32]):
        out += [_rdm_case("correlation", n, d1, dtype, device), _rdm_case("euclidean", n, d1, dtype, device),
                _rsa_case(n, d1, d2, dtype, device)]
    return out
