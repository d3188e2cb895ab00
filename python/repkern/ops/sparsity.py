"""Activation sparsity statistics: ``repkern.sparsity_stats``, ``repkern.SparsityAccumulator`` and the custom op.

Custom op (fake impl registered; no autograd: counts, thresholds and sorts have no useful gradient, so
the public functions detach their input):
  repkern::sparsity_stats(x (N, d), eps, top_p (P floats), ordered)
      -> (feature state (10, d) float64, row channels (C, N) in the accumulation dtype,
          row counts (2, N) int64: l0 and nonfinite, exact for any d)
  repkern::sparsity_row_summaries(row counts (2, N), row channels (C, N), histogram divisors (2 + C,), bins)
      [CPU] -> (per count and channel: sum of the non-NaN values, their count, histogram on [0, 1]): what a
      batch adds to the per-row summaries; results.sparsity.row_summary_parts is the torch form (CUDA,
      reference).
The feature state holds, per feature, count / fired / NaN counts, mean and central moment sums M2..M4,
min, max, Σ|a| (csrc/common/sparsity_math.h): partial states merge exactly (Chan/Pébay, float64), which
is what the accumulator does across batches and processes.

Path: CPU tensors -> one native call (one read of x). CUDA / emulator -> ``sparsity_features`` (one read:
per-feature state, row totals, sort-free row channels), then, for the ordered statistics,
``sparsity_ordered`` (per-row sort in shared memory; rows longer than its buffer are sorted by torch.sort
in chunks of rows and passed in sorted).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor

from repkern import _common, _native, _validation, reference
from repkern._constants import (SPARSITY_FEATURE_FIELDS, SPARSITY_ORDERED_SUMS, SPARSITY_ROW_CHANNELS,
                                SPARSITY_ROW_COUNTS, SPARSITY_ROW_TOTALS, SPARSITY_SORT_FREE_CHANNELS,
                                sparsity_row_channels)
from repkern._distributed import all_gather_states, group_device
from repkern.results import sparsity as sr

__all__ = ["sparsity_stats", "SparsityAccumulator"]

SPARSITY_STATS = _native.kernel("sparsity_stats", cuda=False)
SPARSITY_MERGE_STATES = _native.kernel("sparsity_merge_states", cuda=False)
SPARSITY_ROW_SUMMARIES = _native.kernel("sparsity_row_summaries", cuda=False)
SPARSITY_PLAN = _native.kernel("sparsity_plan", cpu=False)
SPARSITY_MAX_SMEM_SORT = _native.kernel("sparsity_max_smem_sort", cpu=False)
SPARSITY_FEATURES = _native.kernel("sparsity_features", cpu=False)
SPARSITY_ORDERED = _native.kernel("sparsity_ordered", cpu=False)

FEATURE_FIELDS = SPARSITY_FEATURE_FIELDS
PRESORT_CHUNK_BYTES = 64 << 20  # bound on the torch.sort workspace of the long-row fallback


# ---- repkern::sparsity_stats ------------------------------------------------------------


def _ordered_cuda(x: Tensor, top: Tensor, totals: Tensor, out: Tensor) -> None:
    rows, d = x.shape
    sums = torch.empty((SPARSITY_ORDERED_SUMS + 2 * top.numel(), rows), dtype=torch.float64, device=x.device)
    capacity = _native.call(SPARSITY_MAX_SMEM_SORT, x.device, _native.DTYPE_CODES[x.dtype])
    if d <= capacity:
        _native.call(SPARSITY_ORDERED, x.device, x, None, 0, rows, top, totals, sums, out)
        return
    acc = out.dtype
    chunk = max(1, PRESORT_CHUNK_BYTES // (d * (acc.itemsize + 8)))
    for begin in range(0, rows, chunk):
        end = min(rows, begin + chunk)
        part = x[begin:end].to(acc)
        keys = torch.where(torch.isfinite(part), part.abs(), torch.full_like(part, math.inf))
        ascending = torch.sort(keys, dim=1).values
        _native.call(SPARSITY_ORDERED, x.device, x, ascending, begin, end, top, totals, sums, out)


@torch.library.custom_op("repkern::sparsity_stats", mutates_args=())
def _sparsity_op(x: Tensor, eps: float, top_p: Sequence[float], ordered: bool) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, d) -> (feature state (10, d) float64, row channels (C, N) in the accumulation dtype, row
    counts (2, N) int64)."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    rows, d = x.shape
    acc = _common.acc_dtype(x.dtype)
    state = torch.empty((len(FEATURE_FIELDS), d), dtype=torch.float64, device=x.device)
    out = torch.empty((sparsity_row_channels(len(top_p), ordered), rows), dtype=acc, device=x.device)
    counts = torch.empty((len(SPARSITY_ROW_COUNTS), rows), dtype=torch.int64, device=x.device)
    top = torch.tensor(list(top_p), dtype=torch.float64, device=x.device)
    if _native.backend_for(x.device) == "cpu":
        _native.call(SPARSITY_STATS, x.device, x, eps, top, ordered, state, out, counts)
        return state, out, counts
    _, splits = _native.call(SPARSITY_PLAN, x.device, _native.DTYPE_CODES[x.dtype], rows, d)
    partials = torch.empty((splits, len(FEATURE_FIELDS), d), dtype=acc, device=x.device)
    totals = torch.zeros((SPARSITY_ROW_TOTALS, rows), dtype=torch.float64, device=x.device)
    _native.call(SPARSITY_FEATURES, x.device, x, eps, partials, totals, state, out, counts)
    if ordered and rows > 0:
        _ordered_cuda(x, top, totals, out)
    return state, out, counts


@_sparsity_op.register_fake
def _(x, eps, top_p, ordered):
    rows, d = x.shape
    acc = _common.acc_dtype(x.dtype)
    return (x.new_empty((len(FEATURE_FIELDS), d), dtype=torch.float64),
            x.new_empty((sparsity_row_channels(len(top_p), ordered), rows), dtype=acc),
            x.new_empty((len(SPARSITY_ROW_COUNTS), rows), dtype=torch.int64))


# ---- feature states and results ---------------------------------------------------------


def empty_feature_state(d: int, device=None) -> Tensor:
    state = torch.zeros((len(FEATURE_FIELDS), d), dtype=torch.float64, device=device)
    state[FEATURE_FIELDS.index("min")] = math.inf
    state[FEATURE_FIELDS.index("max")] = -math.inf
    return state


def merge_feature_states(a: Tensor, b: Tensor) -> Tensor:
    """Union of two feature states (10, d): natively on the CPU (merge_moments of
    csrc/common/sparsity_math.h; 0.08 vs 0.29 ms at d = 4096, on every accumulator update), else in torch."""
    if not _native.use_reference() and _native.backend_for(a.device) == "cpu":
        merged = a.clone()
        _native.call(SPARSITY_MERGE_STATES, a.device, merged, b.contiguous())
        return merged
    return merge_feature_states_torch(a, b)


def merge_feature_states_torch(a: Tensor, b: Tensor) -> Tensor:
    """merge_feature_states in torch: Chan/Pébay moment merge in float64, the same formulas as
    merge_moments in csrc/common/sparsity_math.h; counts and Σ|a| add, min/max combine."""
    na, nfa, nna, ma, m2a, m3a, m4a, mina, maxa, absa = a.unbind(0)
    nb, nfb, nnb, mb, m2b, m3b, m4b, minb, maxb, absb = b.unbind(0)
    n = na + nb
    inv_n = torch.where(n > 0, 1 / n.clamp_min(1), torch.zeros_like(n))
    delta = mb - ma
    delta_n = delta * inv_n
    delta_n2 = delta_n * delta_n
    na_nb = na * nb
    term = delta * delta_n * na_nb
    mean = torch.where(na == 0, mb, ma + delta_n * nb)
    m2 = m2a + m2b + term
    m3 = m3a + m3b + term * delta_n * (na - nb) + 3 * delta_n * (na * m2b - nb * m2a)
    m4 = (m4a + m4b + term * delta_n2 * (na * na - na_nb + nb * nb) + 6 * delta_n2 * (na * na * m2b + nb * nb * m2a)
          + 4 * delta_n * (na * m3b - nb * m3a))
    return torch.stack([n, nfa + nfb, nna + nnb, mean, m2, m3, m4, torch.minimum(mina, minb),
                        torch.maximum(maxa, maxb), absa + absb])


def _channel_names(top_p: tuple, ordered: bool) -> list:
    """Name of each row channel (row of the (C, N) floating output); the top-p ones repeat once per p.
    The counts (l0, nonfinite) are the rows of the separate int64 output, SPARSITY_ROW_COUNTS."""
    names = list(SPARSITY_ROW_CHANNELS[:SPARSITY_SORT_FREE_CHANNELS])
    if ordered:
        names += list(SPARSITY_ROW_CHANNELS[SPARSITY_SORT_FREE_CHANNELS:]) + ["top_p_l1"] * len(top_p) + ["top_p_l2"] * len(top_p)
    return names


def _channels_of(names: list, name: str, num_top_p: int):
    """Index (or slice, for top_p_*) of statistic `name` among the row channels `names`."""
    first = names.index(name)
    return slice(first, first + num_top_p) if name.startswith("top_p") else first


@torch.library.custom_op("repkern::sparsity_row_summaries", mutates_args=())
def _row_summaries_op(counts: Tensor, out: Tensor, histogram_divisor: Tensor, bins: int
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Row counts (2, N) int64 and row channels (C, N) on the CPU -> per count, then per channel (S = 2 + C):
    (sum of the non-NaN values (S,) float64, their count (S,) int64, histogram (S, bins) int64 of value /
    divisor on [0, 1] where divisor > 0)."""
    summaries = counts.shape[0] + out.shape[0]
    sums = torch.empty(summaries, dtype=torch.float64)
    defined = torch.empty(summaries, dtype=torch.int64)
    hist = torch.empty((summaries, bins), dtype=torch.int64)
    _native.call(SPARSITY_ROW_SUMMARIES, out.device, counts, out, histogram_divisor, sums, defined, hist)
    return sums, defined, hist


