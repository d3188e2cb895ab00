"""Result type of :func:`repkern.sparsity_stats` and :class:`repkern.SparsityAccumulator`,
and the summaries both compute the same way from per-row and per-feature values.

Definitions: docs/conventions.md; fields documented on :class:`SparsityStats`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from repkern._constants import SPARSITY_FEATURE_FIELDS

# Per-feature state (10, d) float64, csrc/common/sparsity_math.h FeatureField: partial states of disjoint
# row sets merge exactly (Chan/Pébay); every per-feature result is computed from it by build_stats.
FEATURE_FIELDS = SPARSITY_FEATURE_FIELDS  # rows of the per-feature state
DENSITY_LOG10_FLOOR = -10.0  # SAELens: log10(frequency + 1e-10); dead features land in the lowest bin
# Per-row statistics whose values lie in [0, 1] get a histogram on fixed bins (mergeable across batches).
ROW_HISTOGRAM_STATS = ("l0_fraction", "hoyer", "gini", "thresholded_l0", "top_p_l1", "top_p_l2")
ROW_STATS = ("l0", "l1", "l2", "hoyer", "gini", "thresholded_l0", "effective_rank_l1", "effective_rank_l2",
             "top_p_l1", "top_p_l2")
ORDERED_ROW_STATS = ("gini", "thresholded_l0", "effective_rank_l1", "effective_rank_l2", "top_p_l1", "top_p_l2")


@dataclasses.dataclass(repr=False)
class SparsityStats:
    """Sparsity statistics of activations ``a`` of shape ``(..., d)`` (rows = samples, last dim = features).

    Per row (shape ``a.shape[:-1]``; ``top_p_*`` add a last dim of ``len(top_p)``). Non-finite entries are
    excluded: n = the row's number of finite entries takes the place of d::

      l0 (int64) #{|a| > eps};  l1 Σ|a|;  l2 ‖a‖₂;  nonfinite (int64) NaN/Inf entries in the row;
      hoyer (√n − l1/l2)/(√n − 1)  (1 one-hot, 0 flat; NaN for an all-zero row or n ≤ 1);
      gini  2Σ i·a₍ᵢ₎/(n Σa) − (n+1)/n over |a| ascending (NaN for an all-zero row);
      thresholded_l0  fraction of entries with |a| > mean(|a|) + std(|a|) (population std);
      top_p_l1 / top_p_l2  share of Σ|a| / of Σa² held by the ⌈p·n⌉ largest |a|, one per p in top_p;
      effective_rank_l1 / _l2  exp(entropy) of p = |a|/Σ|a| / of p = a²/Σa² (NaN for an all-zero row).
      The ordered fields (gini, thresholded_l0, top_p_*, effective_rank_*) are None with ordered=False,
      and in accumulator results unless keep_rows=True.

    Per feature (shape ``(d,)``), over the finite values of the feature::

      count (int64) finite values; fire_count (int64) #{|a| > eps}; frequency fire_count/count;
      mean; var (population); kurtosis (excess, m4/m2² − 3; NaN where var = 0); min; max; mean_abs;
      nan_count, inf_count (int64). A feature with no finite value has NaN statistics. A feature whose
      finite values are all equal has var exactly 0.

    Summary::

      dead (bool, d) fire_count == 0;  dense (bool, d) frequency > dense_threshold;  n_dead, n_dense;
      density_histogram (int64, bins) of log10(frequency + 1e-10) on density_edges = [−10, 0]
        (SAELens convention; dead features fall in the first bin; features with no finite value are left out);
      nan_total, inf_total (int64);  rows (number of rows);
      row_mean[stat] (float64) mean over the rows where the statistic is defined (not NaN);
      row_defined[stat] (int64) number of those rows;
      row_histogram[stat] (int64, bins; (P, bins) for top_p_*) on row_edges = [0, 1] for the
        statistics in [0, 1] (l0_fraction = l0/d, hoyer, gini, thresholded_l0, top_p_*).

    Floating results are float32 (float64 for float64 input).
    """

    l0: Optional[Tensor]
    l1: Optional[Tensor]
    l2: Optional[Tensor]
    hoyer: Optional[Tensor]
    nonfinite: Optional[Tensor]
    gini: Optional[Tensor]
    thresholded_l0: Optional[Tensor]
    effective_rank_l1: Optional[Tensor]
    effective_rank_l2: Optional[Tensor]
    top_p_l1: Optional[Tensor]
    top_p_l2: Optional[Tensor]
    count: Tensor
    fire_count: Tensor
    frequency: Tensor
    mean: Tensor
    var: Tensor
    kurtosis: Tensor
    min: Tensor
    max: Tensor
    mean_abs: Tensor
    nan_count: Tensor
    inf_count: Tensor
    dead: Tensor
    dense: Tensor
    n_dead: Tensor
    n_dense: Tensor
    density_histogram: Tensor
    density_edges: Tensor
    nan_total: Tensor
    inf_total: Tensor
    rows: int
    row_mean: dict
    row_defined: dict
    row_histogram: dict
    row_edges: Tensor
    top_p: tuple
    eps: float
    dense_threshold: float

    def to_dict(self) -> dict:
        """Flat dict: field name -> tensor or value (dict fields as ``row_mean/<stat>`` etc.)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, dict):
                out.update({f"{field.name}/{k}": v for k, v in value.items()})
            else:
                out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, flat: dict) -> "SparsityStats":
        """Inverse of :meth:`to_dict`; fields missing from ``flat`` are None (as uncomputed ones)."""
        values = {}
        for field in dataclasses.fields(cls):
            if field.type == "dict":
                prefix = field.name + "/"
                values[field.name] = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            else:
                values[field.name] = flat.get(field.name)
        values["top_p"] = tuple(values["top_p"])
        return cls(**values)

    def __repr__(self) -> str:
        d = self.count.shape[0]

        def mean_of(stat):
            value = self.row_mean.get(stat)
            if value is None:
                return "n/a"
            if value.dim() == 0:
                return f"{value.item():.4g}"
            return "[" + ", ".join(f"{v:.4g}" for v in value.tolist()) + "]"

        lines = [
            f"SparsityStats(rows={self.rows}, d={d}, eps={self.eps}, dtype={self.mean.dtype})",
            f"  per row (mean): l0={mean_of('l0')} l1={mean_of('l1')} l2={mean_of('l2')} hoyer={mean_of('hoyer')} "
            f"gini={mean_of('gini')} thresholded_l0={mean_of('thresholded_l0')}",
            f"                  effective_rank_l1={mean_of('effective_rank_l1')} "
            f"effective_rank_l2={mean_of('effective_rank_l2')}",
            f"                  top_p {list(self.top_p)}: l1 share={mean_of('top_p_l1')} l2 share={mean_of('top_p_l2')}",
            f"  per feature: dead={int(self.n_dead)} ({100.0 * int(self.n_dead) / max(d, 1):.1f}%) "
            f"dense(>{self.dense_threshold:g})={int(self.n_dense)} "
            f"frequency mean={self.frequency.double().nanmean().item():.4g}",
            f"  non-finite: nan={int(self.nan_total)} inf={int(self.inf_total)}",
        ]
        return "\n".join(lines)


