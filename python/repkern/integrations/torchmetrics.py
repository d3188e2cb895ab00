"""``torchmetrics.Metric`` classes on repkern's accumulators, for training loops: :class:`CKA`,
:class:`SparsityStats` and the alignment metrics :class:`ShapeDistance`, :class:`CCA`, :class:`SVCCA`,
:class:`PWCCA`.

They behave like any torchmetrics metric (``update`` / ``compute`` / ``reset`` / ``forward``,
``.to(device)``, Lightning's ``self.log`` and ``log_dict``, DDP sync at ``compute``), with one
difference under the hood: the state is the repkern accumulator (:attr:`~_AccumulatorMetric.accumulator`),
not tensors registered with ``add_state``. Its statistics do not sum or concatenate across ranks (the
streaming CKA statistics are moved between shifts, the sparsity moments merge by Chan/Pébay), so
:meth:`~_AccumulatorMetric.sync` does not gather registered states: ``compute`` on a synced metric is
the accumulator's ``compute(sync=True)``, repkern's exact merge of every rank's statistics into a
temporary, and the local state is never replaced (``unsync`` has nothing to restore; ``dist_sync_fn``
is not used). The states are not in the metric's ``state_dict`` (torchmetrics' default for states):
checkpoint ``metric.accumulator.state_dict()`` where needed.

Needs torchmetrics: ``pip install "repkern[torchmetrics]"``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

try:
    from torchmetrics import Metric
    from torchmetrics.utilities.exceptions import TorchMetricsUserError
except ImportError as err:
    raise ImportError('repkern.integrations.torchmetrics needs torchmetrics: pip install "repkern[torchmetrics]" '
                      "(or pip install torchmetrics)") from err

from repkern.ops.sparsity import SparsityAccumulator
from repkern.ops.streaming import MinibatchCKA, StreamingCKA
from repkern.ops.streaming_alignment import StreamingAlignment

__all__ = ["CKA", "SparsityStats", "ShapeDistance", "CCA", "SVCCA", "PWCCA"]

Layers = Union[Tensor, Sequence[Tensor]]


def _as_layers(layers: Optional[Layers]) -> Optional[list]:
    """One (b, d) tensor is a single layer."""
    if layers is None or isinstance(layers, Tensor):
        return None if layers is None else [layers]
    return list(layers)


def _squeezed(out):
    """A single pair as torchmetrics returns it from compute (one-element tensors squeezed), also from forward."""
    if isinstance(out, Tensor):
        return out.squeeze() if out.numel() == 1 else out
    return out[0][0] if len(out) == 1 and len(out[0]) == 1 else out  # cca: lists of lists of 1-D tensors


class _AccumulatorMetric(Metric):
    """A torchmetrics Metric whose state is one repkern accumulator (see the module docstring)."""

    full_state_update = False  # a batch merges into the running statistics (repkern's merge)
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._sync_group = None
        self._acc = self._new_accumulator()

    # -- subclass hooks ------------------------------------------------------------------------

    def _new_accumulator(self):
        """An empty accumulator with this metric's settings, on ``self.device``."""
        raise NotImplementedError

    def _add(self, acc, *args, **kwargs) -> None:
        """``acc.update`` with update's arguments."""
        raise NotImplementedError

    def _result(self, acc, sync: bool, group):
        """The metric's value from `acc` (all ranks' data with `sync`)."""
        raise NotImplementedError

    # -- torchmetrics ------------------------------------------------------------------------------

    @property
    def accumulator(self):
        """The repkern accumulator holding this rank's data (never the synced state): its
        ``state_dict()`` checkpoints the metric, its ``all_reduce`` merges in place."""
        return self._acc

    def compute(self):
        return self._result(self._acc, self._is_synced, self._sync_group)

    def reset(self) -> None:
        super().reset()
        self._acc.reset()

    def forward(self, *args, **kwargs):
        """Adds the batch to the running statistics (as ``update``) and returns the metric of this batch
        alone, as torchmetrics' ``forward`` does (of every rank's batch with ``dist_sync_on_step=True``)."""
        if self._is_synced:
            raise TorchMetricsUserError("The Metric shouldn't be synced when performing ``forward``. HINT: Did you "
                                        "forget to call ``unsync`` ?.")
        batch = self._new_accumulator()
        self._add(batch, *args, **kwargs)
        sync = self.dist_sync_on_step and self._distributed()
        self._forward_cache = _squeezed(self._result(batch, sync, self.process_group))
        self._acc.merge(batch)  # the same statistics update would add: one pass over the batch, not two
        self._update_count += 1
        self._computed = None
        return self._forward_cache

    def _distributed(self, distributed_available=None) -> bool:
        available = distributed_available or self.distributed_available_fn
        return bool(available()) if callable(available) else False

    def sync(self, dist_sync_fn=None, process_group=None, should_sync: bool = True, distributed_available=None
             ) -> None:
        """Marks the metric synced: until ``unsync``, ``compute`` gives the value of every rank's data
        (the accumulator's ``compute(sync=True, group=process_group or self.process_group)``, a
        collective). The local state is left as it is, so ``unsync`` restores nothing; ``dist_sync_fn`` is
        not used (repkern gathers and merges the statistics itself)."""
        if self._is_synced and should_sync:
            raise TorchMetricsUserError("The Metric has already been synced.")
        if not should_sync or not self._distributed(distributed_available):
            return
        self._cache = {}  # unsync() restores the cached states: there are none to restore
        self._sync_group = process_group or self.process_group
        self._is_synced = True

    def merge_state(self, incoming_state) -> None:
        """Adds the data of another metric of this class and settings (repkern's ``merge``)."""
        if not isinstance(incoming_state, type(self)):
            raise TypeError(f"incoming_state: expected a {type(self).__name__} (its statistics do not merge from a "
                            f"dict of states), got {type(incoming_state).__name__}")
        self._acc.merge(incoming_state._acc)
        self._computed = None

    def _apply(self, fn, exclude_state=""):
        this = super()._apply(fn, exclude_state)
        if this._acc.device is not None and this._acc.device != this.device:
            # .to(device) and friends: the accumulator moves with the metric, data included
            moved = this._new_accumulator()
            moved.load_state_dict(this._acc.state_dict())
            this._acc = moved
        return this