@_row_summaries_op.register_fake
def _(counts, out, histogram_divisor, bins):
    summaries = counts.shape[0] + out.shape[0]
    return (out.new_empty(summaries, dtype=torch.float64), out.new_empty(summaries, dtype=torch.int64),
            out.new_empty((summaries, bins), dtype=torch.int64))


def _native_row_summaries(out: Tensor, counts: Tensor, top_p: tuple, ordered: bool, d: int, bins: int
                          ) -> tuple[dict, dict, dict]:
    """sr.row_summary_parts of the row counts (2, N) and channels (C, N), in one native pass over them (CPU):
    the torch form costs ~20 small torch calls, about as long as the kernel itself on a batch of a few
    hundred rows."""
    names = list(SPARSITY_ROW_COUNTS) + _channel_names(top_p, ordered)
    sources = {h: sr.row_histogram_source(h) for h in sr.ROW_HISTOGRAM_STATS}
    over_d = dict(sources.values())  # channel -> divided by d
    divisor = [(float(d) if over_d[n] else 1.0) if n in over_d else 0.0 for n in names]
    sums, defined, hist = torch.ops.repkern.sparsity_row_summaries(
        counts, out, torch.tensor(divisor, dtype=torch.float64), bins)
    stat = {n: _channels_of(names, n, len(top_p)) for n in sr.ROW_STATS if n in names}
    histogram = {h: stat[source] for h, (source, _) in sources.items() if source in stat}
    return ({n: sums[c] for n, c in stat.items()}, {n: defined[c] for n, c in stat.items()},
            {n: hist[c] for n, c in histogram.items()})


