"""``repkern.StreamingAlignment``: linear CKA, shape distances, CCA, SVCCA and PWCCA of every pair of
layers from one pass over a dataset.

Every one of these metrics is a function of the centered second-order statistics of the pair,
A = X̄ᵀX̄, B = ȲᵀȲ, C = X̄ᵀȲ and n (:mod:`repkern.ops._second_order`), and those are exactly what
:class:`repkern.StreamingCKA` accumulates: per layer a shift c_a and s_a = Σ(x − c_a), per pair
M_ab = Σ(x_a − c_a)(x_b − c_b)ᵀ, merged across batches, processes and checkpoints by the exact shift
algebra of ``repkern.ops.streaming._shift``. Moving every layer onto the overall mean (δ_a = −s_a/n)
gives M_aa = A, M_bb = B, M_ab = C of all rows seen, whatever the batch sizes. So this class is
StreamingCKA's state and code (update, merge, state_dict / load_state_dict, all_reduce) with two
changes: the per-batch products are taken in float64 (StreamingCKA multiplies in the input's
accumulation dtype, float32 for float32 input, enough for CKA but not for whitening: the small
eigenvalues of A are what CCA and partial whitening divide by), and :meth:`compute` takes the metric.

SVCCA's SVD directions and PWCCA's weights come from the same statistics: the SVD of the centered
layer is X̄ = U Λ^½ Vᵀ with A = V Λ Vᵀ, so the top-k SVD directions are the top-k eigenvectors of A and
the reduced layer X̄V_k has Gram blocks Λ_k (itself) and V_kᵀ C V'_k (with the other side's reduction);
PWCCA's ⟨h_i, x_j⟩ for a canonical variate h_i = X̄ a_i is (A a_i)_j.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from repkern import _validation
from repkern._validation.cca import check_svcca_options
from repkern._validation.shape import check_shape_options
from repkern.ops import _second_order as so
from repkern.ops.cca import pwcca_from_stats, svcca_from_stats
from repkern.ops.shape import shape_from_stats
from repkern.ops.streaming import StreamingCKA, _positional_layers, _shift, _streaming_pairs

__all__ = ["StreamingAlignment", "METRICS"]

METRICS = ("cka", "shape_distance", "cca", "svcca", "pwcca")
_OPTIONS = {"cka": {}, "shape_distance": {"alpha": 1.0, "score": "angular"}, "cca": {}, "svcca": {"dims": None,
            "keep": 0.99}, "pwcca": {}}
_NAN_WHEN_CONSTANT = {"shape_distance": "the angular shape distance is NaN", "svcca": "SVCCA is NaN",
                      "pwcca": "PWCCA is NaN"}


class StreamingAlignment(StreamingCKA):
    """Exact linear alignment metrics over batches, from mergeable float64 second-order statistics.

    ``StreamingAlignment(debiased=False, *, max_state_bytes=None, hold_rows=None, device=None)``

    ``update(xs, ys)`` adds a batch of the layers of two models (``ys=None``: xs against itself), as
    :meth:`repkern.StreamingCKA.update`; ``merge``, ``reset``, ``state_dict`` / ``load_state_dict`` and
    ``all_reduce`` as StreamingCKA's (a StreamingAlignment merges and all-reduces only with
    StreamingAlignments). Then, from the same state, any number of times (each also with ``sync=True``:
    of all ranks' data, the local state left alone):

    - ``compute()`` / ``compute("cka")``: the linear CKA matrix (``debiased`` as constructed), as
      :meth:`repkern.StreamingCKA.compute`;
    - ``compute("shape_distance", alpha=1.0, score="angular")``: :func:`repkern.shape_distance`;
    - ``compute("cca")``: :func:`repkern.cca` of every pair;
    - ``compute("svcca", dims=None, keep=0.99)``: :func:`repkern.svcca`;
    - ``compute("pwcca")``: :func:`repkern.pwcca` (weights from the xs layer: entry (i, j) is
      ``pwcca(xs[i], ys[j])``).

    Each equals the one-shot function over all rows seen (``cat`` of the batches) up to float64 rounding
    (decisions on rounding-level quantities, such as a numerical rank or SVCCA's ``keep`` cut, can
    differ when the data sit on the boundary), whatever the batch sizes; a batch may have a single row.
    Scalar metrics come as an ``(len(xs), len(ys))`` tensor (ys=None: ``(len(xs), len(xs))``, exactly
    symmetric except for pwcca, each layer against itself exactly 0 for shape_distance and 1 for the
    correlations, where the one-shot functions leave rounding, up to sqrt(ε) for the angular score), float32,
    or float64 once a float64 batch was added; "cca" as a list of
    lists of 1-D tensors (``[i][j]`` = canonical correlations of xs[i] and ys[j]). Degenerate input as in
    the one-shot functions: NaN where a layer held NaN/Inf (cca: all NaN), NaN with one RuntimeWarning
    naming the layers where a constant layer makes the metric undefined, ValueError naming the layer for
    full whitening (alpha=0) of a rank-deficient or zero-padded layer.

    Memory: StreamingCKA's state — per pair of layers with statistics d_a·d_b float64 — independent of
    the number of rows; ``max_state_bytes`` (default 1 GiB) caps it; small batches are held and added
    together as StreamingCKA's (``hold_rows``). Cost per batch of b rows: the
    d_a·d_b·b products of each pair in float64 (on GPUs without fast float64, much slower than
    StreamingCKA's float32 products); compute: an eigendecomposition per layer and an SVD per pair.
    """

    def __init__(self, debiased: bool = False, *, max_state_bytes: Optional[int] = None,
                 hold_rows: Optional[int] = None, device=None):
        super().__init__("linear", debiased, max_state_bytes=max_state_bytes, hold_rows=hold_rows, device=device)

    def _config(self) -> dict:
        return {"class": "StreamingAlignment", "kernel": self.kernel, "debiased": self.debiased}

    def _signature(self) -> list[float]:
        return [3.0, float(self.debiased)]

    def _batch_stats(self, layers: list[Tensor], layout, held=None) -> dict:
        # float64 products: StreamingCKA's statistics of the float64 batch (a copy, so `held` is not needed)
        return super()._batch_stats([t.double() for t in layers], layout)

    _budget_advice = "raise max_state_bytes or compare fewer layers per accumulator"

    # -- compute ------------------------------------------------------------------------------------

    @staticmethod
    def _options(metric: str, options: dict) -> dict:
        allowed = _OPTIONS[metric]
        for key in options:
            if key not in allowed:
                known = ", ".join(allowed) or "none"
                raise TypeError(f"{key}: not an option of compute(metric={metric!r}) (its options: {known})")
        merged = {**allowed, **options}
        if metric == "shape_distance":
            merged["alpha"] = check_shape_options(merged["alpha"], merged["score"])
        elif metric == "svcca":
            check_svcca_options(merged["dims"], merged["keep"])
        return merged

    def _centered(self) -> dict:
        """The statistics moved onto the overall mean: M/{a},{b} = X̄_aᵀ X̄_b of all rows seen."""
        n = self._samples
        count = len(_positional_layers(self._layout))
        deltas = [-self._stats[f"sum/{a}"] / n for a in range(count)]
        return _shift(self._stats, deltas, n, _streaming_pairs(self._layout), False)

    def compute(self, metric: str = "cka", *, sync: bool = False, group=None, **options):
        """The metric of every (xs, ys) pair of layers from the statistics so far (see the class).

        Args:
            metric: ``"cka"`` (default), ``"shape_distance"``, ``"cca"``, ``"svcca"`` or ``"pwcca"``.
            sync: ``True``: of all ranks' data in the torch.distributed ``group`` (a collective), merged
                into a temporary: this accumulator keeps only its own data, as
                :meth:`repkern.StreamingCKA.compute` with ``sync=True``.
            group: the process group for ``sync=True`` (None: the default group).
            **options: the metric's keyword arguments: shape_distance ``alpha``, ``score``; svcca
                ``dims`` (an int or a pair, at most each layer's width), ``keep``. Others: TypeError.
        """
        _validation.choice("metric", metric, METRICS)
        _validation.boolean("sync", sync)
        options = self._options(metric, options)  # checked before the collective: bad options raise at once
        if sync:
            return self._merge_all_ranks(self._fresh(), group).compute(metric, **options)
        if metric == "cka":
            return super().compute()
        self._flush()
        if self._layout is None:
            raise ValueError("StreamingAlignment.compute: no data yet (call update first)")
        n = self._samples
        if n < 2:
            raise ValueError(f"xs: {metric} needs n >= 2 samples in total (the columns are centered), got n={n}")
        dims_x, dims_y = self._layout
        lx = len(dims_x)
        widths = _positional_layers(self._layout)
        names = [f"xs[{a}]" if a < lx else f"ys[{a - lx}]" for a in range(len(widths))]
        cols = list(range(lx)) if dims_y is None else list(range(lx, len(widths)))
        finite = (self._stats["finite"] > 0).tolist()
        constant = (~(self._stats["varying"] > 0)).tolist()
        dtype = torch.float64 if self._float64 else torch.float32
        have = set(_streaming_pairs(self._layout))
        spectra: dict[int, so.Spectrum] = {}
        with torch.no_grad():
            centered = self._centered()

            def spectrum(a: int) -> so.Spectrum:
                if a not in spectra:
                    spectra[a] = so.spectrum(centered[f"M/{a},{a}"], constant[a])
                return spectra[a]

            def cross(a: int, b: int) -> Tensor:
                return centered[f"M/{a},{b}"] if (a, b) in have else centered[f"M/{b},{a}"].T

            symmetric = dims_y is None and metric != "pwcca"
            out: list[list] = [[None] * len(cols) for _ in range(lx)]
            for i in range(lx):
                for j, b in enumerate(cols):
                    if symmetric and b < i:
                        out[i][j] = out[b][i]
                    elif dims_y is None and b == i and finite[i]:
                        out[i][j] = self._self_value(metric, options, spectrum(i), constant[i], names[i], n)
                    else:
                        out[i][j] = self._pair(metric, options, i, b, n, finite, spectrum, cross, names, widths)
        undefined = metric in _NAN_WHEN_CONSTANT and not (metric == "shape_distance" and options["score"] != "angular")
        if undefined:
            used = {i for i in range(lx)} | set(cols)
            so.warn_degenerate("StreamingAlignment.compute", [names[a] for a in sorted(used) if constant[a]
                                                              and finite[a]],
                               f"{so.CONSTANT}; {_NAN_WHEN_CONSTANT[metric]} in its entries")
        if metric == "cca":
            return [[t.to(dtype) for t in row] for row in out]
        return torch.stack([torch.stack(row) for row in out]).to(dtype)

    @staticmethod
    def _self_value(metric: str, options: dict, s: so.Spectrum, constant: bool, name: str, n: int) -> Tensor:
        """A layer against itself (ys=None), exactly: distance 0, correlations 1 (NaN where undefined)."""
        if metric == "cca":
            return s.values.new_ones(s.rank)
        if metric == "shape_distance":
            so.check_whitenable(s, s.width, options["alpha"], name, n)
            undefined = constant and options["score"] == "angular"
            return s.values.new_full((), torch.nan if undefined else 0.0)
        if metric == "svcca":
            check_svcca_options(options["dims"], options["keep"], (s.width, s.width), (name, name))
        return s.values.new_full((), torch.nan if constant else 1.0)

    @staticmethod
    def _pair(metric, options, a, b, n, finite, spectrum, cross, names, widths) -> Tensor:
        if not (finite[a] and finite[b]):
            shape = (min(widths[a], widths[b]),) if metric == "cca" else ()
            return torch.full(shape, torch.nan, dtype=torch.float64, device=cross(a, b).device)
        sx, sy, c = spectrum(a), spectrum(b), cross(a, b)
        if metric == "shape_distance":
            return shape_from_stats(n, sx, sy, c, options["alpha"], options["score"], (names[a], names[b]))
        if metric == "cca":
            return so.canonical(sx, sy, c)[0]
        if metric == "svcca":
            dims, keep = check_svcca_options(options["dims"], options["keep"], (widths[a], widths[b]),
                                             (names[a], names[b]))
            return svcca_from_stats(sx, sy, c, dims, keep)
        return pwcca_from_stats(sx, sy, c)