class CKA(_AccumulatorMetric):
    """CKA between layers as a torchmetrics metric: :class:`repkern.StreamingCKA` (exact linear CKA
    over all samples seen) or, with ``minibatch=True``, :class:`repkern.MinibatchCKA` (any kernel).

    ``CKA(kernel="linear", debiased=None, *, minibatch=False, max_state_bytes=None, sigma=None,
    threshold=1.0, median="full", max_gram_bytes=None, **kwargs)``

    ``update(xs, ys=None)``: ``xs`` one ``(b, d)`` activation tensor or a sequence of layers, ``ys``
    likewise for the other model (None: xs against itself), as the accumulator's ``update``.
    ``compute()``: the ``(len(xs), len(ys))`` CKA matrix; a single pair gives a 0-dim tensor, ready for
    ``self.log``. ``debiased=None`` takes the accumulator's default (False streaming, True minibatch).
    ``max_state_bytes`` is StreamingCKA's; ``sigma``, ``threshold``, ``median``, ``max_gram_bytes``
    MinibatchCKA's. ``kwargs``: torchmetrics' (``dist_sync_on_step``, ``process_group``, ``sync_on_compute``, ...).
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, kernel: str = "linear", debiased: Optional[bool] = None, *, minibatch: bool = False,
                 max_state_bytes: Optional[int] = None, sigma: Optional[float] = None, threshold: float = 1.0,
                 median: str = "full", max_gram_bytes: Optional[int] = None, **kwargs) -> None:
        if not isinstance(minibatch, bool):
            raise TypeError(f"minibatch: expected a bool, got {type(minibatch).__name__}")
        if minibatch and max_state_bytes is not None:
            raise ValueError("max_state_bytes: a setting of the streaming estimator (minibatch=False)")
        if not minibatch and (sigma, threshold, median, max_gram_bytes) != (None, 1.0, "full", None):
            raise ValueError("sigma, threshold, median, max_gram_bytes: settings of the minibatch estimator "
                             "(minibatch=True)")
        if not minibatch and kernel != "linear":
            raise ValueError(f"kernel: the streaming estimator is exact for kernel='linear' only (got {kernel!r}); "
                             "pass minibatch=True for other kernels")
        self._settings = {"kernel": kernel, "minibatch": minibatch, "max_state_bytes": max_state_bytes,
                          "sigma": sigma, "threshold": threshold, "median": median, "max_gram_bytes": max_gram_bytes,
                          "debiased": (minibatch if debiased is None else debiased)}
        super().__init__(**kwargs)

    def _new_accumulator(self):
        s = self._settings
        if s["minibatch"]:
            return MinibatchCKA(s["kernel"], s["debiased"], sigma=s["sigma"], threshold=s["threshold"],
                                median=s["median"], max_gram_bytes=s["max_gram_bytes"], device=self.device)
        return StreamingCKA(s["kernel"], s["debiased"], max_state_bytes=s["max_state_bytes"], device=self.device)

    def _add(self, acc, xs: Layers, ys: Optional[Layers] = None) -> None:
        acc.update(_as_layers(xs), _as_layers(ys))

    def update(self, xs: Layers, ys: Optional[Layers] = None) -> None:
        """Adds one batch (see the class)."""
        self._add(self._acc, xs, ys)

    def _result(self, acc, sync: bool, group):
        return _squeezed(acc.compute(sync=sync, group=group))


class _Alignment(_AccumulatorMetric):
    """An alignment metric of :class:`repkern.StreamingAlignment`: ``update(xs, ys=None)`` as :class:`CKA`."""

    _metric = ""

    def __init__(self, *, max_state_bytes: Optional[int] = None, options: dict, **kwargs) -> None:
        StreamingAlignment._options(self._metric, options)  # raises now, not at the first compute
        self._max_state_bytes, self._options = max_state_bytes, options
        super().__init__(**kwargs)

    def _new_accumulator(self):
        return StreamingAlignment(max_state_bytes=self._max_state_bytes, device=self.device)

    def _add(self, acc, xs: Layers, ys: Optional[Layers] = None) -> None:
        acc.update(_as_layers(xs), _as_layers(ys))

    def update(self, xs: Layers, ys: Optional[Layers] = None) -> None:
        """Adds one batch: ``xs`` one ``(b, d)`` tensor or a sequence of layers, ``ys`` likewise (None: xs
        against itself)."""
        self._add(self._acc, xs, ys)

    def _result(self, acc, sync: bool, group):
        return _squeezed(acc.compute(self._metric, sync=sync, group=group, **self._options))


class ShapeDistance(_Alignment):
    """:func:`repkern.shape_distance` of every (xs, ys) pair over all rows seen, exactly (float64
    statistics of :class:`repkern.StreamingAlignment`); a single pair gives a 0-dim tensor.

    ``ShapeDistance(alpha=1.0, score="angular", *, max_state_bytes=None, **kwargs)``
    """

    higher_is_better = False
    _metric = "shape_distance"

    def __init__(self, alpha: float = 1.0, score: str = "angular", *, max_state_bytes: Optional[int] = None,
                 **kwargs) -> None:
        super().__init__(max_state_bytes=max_state_bytes, options={"alpha": alpha, "score": score}, **kwargs)


class CCA(_Alignment):
    """:func:`repkern.cca` of every (xs, ys) pair over all rows seen: a list of lists of 1-D tensors of
    canonical correlations (a single pair: its 1-D tensor).

    ``CCA(*, max_state_bytes=None, **kwargs)``
    """

    higher_is_better = True
    _metric = "cca"

    def __init__(self, *, max_state_bytes: Optional[int] = None, **kwargs) -> None:
        super().__init__(max_state_bytes=max_state_bytes, options={}, **kwargs)


class SVCCA(_Alignment):
    """:func:`repkern.svcca` of every (xs, ys) pair over all rows seen; a single pair gives a 0-dim tensor.

    ``SVCCA(dims=None, keep=0.99, *, max_state_bytes=None, **kwargs)``
    """

    higher_is_better = True
    _metric = "svcca"

    def __init__(self, dims=None, keep: float = 0.99, *, max_state_bytes: Optional[int] = None, **kwargs) -> None:
        super().__init__(max_state_bytes=max_state_bytes, options={"dims": dims, "keep": keep}, **kwargs)


class PWCCA(_Alignment):
    """:func:`repkern.pwcca` of every (xs, ys) pair over all rows seen (weights from the xs layer); a single
    pair gives a 0-dim tensor.

    ``PWCCA(*, max_state_bytes=None, **kwargs)``
    """

    higher_is_better = True
    _metric = "pwcca"

    def __init__(self, *, max_state_bytes: Optional[int] = None, **kwargs) -> None:
        super().__init__(max_state_bytes=max_state_bytes, options={}, **kwargs)


class SparsityStats(_AccumulatorMetric):
    """Activation sparsity statistics as a torchmetrics metric, on :class:`repkern.SparsityAccumulator`.

    ``SparsityStats(d, *, summary=False, eps=0.0, top_p=(0.01, 0.05, 0.1), dense_threshold=0.1,
    density_bins=50, row_bins=20, ordered=True, keep_rows=False, **kwargs)``

    ``update(a)`` adds the rows of a ``(..., d)`` batch. ``compute()``: the
    :class:`repkern.SparsityStats` of all rows seen; with ``summary=True`` instead a flat dict of 0-dim
    tensors for ``self.log_dict``: the mean over rows of each per-row statistic (``"l0"``, ``"hoyer"``,
    ...; ``"top_p_l1@0.01"`` per p), ``"dead_fraction"`` and ``"dense_fraction"`` of the d features.
    """

    def __init__(self, d: int, *, summary: bool = False, eps: float = 0.0, top_p=(0.01, 0.05, 0.1),
                 dense_threshold: float = 0.1, density_bins: int = 50, row_bins: int = 20, ordered: bool = True,
                 keep_rows: bool = False, **kwargs) -> None:
        if not isinstance(summary, bool):
            raise TypeError(f"summary: expected a bool, got {type(summary).__name__}")
        self._summary = summary
        self._settings = {"d": d, "eps": eps, "top_p": top_p, "dense_threshold": dense_threshold,
                          "density_bins": density_bins, "row_bins": row_bins, "ordered": ordered,
                          "keep_rows": keep_rows}
        super().__init__(**kwargs)

    def _new_accumulator(self):
        s = self._settings
        return SparsityAccumulator(s["d"], eps=s["eps"], top_p=s["top_p"], dense_threshold=s["dense_threshold"],
                                   density_bins=s["density_bins"], row_bins=s["row_bins"], ordered=s["ordered"],
                                   keep_rows=s["keep_rows"], device=self.device)

    def _add(self, acc, a: Tensor) -> None:
        acc.update(a)

    def update(self, a: Tensor) -> None:
        """Adds the rows of a ``(..., d)`` batch."""
        self._add(self._acc, a)

    def _result(self, acc, sync: bool, group):
        stats = acc.compute(sync=sync, group=group)
        if not self._summary:
            return stats
        out = {}
        for name, value in stats.row_mean.items():
            if value.dim() == 0:
                out[name] = value
            else:  # top-p masses: one entry per p
                out.update({f"{name}@{p}": v for p, v in zip(stats.top_p, value.unbind())})
        d = self._settings["d"]
        out["dead_fraction"] = stats.n_dead.double() / d
        out["dense_fraction"] = stats.n_dense.double() / d
        return out