def _row_dict(out: Tensor, counts: Tensor, top_p: tuple, ordered: bool) -> dict:
    """Row counts (2, N) int64 and channels (C, N) -> {name: (N,) or (N, P)}, the counts (int64) first."""
    names = _channel_names(top_p, ordered)
    rows = dict(zip(SPARSITY_ROW_COUNTS, counts.unbind(0)))
    rows.update({name: out[_channels_of(names, name, len(top_p))] for name in dict.fromkeys(names)})
    for name in ("top_p_l1", "top_p_l2"):
        if name in rows:
            rows[name] = rows[name].T
    return rows


def _run(a: Tensor, eps: float, top_p: tuple, ordered: bool, row_bins: int) -> tuple[Tensor, dict, tuple]:
    """a (..., d) -> (feature state, per-row dict of (N,) / (N, P) tensors, row summary parts), honouring
    REPKERN_BACKEND."""
    d = a.shape[-1]
    x = a.detach().reshape(-1, d)
    if _native.use_reference():
        per_row = reference.sparsity_rows(x, eps, top_p, ordered)
        return reference.sparsity_feature_state(x, eps), per_row, sr.row_summary_parts(per_row, d, row_bins)
    state, out, counts = torch.ops.repkern.sparsity_stats(x, eps, list(top_p), ordered)
    per_row = _with_empty_top_p(_row_dict(out, counts, top_p, ordered), top_p, ordered)
    if _native.backend_for(out.device) == "cpu":
        parts = _native_row_summaries(out, counts, top_p, ordered, d, row_bins)
        if ordered and not top_p:  # the kernels write no top-p channel: the empty summaries, as the reference's
            for mine, empty in zip(parts, sr.row_summary_parts(
                    {k: per_row[k] for k in ("top_p_l1", "top_p_l2")}, d, row_bins)):
                mine.update(empty)
        return state, per_row, parts
    return state, per_row, sr.row_summary_parts(per_row, d, row_bins)