def histogram(values: Tensor, bins: int, lo: float, hi: float) -> Tensor:
    """Counts (int64, bins) of `values` in `bins` equal bins over [lo, hi] (hi in the last bin; values
    outside, NaN included, ignored): torch.histc's binning, by index and bincount (torch.histc on the CPU
    costs milliseconds per call)."""
    inside = (values >= lo) & (values <= hi)
    scaled = ((values - lo) * (bins / (hi - lo))).clamp(0, bins - 1)
    # Truncation is floor here (scaled >= 0); Tensor.floor is avoided: it is erratically slow on some CPUs.
    index = torch.where(inside, scaled, torch.full_like(scaled, bins)).to(torch.int64)  # bin `bins`: dropped
    return torch.bincount(index.flatten(), minlength=bins + 1)[:bins]


def density_edges(bins: int, device=None) -> Tensor:
    return torch.linspace(DENSITY_LOG10_FLOOR, 0.0, bins + 1, dtype=torch.float64, device=device)


def density_histogram(frequency: Tensor, bins: int) -> Tensor:
    """SAELens-style histogram (int64, bins) of log10(frequency + 1e-10) on [−10, 0]; frequency (float64) is
    NaN for features with no finite value, which are left out."""
    values = torch.log10(frequency + 1e-10).clamp_max(0.0)  # frequency 1 lands in the last bin; NaN stays NaN
    return histogram(values, bins, DENSITY_LOG10_FLOOR, 0.0)


def row_edges(bins: int, device=None) -> Tensor:
    return torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=device)


def row_histogram_source(name: str) -> tuple[str, bool]:
    """The per-row statistic that row histogram `name` bins, and whether it is divided by d first."""
    return ("l0", True) if name == "l0_fraction" else (name, False)


