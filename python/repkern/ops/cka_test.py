"""Significance of CKA: ``repkern.cka_test`` (permutation p-value, bootstrap percentile interval).

Gram matrices K, L are computed once. The permutation null needs only the cross term:
centering commutes with permuting the samples and ⟨HKH, HLH⟩ = ⟨HKH, L⟩-type identities
hold for both centerings, so with A, B the centered (biased) or U-centered (debiased) Grams
the HSIC numerator of K and L permuted by π is Σ_ij A_ij B_π(i)π(j), and the self terms
do not change. The native kernel ``repkern::replicate_rows`` evaluates R permutations per
launch by index gather from the one copy of B, over the upper triangle only (A and B are
symmetric: row i contributes A_ii B_π(i)π(i) + 2 Σ_{j>i} A_ij B_π(i)π(j)). The bootstrap resamples rows with
replacement: with w the multinomial counts of a draw, every term of the HSIC of the
resampled data (duplicates included) is a w-weighted sum over K and L (cka_test_math.h),
evaluated by the same kernel's Bootstrap mode from the uncentered K and L, then finished in
float64 here. Resampling plans come from a CPU ``torch.Generator`` seeded with ``seed``
(:func:`repkern._common.replicate_indices`), and every kernel sum is written per (replicate,
row) and added in a fixed order, so a seed gives the same result on every run of a device.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from repkern import _common, _native, _validation, reference
from repkern._constants import REPLICATE_CHANNELS, ReplicateMode
from repkern.ops import cka as cka_ops
from repkern.ops.gram import gram
from repkern.results.cka_test import CkaTestResult, finish

__all__ = ["cka_test", "CkaTestResult"]

REPLICATE_ROWS = _native.kernel("replicate_rows")

PERMUTE, BOOTSTRAP = int(ReplicateMode.PERMUTE), int(ReplicateMode.BOOTSTRAP)  # the custom op takes ints
REPLICATE_BYTES = 32 << 20  # per launch: R·n·(4 + 8·channels) bytes of plans and row sums


@torch.library.custom_op("repkern::replicate_rows", mutates_args=())
def _replicate_rows_op(a: Tensor, b: Tensor, columns: Tensor, mode: int) -> Tensor:
    """a, b: (n, n) float32/float64 symmetric. mode 0 (Permute): columns (R, n) int32
    permutations, returns (R, n, 1) Σ_j a_ij b_π(i)π(j); mode 1 (Bootstrap): columns (R, n)
    float32 counts, returns (R, n, 5) Σ_j w_j (a b, a², b², a, b)_ij. float64. ValueError for a
    permutation index outside [0, n) (checked by the kernels; on CUDA one sync per call)."""
    out = torch.empty((columns.shape[0], a.shape[0], REPLICATE_CHANNELS[mode]), dtype=torch.float64, device=a.device)
    error = _native.index_error_word(a.device)
    _native.call(REPLICATE_ROWS, a.device, mode, a.contiguous(), b.contiguous(), columns.contiguous(), out, error)
    _native.raise_index_errors(error)
    return out


@_replicate_rows_op.register_fake
def _(a, b, columns, mode):
    return a.new_empty((columns.shape[0], a.shape[0], REPLICATE_CHANNELS[mode]), dtype=torch.float64)


@torch.library.custom_op("repkern::replicate_indices", mutates_args=())
def _replicate_indices_op(n: int, n_permutations: int, n_bootstrap: int, seed_high: int, seed_low: int,
                          device: torch.device) -> tuple[Tensor, Tensor]:
    """The resampling plan of :func:`repkern._common.replicate_indices` for seed = seed_high·2³² + seed_low
    (two ints: a seed may use all 64 bits, an op's int argument only 63). As an op, the CPU generator it
    seeds stays out of a torch.compile graph."""
    return _common.replicate_indices(n, n_permutations, n_bootstrap, (seed_high << 32) | seed_low, device)


@_replicate_indices_op.register_fake
def _(n, n_permutations, n_bootstrap, seed_high, seed_low, device):
    return (torch.empty((n_permutations, n), dtype=torch.int64, device=device),
            torch.empty((n_bootstrap, n), dtype=torch.int64, device=device))


def _chunks(total: int, n: int, channels: int):
    step = max(1, REPLICATE_BYTES // (n * (4 + 8 * channels)))
    return [(s, min(total, s + step)) for s in range(0, total, step)]


def _bootstrap(k: Tensor, l: Tensor, boots: Tensor, debiased: bool) -> Tensor:
    """CKA of each resample (R, n) of the rows, from the uncentered Grams: (R,) float64."""
    n = k.shape[0]
    dk, dl = k.diagonal().double(), l.diagonal().double()
    tol = _common.zero_variance_tolerance(k.dtype)
    out = []
    for s0, s1 in _chunks(boots.shape[0], n, REPLICATE_CHANNELS[BOOTSTRAP]):
        w = torch.zeros((s1 - s0, n), dtype=torch.float32, device=k.device)
        w.scatter_add_(1, boots[s0:s1], torch.ones_like(boots[s0:s1], dtype=torch.float32))
        rows = torch.ops.repkern.replicate_rows(k, l, w, BOOTSTRAP)
        w = w.double()
        kl, kk, ll = ((w[:, :, None] * rows[:, :, :3]).sum(1)).unbind(1)  # Σ over the resample's pairs
        rk, rl = rows[:, :, 3], rows[:, :, 4]  # row sums of the resampled K, L (per distinct row)

        def h(s, ra, rb, da, db):
            if not debiased:
                return s - (2 / n) * (w * ra * rb).sum(1) + (w * ra).sum(1) * (w * rb).sum(1) / (n * n)
            s = s - (w * da * db).sum(1)
            ra, rb = ra - da, rb - db  # the resample's diagonal (duplicates stay off it) zeroed
            return (s + (w * ra).sum(1) * (w * rb).sum(1) / ((n - 1) * (n - 2))
                    - (2 / (n - 2)) * (w * ra * rb).sum(1))

        h_kl, h_kk, h_ll = h(kl, rk, rl, dk, dl), h(kk, rk, rk, dk, dk), h(ll, rl, rl, dl, dl)
        ok = (h_kk > tol * kk) & (h_ll > tol * ll)
        out.append(cka_ops.ratio(h_kl, h_kk, h_ll, ok))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64, device=k.device)


def _permutation_sums(a: Tensor, b: Tensor, perms: Tensor) -> Tensor:
    """Σ_ij a_ij b_π(i)π(j) for each permutation (R, n): (R,) float64."""
    n = a.shape[0]
    sums = []
    for s0, s1 in _chunks(perms.shape[0], n, REPLICATE_CHANNELS[PERMUTE]):
        rows = torch.ops.repkern.replicate_rows(a, b, perms[s0:s1].to(torch.int32), PERMUTE)
        sums.append(rows[:, :, 0].sum(1))
    return torch.cat(sums)


def cka_test(
    x: Tensor,
    y: Tensor,
    kernel: str = "linear",
    *,
    debiased: bool = False,
    n_permutations: int = 1000,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    median: str = "full",
    max_gram_bytes: Optional[int] = None,
) -> CkaTestResult:
    """Permutation test of independence and bootstrap interval for CKA(x, y).

    Args:
        x, y: ``(n, d1)``, ``(n, d2)``: the same n samples, same dtype and device.
        kernel, debiased, sigma, threshold, median: as :func:`repkern.cka` (defaults: linear,
            biased). The RBF bandwidth is taken once from the full data and kept for every
            permutation and bootstrap replicate.
        n_permutations: permutations of y's rows for the null distribution (0: no p-value).
        n_bootstrap: bootstrap draws of rows with replacement (0: no interval).
        seed: the resampling plan (:func:`repkern._common.replicate_indices`, drawn on the
            CPU): the same permutations and draws on every device; results repeat exactly on a device.
        ci: level of the percentile interval.
        max_gram_bytes: budget for the two n×n Gram matrices held (default
            ``REPKERN_MAX_GRAM_BYTES`` or 1 GiB); above it, ValueError.

    Returns:
        :class:`~repkern.CkaTestResult` with ``cka``, ``p_value``
        = (1 + #{null >= cka}) / (1 + n_permutations), ``ci_low``, ``ci_high``, ``null``,
        ``bootstrap``; float32 (float64 for float64 inputs). A constant x or y (or a self-HSIC
        at rounding level) gives NaN everywhere with a RuntimeWarning; NaN/Inf inputs give
        NaN everywhere without one. Bootstrap replicates whose CKA is undefined (too few distinct
        rows) are NaN in ``bootstrap`` and left out of the interval. Not differentiable.
    """
    sigma, threshold, ci = _validation.check_cka_test_args(x, y, kernel, debiased, n_permutations, n_bootstrap, seed,
                                                         ci, sigma, threshold, median)
    if _native.use_reference():
        return reference.cka_test(x, y, kernel, debiased=debiased, n_permutations=n_permutations,
                                  n_bootstrap=n_bootstrap, seed=seed, ci=ci, sigma=sigma, threshold=threshold,
                                  median=median)
    n = x.shape[0]
    budget = cka_ops.gram_budget(max_gram_bytes)
    need = 2 * n * n * cka_ops.acc_itemsize(x.dtype)
    if need > budget:
        raise ValueError(f"x: cka_test holds two n×n Gram matrices ({need / 2**20:.0f} MiB for n={n}) > "
                         f"max_gram_bytes={budget}")
    stat = _common.stat_dtype(x.dtype)
    perms, boots = torch.ops.repkern.replicate_indices(n, n_permutations, n_bootstrap, seed >> 32, seed & 0xFFFFFFFF,
                                                       x.device)
    with torch.no_grad():
        x, y = x.detach(), y.detach()
        k = gram(cka_ops.prepare(x[None], kernel)[0][0], kernel, sigma=sigma, threshold=threshold, median=median)
        l = gram(cka_ops.prepare(y[None], kernel)[0][0], kernel, sigma=sigma, threshold=threshold, median=median)
        boot = _bootstrap(k, l, boots, debiased)
        kc, lc = reference.center_gram(k.double(), debiased), reference.center_gram(l.double(), debiased)
        h_kk, h_ll = (kc * kc).sum(), (lc * lc).sum()
        tol = _common.zero_variance_tolerance(x.dtype)
        # tensors, not Python bools: no data-dependent branch (torch.compile traces it in one graph)
        finite = _common.all_finite(x) & _common.all_finite(y)
        bad_x = _common.constant_rows(x) | ~(h_kk > tol * (k.double() ** 2).sum())
        bad_y = _common.constant_rows(y) | ~(h_ll > tol * (l.double() ** 2).sum())
        a, b = kc.to(k.dtype), lc.to(l.dtype)
        del kc, lc, k, l
        identity = torch.arange(n, device=x.device)[None]
        sums = _permutation_sums(a, b, torch.cat([identity, perms]))
        values = sums / (h_kk * h_ll).sqrt()
        observed, null = values[0], values[1:]
    if not torch.compiler.is_compiling() and bool(finite & (bad_x | bad_y)):
        names = [name for name, bad in (("x", bad_x), ("y", bad_y)) if bool(bad)]
        warnings.warn(f"repkern.cka_test: {', '.join(names)}: zero variance (constant representation, or a "
                      "self-HSIC at the rounding level of its Gram entries); every result is NaN",
                      RuntimeWarning, stacklevel=2)
    ok = finite & ~bad_x & ~bad_y
    observed, null, boot = (torch.where(ok, t, torch.full_like(t, torch.nan)) for t in (observed, null, boot))
    return finish(observed, null, boot, ci, stat)