def _with_empty_top_p(per_row: dict, top_p: tuple, ordered: bool) -> dict:
    """With top_p=() (and ordered), the top-p fields are (N, 0) tensors, as documented (last dim len(top_p))
    and as the reference returns them; the kernels write no channel for them."""
    if ordered and not top_p:
        empty = per_row["l1"].new_zeros((per_row["l1"].shape[0], 0))
        per_row.update(top_p_l1=empty, top_p_l2=empty.clone())
    return per_row


# ---- public API ---------------------------------------------------------------------------------


def sparsity_stats(
    a: Tensor,
    *,
    eps: float = 0.0,
    top_p=(0.01, 0.05, 0.1),
    dense_threshold: float = 0.1,
    density_bins: int = 50,
    row_bins: int = 20,
    ordered: bool = True,
) -> sr.SparsityStats:
    """Sparsity statistics of activations ``a`` in one read (definitions: docs/conventions.md).

    Args:
        a: ``(..., d)``: rows = samples/tokens (any leading dims, at least one row), last dim = d
            features; float32, float64, float16 or bfloat16; CPU or CUDA; non-contiguous is fine
            (a copy is made only when the last dim is strided or the leading dims cannot be flattened).
        eps: an entry "fires" (counts in L0 and feature firing) when ``|a| > eps`` (eps >= 0).
        top_p: up to 8 fractions p in (0, 1]; top-p mass = share of Σ|a| (``top_p_l1``) and of Σa²
            (``top_p_l2``) held by the ⌈p·n⌉ largest ``|a|`` of the row (at least one entry).
        dense_threshold: a feature is dense when its firing frequency is above this.
        density_bins: bins of the log10 feature-density histogram on [−10, 0].
        row_bins: bins of the per-row histograms on [0, 1].
        ordered: also compute Gini, top-p masses, thresholded L0 and effective ranks (a second look at
            each row: from cache on the CPU, a per-row sort kernel on CUDA). ``False`` gives the one-read
            subset: per-feature statistics, L0, L1, L2, Hoyer.

    Returns:
        :class:`repkern.SparsityStats` (fields and degenerate cases documented there):
        floating statistics in float32 (float64 for float64 input), counts int64.

    NaN/Inf policy: non-finite entries are counted (per feature: ``nan_count``, ``inf_count``; per row:
    ``nonfinite``; totals) and excluded from every other statistic. Effective rank uses both
    normalizations: ``effective_rank_l1`` (``p = |a|/Σ|a|``) and ``effective_rank_l2`` (``p = a²/Σa²``).
    Accumulation: float32 within a block of rows, float64 for row sums, merges across blocks and moments.
    Not differentiable (the input is detached).
    """
    eps, top_p, dense_threshold = _validation.check_sparsity_args(
        a, eps, top_p, dense_threshold, density_bins, row_bins, ordered)
    if _native.use_reference():
        return reference.sparsity_stats(a, eps=eps, top_p=top_p, dense_threshold=dense_threshold,
                                        density_bins=density_bins, row_bins=row_bins, ordered=ordered)
    d = a.shape[-1]
    state, per_row, (sums, defined, hists) = _run(a, eps, top_p, ordered, row_bins)
    lead = a.shape[:-1]
    shaped = {k: v.reshape(tuple(lead) + tuple(v.shape[1:])) for k, v in per_row.items()}  # a (d,) input: 0-d
    return sr.build_stats(state, a.numel() // d, shaped, sums, defined, hists, stat_dtype=_common.stat_dtype(a.dtype),
                  top_p=top_p, eps=eps, dense_threshold=dense_threshold, density_bins=density_bins,
                  row_bins=row_bins)