def row_summary_parts(rows: dict, d: int, bins: int) -> tuple[dict, dict, dict]:
    """(sum, defined count, histogram) per row statistic of one batch; `rows` maps names of ROW_STATS to
    per-row tensors (N,) or (N, P) (None when not computed). Sums in float64 over defined (non-NaN) rows;
    summed across batches they give the row means and histograms of the whole stream."""
    sums, defined, hists = {}, {}, {}
    for name in ROW_STATS:
        value = rows.get(name)
        if value is None:
            continue
        v = value.double()
        ok = ~torch.isnan(v)
        sums[name] = torch.where(ok, v, torch.zeros_like(v)).sum(0)
        defined[name] = ok.sum(0)
    for name in ROW_HISTOGRAM_STATS:
        source, over_d = row_histogram_source(name)
        value = rows.get(source)
        if value is None:
            continue
        v = value.double() / d if over_d else value.double()
        v = v.clamp(0.0, 1.0)  # rounding can put a share of 1 or a Hoyer of 0 a hair outside; NaN stays NaN
        if v.dim() == 2:  # (N, P): one histogram per p; (0, bins) for top_p=()
            hists[name] = (torch.stack([histogram(v[:, i], bins, 0.0, 1.0) for i in range(v.shape[1])]) if v.shape[1]
                           else torch.zeros((0, bins), dtype=torch.int64, device=v.device))
        else:
            hists[name] = histogram(v, bins, 0.0, 1.0)
    return sums, defined, hists


def row_means(sums: dict, defined: dict) -> dict:
    return {k: sums[k] / defined[k] for k in sums}  # float64 / int64: true division in float64


def build_stats(state: Tensor, rows: int, per_row: Optional[dict], sums: dict, defined: dict, hists: dict, *,
                stat_dtype: torch.dtype, top_p: tuple, eps: float, dense_threshold: float, density_bins: int,
                row_bins: int) -> SparsityStats:
    """The result from a feature state (10, d), the per-row tensors (or None) and the row summary parts.
    Few, batched torch calls: this runs after every kernel call, where each small op costs microseconds."""
    count_f, fired_f, _nan_f, mean, m2, _m3, m4, fmin, fmax, abs_sum = state.unbind(0)
    count, fire_count, nan_count = state[:3].to(torch.int64).unbind(0)
    frequency = fired_f / count_f  # NaN for a feature with no finite value
    constant = fmin == fmax  # all finite values equal: exactly no spread
    var = (m2 / count_f).masked_fill(constant, 0.0)
    kurtosis = (count_f * m4 / (m2 * m2) - 3).masked_fill(constant | (m2 == 0), math.nan)
    floating = torch.stack([frequency, mean, var, kurtosis, fmin, fmax, abs_sum / count_f])
    floating = floating.masked_fill(count_f == 0, math.nan).to(stat_dtype)
    frequency_s, mean_s, var_s, kurtosis_s, min_s, max_s, mean_abs_s = floating.unbind(0)
    inf_count = rows - count - nan_count
    dead = fire_count == 0
    dense = frequency > dense_threshold
    n_dead, n_dense = torch.stack([dead, dense]).sum(1).unbind(0)
    nan_total, inf_total = torch.stack([nan_count, inf_count]).sum(1).unbind(0)

    per_row = per_row or {}
    return SparsityStats(
        l0=per_row.get("l0"), l1=per_row.get("l1"), l2=per_row.get("l2"), hoyer=per_row.get("hoyer"),
        nonfinite=per_row.get("nonfinite"), gini=per_row.get("gini"), thresholded_l0=per_row.get("thresholded_l0"),
        effective_rank_l1=per_row.get("effective_rank_l1"), effective_rank_l2=per_row.get("effective_rank_l2"),
        top_p_l1=per_row.get("top_p_l1"), top_p_l2=per_row.get("top_p_l2"),
        count=count, fire_count=fire_count, frequency=frequency_s,
        mean=mean_s, var=var_s, kurtosis=kurtosis_s, min=min_s, max=max_s,
        mean_abs=mean_abs_s, nan_count=nan_count, inf_count=inf_count,
        dead=dead, dense=dense, n_dead=n_dead, n_dense=n_dense,
        density_histogram=density_histogram(frequency, density_bins),
        density_edges=density_edges(density_bins, state.device),
        nan_total=nan_total, inf_total=inf_total, rows=rows,
        row_mean=row_means(sums, defined), row_defined=defined, row_histogram=hists,
        row_edges=row_edges(row_bins, state.device),
        top_p=top_p, eps=eps, dense_threshold=dense_threshold,
    )
