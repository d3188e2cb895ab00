"""cka_test benchmarks: the fused permutation / bootstrap kernel against the loop a user writes, same run.

Providers:
  repkern   repkern.cka_test (one native kernel evaluates many replicates per launch)
  loop[Pp]  the baseline: a loop that permutes y's Gram and recomputes CKA with the reference
            (cka_from_grams), for P of the permutations (per-permutation cost = time / P; compare
            1000 permutations: 1000/P × this time)
  loop[Pb]  the same for bootstrap draws (resampled Grams, CKA recomputed)

Cases: linear, n=2048 (x d=256, y d=128): 1000 permutations; 1000 bootstrap draws. GPU (CUDA device):
n=16384. Default dtype float32; ``dtypes`` runs every case in each of them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import repkern
from repkern import _common, reference
from repkern.bench import Case, generator, roofline, select_dtypes
from repkern.bench.timing import dtype_name

SLOW = {"warmup": 0, "min_repeats": 1, "max_repeats": 1}
FEW = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}


def _test_case(n: int, replicates: int, loop: int, bootstrap: bool, dtype, device, timing) -> Case:
    def build():
        g = generator(device, 3)
        x = torch.randn(n, 256, generator=g, device=device)
        y = torch.tanh(x[:, :128]) + torch.randn(n, 128, generator=g, device=device)
        x, y = x.to(dtype), y.to(dtype)
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

        return {"repkern": run, f"loop[{loop}{'b' if bootstrap else 'p'}]": baseline}

    kind = "bootstrap" if bootstrap else "permutations"
    elem = 8 if dtype == torch.float64 else 4  # the Grams' accumulation dtype
    # bytes through the kernel's cache per replicate: a row of the centered K, a gathered row of L,
    # the plan's column indices/weights (three Gram-sized streams)
    return Case(op=f"cka_test[linear {replicates} {kind}]", shape=f"n={n} d=256/128", dtype=dtype,
                providers=("repkern", f"loop[{loop}{'b' if bootstrap else 'p'}]"), build=build,
                bytes_moved=float(replicates) * n * n * 3 * elem, timing=timing,
                model=roofline.cka_test(n, replicates, bootstrap, dtype_name(dtype)) if device.type == "cuda" else None)


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    out = []
    for dtype in select_dtypes(dtypes, [torch.float32]):
        n, replicates, loop, timing = ((512, 100, 10, FEW) if quick else (16384, 1000, 50, FEW)
                                       if device.type == "cuda" else (2048, 1000, 50, SLOW))
        out += [_test_case(n, replicates, loop, bootstrap, dtype, device, timing) for bootstrap in (False, True)]
    return out