class SparsityAccumulator:
    """Streaming and distributed sparsity statistics over batches of activations with d features.

    ``update(a)`` adds a batch ``(..., d)``; ``compute()`` returns a
    :class:`~repkern.SparsityStats` equal to :func:`sparsity_stats` of all batches
    concatenated: per-feature statistics merge exactly (Chan/Pébay formulas in float64, so any batch split
    and any merge order give the same result up to float64 rounding), and per-row statistics are
    summarized (``row_mean``, ``row_defined``, ``row_histogram``); with ``keep_rows=True`` the per-row
    tensors are kept too (flattened to (N,), in update order; kept rows cost memory per row).
    ``merge(other)`` adds another accumulator's data; ``all_reduce(group)`` merges the accumulators of
    all processes of a torch.distributed group in place (every rank ends with the same result, merged in
    rank order), ``compute(sync=True)`` gives that result and leaves the local state alone (for
    evaluations while training); ``reset()`` forgets the data; ``state_dict()`` / ``load_state_dict()``
    checkpoint it.

    The state lives on ``device`` (default: the device of the first batch). Results are float32, or
    float64 once a float64 batch was added. Arguments as in :func:`sparsity_stats`; batches with no rows
    are ignored.
    """

    def __init__(self, d: int, *, eps: float = 0.0, top_p=(0.01, 0.05, 0.1), dense_threshold: float = 0.1,
                 density_bins: int = 50, row_bins: int = 20, ordered: bool = True, keep_rows: bool = False,
                 device=None):
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"d: expected an int, got {type(d).__name__}")
        if d < 1:
            raise ValueError(f"d: expected >= 1 features, got {d}")
        probe = torch.empty((0, d))  # validates the other arguments exactly as sparsity_stats does
        eps, top_p, dense_threshold = _validation.check_sparsity_args(
            probe, eps, top_p, dense_threshold, density_bins, row_bins, ordered, min_rows=0)
        _validation.boolean("keep_rows", keep_rows)
        self.d, self.eps, self.top_p, self.dense_threshold = d, eps, top_p, dense_threshold
        self.density_bins, self.row_bins, self.ordered, self.keep_rows = density_bins, row_bins, ordered, keep_rows
        self._device_setting = torch.device(device) if device is not None else None
        self.device = self._device_setting
        self._reset()

    # -- state ------------------------------------------------------------------------------

    @_common.outside_inference_mode
    def _reset(self):
        device = self.device or torch.device("cpu")
        self._state = empty_feature_state(self.d, device)
        self._rows = 0
        self._stat_dtype = torch.float32
        empty_rows = self._empty_row_dict(device)
        self._sums, self._defined, self._hists = sr.row_summary_parts(empty_rows, self.d, self.row_bins)
        self._kept: list[dict] = []

    def _empty_row_dict(self, device) -> dict:
        out = torch.empty((sparsity_row_channels(len(self.top_p), self.ordered), 0), dtype=torch.float64, device=device)
        counts = torch.empty((len(SPARSITY_ROW_COUNTS), 0), dtype=torch.int64, device=device)
        return _with_empty_top_p(_row_dict(out, counts, self.top_p, self.ordered), self.top_p, self.ordered)

    def _config(self) -> dict:
        return {"d": self.d, "eps": self.eps, "top_p": list(self.top_p), "dense_threshold": self.dense_threshold,
                "density_bins": self.density_bins, "row_bins": self.row_bins, "ordered": self.ordered,
                "keep_rows": self.keep_rows}

    def _check_compatible(self, config: dict, name: str) -> None:
        mine = self._config()
        for key, value in mine.items():
            if not _validation.same_setting(config.get(key), value):
                raise ValueError(f"{name}: incompatible accumulator ({key}={config.get(key)!r}, expected {value!r})")

    def _to_device(self, device: torch.device) -> None:
        self.device = device
        self._state = self._state.to(device)
        for parts in (self._sums, self._defined, self._hists):
            for k in parts:
                parts[k] = parts[k].to(device)

    def _add(self, state: Tensor, rows: int, sums: dict, defined: dict, hists: dict, stat_dtype: torch.dtype,
             kept: list) -> None:
        self._state = merge_feature_states(self._state, state.to(self._state.device))
        self._rows += rows
        for mine, theirs in ((self._sums, sums), (self._defined, defined), (self._hists, hists)):
            for k in mine:
                mine[k] = mine[k] + theirs[k].to(mine[k].device)
        if stat_dtype == torch.float64:
            self._stat_dtype = torch.float64
        self._kept.extend(kept)

    # -- public -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets all data: back to the state right after construction, settings (and the ``device``
        given there, or None to follow the next batch) kept."""
        self.device = self._device_setting
        self._reset()

    @_common.outside_inference_mode
    def update(self, a: Tensor) -> "SparsityAccumulator":
        """Adds the rows of a ``(..., d)`` batch."""
        _validation.check_sparsity_args(a, self.eps, self.top_p, self.dense_threshold, self.density_bins,
                                      self.row_bins, self.ordered, min_rows=0)
        if a.shape[-1] != self.d:
            raise ValueError(f"a: expected {self.d} features in the last dim, got shape {tuple(a.shape)}")
        if self.device is None:
            self._to_device(a.device)
        elif a.device != self.device:
            raise ValueError(f"a: accumulator lives on {self.device}, got a tensor on {a.device}")
        rows = a.numel() // self.d
        if rows == 0:
            return self
        state, per_row, (sums, defined, hists) = _run(a, self.eps, self.top_p, self.ordered, self.row_bins)
        self._add(state, rows, sums, defined, hists, _common.stat_dtype(a.dtype), [per_row] if self.keep_rows else [])
        return self

    @_common.outside_inference_mode
    def merge(self, other: "SparsityAccumulator") -> "SparsityAccumulator":
        """Adds the data of another accumulator with the same settings (in place; returns self)."""
        if not isinstance(other, SparsityAccumulator):
            raise TypeError(f"other: expected a SparsityAccumulator, got {type(other).__name__}")
        self._check_compatible(other._config(), "other")
        if self.device is None and other.device is not None:
            self._to_device(other.device)
        self._add(other._state, other._rows, other._sums, other._defined, other._hists, other._stat_dtype,
                  [{k: v.to(self._state.device) for k, v in rows.items()} for rows in other._kept])
        return self

    def compute(self, sync: bool = False, group=None) -> sr.SparsityStats:
        """The statistics of all rows added so far (see the class). ``sync=True``: of all ranks' rows in the
        torch.distributed ``group`` (a collective: every rank must call it), merged into a temporary as
        :meth:`all_reduce` merges, so this accumulator keeps only its own rows and can be computed again
        without counting any rank twice."""
        _validation.boolean("sync", sync)
        if sync:
            fresh = copy.copy(self)  # same settings; _merge_all_ranks rebinds its state before adding to it
            return self._merge_all_ranks(fresh, group).compute()
        per_row = None
        if self.keep_rows:
            parts = self._kept or [self._empty_row_dict(self._state.device)]
            per_row = {k: torch.cat([p[k].to(self._stat_dtype) if p[k].is_floating_point() else p[k] for p in parts])
                       for k in parts[0]}
        return sr.build_stats(self._state, self._rows, per_row, self._sums, self._defined, self._hists,
                      stat_dtype=self._stat_dtype, top_p=self.top_p, eps=self.eps,
                      dense_threshold=self.dense_threshold, density_bins=self.density_bins, row_bins=self.row_bins)

    def state_dict(self) -> dict:
        """Everything needed to continue: format version, settings, the feature state, row count and
        per-row summaries (and the kept rows with ``keep_rows=True``)."""
        sd = {"format_version": _validation.STATE_FORMAT_VERSION, "config": self._config(),
              "feature_state": self._state.clone(), "rows": self._rows,
              "stat_dtype": str(self._stat_dtype).replace("torch.", "")}
        for prefix, parts in (("row_sum", self._sums), ("row_defined", self._defined), ("row_histogram", self._hists)):
            sd.update({f"{prefix}/{k}": v.clone() for k, v in parts.items()})
        if self.keep_rows:
            sd["kept_rows"] = [{k: v.clone() for k, v in rows.items()} for rows in self._kept]
        return sd

    @_common.outside_inference_mode
    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a :meth:`state_dict` of an accumulator with the same settings, onto this accumulator's
        device if it has one. All or nothing: every entry is checked first (format version, settings,
        shapes and dtypes, counts, kept rows), and a rejected state dict (ValueError / TypeError naming the
        entry) leaves the accumulator as it was."""
        empty_sums, empty_defined, empty_hists = sr.row_summary_parts(self._empty_row_dict("cpu"), self.d,
                                                                      self.row_bins)
        groups = (("row_sum", empty_sums), ("row_defined", empty_defined), ("row_histogram", empty_hists))
        part_keys = [f"{prefix}/{k}" for prefix, parts in groups for k in parts]
        _validation.check_state_dict(state_dict, "SparsityAccumulator",
                                     ["feature_state", "rows", "stat_dtype", *part_keys]
                                     + (["kept_rows"] if self.keep_rows else []))
        self._check_compatible(state_dict["config"], "state_dict")
        state = _validation.state_tensor(state_dict["feature_state"], "feature_state",
                                         (len(FEATURE_FIELDS), self.d), torch.float64)
        rows = _validation.state_count(state_dict, "rows")
        stat_dtype = {"float32": torch.float32, "float64": torch.float64}.get(state_dict["stat_dtype"])
        if stat_dtype is None:
            raise ValueError(f"state_dict: stat_dtype must be 'float32' or 'float64', got {state_dict['stat_dtype']!r}")
        parsed = []
        for prefix, parts in groups:
            parsed.append({k: _validation.state_tensor(state_dict[f"{prefix}/{k}"], f"{prefix}/{k}", v.shape, v.dtype)
                           for k, v in parts.items()})
        kept = self._check_kept_rows(state_dict["kept_rows"], rows) if self.keep_rows else []
        device = torch.device(self.device or state.device)
        # every check passed: copy (a failing transfer still leaves the accumulator untouched), then swap
        moved_state = state.to(device).clone()
        moved = [{k: v.to(device).clone() for k, v in group.items()} for group in parsed]
        moved_kept = [{k: v.to(device).clone() for k, v in r.items()} for r in kept]
        self.device, self._state, self._rows, self._stat_dtype = device, moved_state, rows, stat_dtype
        self._sums, self._defined, self._hists = moved
        self._kept = moved_kept

    def _check_kept_rows(self, kept, rows: int) -> list:
        """kept_rows of a state dict: a list of per-row dicts as update keeps them, `rows` rows in all."""
        template = self._empty_row_dict("cpu")
        if not isinstance(kept, (list, tuple)):
            raise TypeError(f"state_dict: kept_rows must be a list of dicts, got {type(kept).__name__}")
        total = 0
        for i, part in enumerate(kept):
            if not isinstance(part, dict) or set(part) != set(template):
                raise ValueError(f"state_dict: kept_rows[{i}] must be a dict with keys {sorted(template)}")
            n = None
            for k, want in template.items():
                value = part[k]
                ok = (isinstance(value, Tensor) and value.dim() == want.dim() and value.shape[1:] == want.shape[1:]
                      and value.is_floating_point() == want.is_floating_point()
                      and (value.is_floating_point() or value.dtype == want.dtype))
                if not ok or (n is not None and value.shape[0] != n):
                    raise ValueError(f"state_dict: kept_rows[{i}][{k!r}] must be a tensor of shape (N, *"
                                     f"{tuple(want.shape[1:])}) like the part's other rows")
                n = value.shape[0]
            total += n
        if total != rows:
            raise ValueError(f"state_dict: kept_rows hold {total} rows, but rows={rows}")
        return list(kept)

    def _packed(self) -> Tensor:
        """Everything but kept rows as one float64 vector (counts are exact in float64 below 2^53)."""
        parts = [self._state.flatten(), torch.tensor([float(self._rows), float(self._stat_dtype == torch.float64)],
                                                      dtype=torch.float64, device=self._state.device)]
        for group in (self._sums, self._defined, self._hists):
            parts += [group[k].double().flatten() for k in sorted(group)]
        return torch.cat(parts)

    def _unpack_into(self, packed: Tensor) -> tuple:
        pos = 0

        def take(shape, dtype):
            nonlocal pos
            n = math.prod(shape)
            out = packed[pos : pos + n].reshape(shape).to(dtype)
            pos += n
            return out

        state = take(self._state.shape, torch.float64)
        rows, is64 = take((2,), torch.float64).tolist()
        groups = []
        for group in (self._sums, self._defined, self._hists):
            groups.append({k: take(group[k].shape, group[k].dtype) for k in sorted(group)})
        return state, int(rows), groups, torch.float64 if is64 else torch.float32

    def all_reduce(self, group=None) -> "SparsityAccumulator":
        """Merges the accumulators of every process in ``group`` (torch.distributed, any backend whose
        all_gather supports the state's device: gloo on CPU, NCCL on CUDA) in place. Collective: every rank
        must call it; afterwards each holds the merged statistics (merged in rank order, so all agree).
        All-reducing again would count every rank's rows again: to evaluate while training, use
        ``compute(sync=True)``, which leaves the local state alone. An accumulator with no ``device`` yet
        gathers on the group's (CUDA for NCCL, else the CPU)."""
        return self._merge_all_ranks(self, group)

    @_common.outside_inference_mode
    def _merge_all_ranks(self, into: "SparsityAccumulator", group) -> "SparsityAccumulator":
        """Every rank's state (this one's included) merged in rank order into `into`, which is emptied
        first (after this state was packed, so `into` may be self). Returns `into`."""
        import torch.distributed as dist

        device = self.device or group_device(group)
        signature = torch.tensor([self.d, self.eps, len(self.top_p), *self.top_p, *([-1.0] * (8 - len(self.top_p))),
                                  self.dense_threshold, self.density_bins, self.row_bins, float(self.ordered),
                                  float(self.keep_rows)], dtype=torch.float64)
        gathered = all_gather_states(self._packed().to(device), signature, group)
        world = len(gathered)
        kept = [None] * world
        if self.keep_rows:
            local = [{k: v.cpu() for k, v in rows.items()} for rows in self._kept]
            dist.all_gather_object(kept, local, group=group)
        into.device = device
        into._reset()
        for rank in range(world):
            state, rows, (sums, defined, hists), stat_dtype = into._unpack_into(gathered[rank])
            rank_rows = [{k: v.to(device) for k, v in r.items()} for r in kept[rank]] if self.keep_rows else []
            into._add(state, rows, sums, defined, hists, stat_dtype, rank_rows)
        return into

    def __repr__(self) -> str:
        return (f"SparsityAccumulator(d={self.d}, rows={self._rows}, eps={self.eps}, top_p={list(self.top_p)}, "
                f"ordered={self.ordered}, keep_rows={self.keep_rows}, device={self.device})")
