"""Streaming, minibatch and distributed CKA: ``repkern.StreamingCKA`` and ``repkern.MinibatchCKA``.

Both accumulate, batch by batch, mergeable float64 statistics of the activations of the
layers of two models (or of one model with itself) and give the (Lx, Ly) CKA matrix.

StreamingCKA — exact linear CKA over all samples seen (docs/conventions.md, feature space). Per
layer a, with z = x − c_a (c_a a fixed per-layer shift: the first batch's mean), it keeps
s_a = Σ z and, per pair (a, b) of layers, M_ab = Σ z_a z_bᵀ (d_a × d_b); the debiased
form also needs, with u_i = ‖z_a,i‖², v_i = ‖z_b,i‖²: P_ab = Σ u_i v_i, g_ab = Σ u_i z_b,i,
h_ab = Σ v_i z_a,i. Moving the shift by δ (z' = z + δ) is a closed polynomial map of
these statistics (:func:`_shift`): merges move the other side's statistics onto this
side's shift; compute() moves everything onto the overall mean (δ = −s/n), where
    biased   h_ab = ‖M_ab‖²_F
    debiased h_ab = ‖M_ab‖²_F − (n/(n−2)) P_ab + tr(M_aa) tr(M_bb)/((n−1)(n−2))
and CKA_ab = h_ab / sqrt(h_aa h_bb), exactly the one-shot feature-space estimator.
Each batch is centered on its own mean before its products (in the accumulation dtype),
so mean-shifted float32 data loses nothing to cancellation. The statistics of layer a with
all its partners b (the pairs (a, b) above, (a, a) first) are one row block: per batch one
GEMM z_aᵀ [z_b | z_b' | ...] gives M of every pair of the row, and the shift map moves and
adds the whole row at once (a rank-2 update; debiased, one product with the partners' δ).
The per-pair entries of the state (M/{a},{b}, g/{a},{b}, h/{a},{b}: the state_dict format)
are views of the row blocks.

MinibatchCKA — Nguyen, Raghu & Kornblith (2021): per batch, the unbiased HSIC₁ of every
pair (the fused HSIC-terms kernel, or the feature path for the linear kernel, as
``cka_matrix`` plans it), summed over batches in float64; CKA = Σ_b HSIC₁(K_b, L_b) /
sqrt(Σ_b HSIC₁(K_b, K_b) Σ_b HSIC₁(L_b, L_b)).
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from repkern import _common, _validation
from repkern._distributed import all_gather_states, group_device
from repkern.ops import cka as cka_ops

__all__ = ["StreamingCKA", "MinibatchCKA", "DEFAULT_MAX_STATE_BYTES", "DEFAULT_HOLD_ROWS"]

DEFAULT_MAX_STATE_BYTES = 1 << 30  # StreamingCKA's statistics; argument max_state_bytes overrides it
# StreamingCKA's held rows: batches smaller than this are added together (one GEMM per row block over all
# of them, and one float64 pass over the state instead of one per batch); argument hold_rows overrides it
DEFAULT_HOLD_ROWS = 4096

# (widths of the layers of xs, widths of the layers of ys or None for a self-comparison)
Layout = tuple[tuple[int, ...], Optional[tuple[int, ...]]]


def _positional_layers(layout: Layout) -> list[int]:
    xs, ys = layout
    return list(xs) + list(ys or ())


class _LayerAccumulator:
    """update / merge / compute / reset / state_dict / all_reduce shared by both CKA accumulators.

    State: a layout (fixed by the first batch), counts, and a dict of float64 tensors on
    the accumulator's device. The base keeps, per positional layer (xs then ys), its first
    row, whether any later row differed (a constant layer gives NaN with a warning, as in
    ``cka_matrix``) and whether every value was finite; subclasses add their statistics.

    Held rows: a subclass whose statistics of a batch are the same computed over any
    concatenation of batches (StreamingCKA) may hold small batches — copied side by side into
    one buffer in the accumulation dtype — and add them as one batch once they reach its
    capacity (:meth:`_hold_capacity`), or before anything reads the statistics (:meth:`_flush`)."""

    _min_samples_per_batch = 1

    def __init__(self, kernel: str, debiased: bool, device) -> None:
        _validation.choice("kernel", kernel, _validation.GRAM_KERNELS)
        _validation.boolean("debiased", debiased)
        self.kernel, self.debiased = kernel, debiased
        self._device_setting = torch.device(device) if device is not None else None
        self.device = self._device_setting
        self._reset()

    # -- subclass hooks ------------------------------------------------------------------------

    def _config(self) -> dict:
        raise NotImplementedError

    def _signature(self) -> list[float]:
        """The config as numbers, for the all_reduce agreement check."""
        raise NotImplementedError

    def _stat_shapes(self, layout: Layout) -> list[tuple[str, tuple]]:
        raise NotImplementedError

    def _batch_stats(self, layers: list[Tensor], layout: Layout, held: Optional[Tensor] = None) -> dict:
        """The statistics of one batch. held: the (b, Σd) buffer of held rows whose column ranges
        `layers` are (it may be overwritten), or None."""
        raise NotImplementedError

    def _combine(self, theirs: dict, their_samples: int) -> None:
        """Adds another state's statistics (same layout and device) into self._stats."""
        raise NotImplementedError

    def _hold_capacity(self, layout: Layout, dtype: torch.dtype) -> int:
        """Rows of small batches of these layers and accumulation dtype held and added together
        (0: every batch is added on its own). Checks that the state fits, at the first batch."""
        return 0

    def _terms(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(numerators (Lx, Ly), self terms (L,), Σ K∘K-type scale of the self terms (L,) or None)."""
        raise NotImplementedError

    # -- state ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._layout: Optional[Layout] = None
        self._stats: dict[str, Tensor] = {}
        self._samples = 0
        self._batches = 0
        self._float64 = False
        self._held: Optional[Tensor] = None  # (capacity, Σd) buffer of held rows, accumulation dtype
        self._held_layout: Optional[Layout] = None
        self._held_rows = 0
        self._held_batches = 0

    def _fresh(self):
        """An empty accumulator with these settings (the copy's state is rebound, never shared)."""
        other = copy.copy(self)
        other._reset()
        return other

    def _shapes(self, layout: Layout) -> list[tuple[str, tuple]]:
        dims = _positional_layers(layout)
        base = [(f"first_row/{a}", (d,)) for a, d in enumerate(dims)]
        base += [("varying", (len(dims),)), ("finite", (len(dims),))]
        return base + self._stat_shapes(layout)

    def _check_layout(self, layout: Layout, name: Optional[str] = None) -> None:
        """Same layers as before; errors name `name`, or the argument (xs / ys) for update."""
        mine = self._layout if self._layout is not None else self._held_layout
        if mine is None:
            return
        (mine_x, mine_y), (xs, ys) = mine, layout
        if len(xs) != len(mine_x):
            raise ValueError(f"{name or 'xs'}: {len(xs)} layers of xs, but this accumulator has {len(mine_x)}")
        if (ys is None) != (mine_y is None):
            raise ValueError(f"{name or 'ys'}: ys={'None' if ys is None else 'layers'}, but this accumulator was set "
                             f"up with ys={'None' if mine_y is None else 'layers'} (a self-comparison uses ys=None "
                             "throughout)")
        if ys is not None and len(ys) != len(mine_y):
            raise ValueError(f"{name or 'ys'}: {len(ys)} layers of ys, but this accumulator has {len(mine_y)}")
        for which, got, want in (("xs", xs, mine_x), ("ys", ys or (), mine_y or ())):
            for i, (g, w) in enumerate(zip(got, want)):
                if g != w:
                    raise ValueError(f"{name or f'{which}[{i}]'}: {which}[{i}] has width {g}, but this accumulator "
                                     f"has {w}")

    def _to(self, device: torch.device) -> None:
        self._flush()
        self.device = device
        self._stats = {k: v.to(device) for k, v in self._stats.items()}

    def _add(self, stats: dict, layout: Layout, samples: int, batches: int, float64: bool,
             owned: bool = False) -> None:
        """Adds statistics of `samples` rows; owned: fresh tensors (a batch's) this state may keep as they are,
        else (another accumulator's) copied before they become this state."""
        if self._layout is None:
            self._layout = layout
            self._stats = {k: v if owned else v.to(self.device).clone() for k, v in stats.items()}
        else:
            mine = self._stats
            dims = _positional_layers(layout)
            same_first = torch.stack([(mine[f"first_row/{a}"] == stats[f"first_row/{a}"]).all()
                                      for a in range(len(dims))])
            varying = (mine["varying"] > 0) | (stats["varying"] > 0) | ~same_first
            mine["varying"] = varying.double()
            mine["finite"] = torch.minimum(mine["finite"], stats["finite"])
            self._combine(stats, samples)
        self._samples += samples
        self._batches += batches
        self._float64 = self._float64 or float64

    # -- public -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets all data: back to the state right after construction, settings (and the
        ``device`` given there, or None to follow the next batch) kept."""
        self.device = self._device_setting
        self._reset()

    @_common.outside_inference_mode
    def update(self, xs: Sequence[Tensor], ys: Optional[Sequence[Tensor]] = None):
        """Adds one batch: ``xs`` a sequence of ``(b, d_i)`` activations of the layers of
        model A, ``ys`` of ``(b, e_j)`` for model B, or ``None`` to compare xs with itself.
        Every layer of one call has the same b samples, dtype and device; the number and
        widths of the layers, and ys=None or not, stay as in the first call. Returns self."""
        xs = _validation.check_layers("xs", xs)
        if ys is not None:
            ys = _validation.check_layers("ys", ys, ("xs[0]", xs[0]))
        layout: Layout = (tuple(t.shape[1] for t in xs), None if ys is None else tuple(t.shape[1] for t in ys))
        self._check_layout(layout)
        device = xs[0].device
        if self.device is not None and device != self.device:
            raise ValueError(f"xs[0]: on device {device}, but this accumulator's state is on {self.device}")
        b = xs[0].shape[0]
        if b < self._min_samples_per_batch:
            raise ValueError(f"xs[0]: {type(self).__name__}(debiased={self.debiased}) needs batches of at least "
                             f"{self._min_samples_per_batch} samples, got b={b}")
        layers = [t.detach() for t in list(xs) + list(ys or ())]
        acc = _common.acc_dtype(xs[0].dtype)
        held = self._held
        if self._held_rows and (self._held_rows + b > held.shape[0] or held.dtype != acc):
            self._flush()
        capacity = self._hold_capacity(layout, acc)
        if b >= capacity:
            self._add_batch(layers, layout, 1)
        else:
            self._hold(layers, layout, acc, capacity)
        if self.device is None:
            self.device = device
        return self

    def _hold(self, layers: list[Tensor], layout: Layout, acc: torch.dtype, capacity: int) -> None:
        """Copies the batch into the held rows (added once they fill the buffer)."""
        width = sum(t.shape[1] for t in layers)
        if self._held is None or self._held.shape != (capacity, width) or self._held.dtype != acc:
            self._held = torch.empty(capacity, width, dtype=acc, device=layers[0].device)
        rows = slice(self._held_rows, self._held_rows + layers[0].shape[0])
        start = 0
        with torch.no_grad():
            for t in layers:
                self._held[rows, start : start + t.shape[1]].copy_(t)
                start += t.shape[1]
        self._held_layout = layout
        self._held_rows = rows.stop
        self._held_batches += 1
        if self._held_rows == capacity:
            self._flush()

    def _flush(self) -> None:
        """Adds the held rows (as one batch), if any."""
        if not self._held_rows:
            return
        layout, rows, batches = self._held_layout, self._held_rows, self._held_batches
        self._held_rows, self._held_batches = 0, 0  # the buffer's rows are consumed by the add below
        starts = [0] + list(itertools.accumulate(_positional_layers(layout)))
        held = self._held[:rows]
        self._add_batch([held[:, lo:hi] for lo, hi in zip(starts, starts[1:])], layout, batches, held)
        self._held_layout = None

    def _add_batch(self, layers: list[Tensor], layout: Layout, batches: int, held: Optional[Tensor] = None) -> None:
        """Adds the statistics of one batch (layers: (b, d) each, detached; held as in _batch_stats) counted
        as `batches` update calls."""
        with torch.no_grad():
            # copies (a float64 row would be a view of rows _batch_stats may center in place)
            stats = {f"first_row/{a}": t[0].to(torch.float64, copy=True) for a, t in enumerate(layers)}
            # one read per layer for both flags: column min and max (NaN and ±Inf show up in them)
            bounds = [(t.amin(0), t.amax(0)) for t in layers]  # faster than torch.aminmax on the CPU
            stats["varying"] = torch.stack([(lo != hi).any() for lo, hi in bounds]).double()
            stats["finite"] = torch.stack([torch.isfinite(lo).all() & torch.isfinite(hi).all()
                                           for lo, hi in bounds]).double()
            stats.update(self._batch_stats(layers, layout, held))
        if self.device is None:
            self.device = layers[0].device
        self._add(stats, layout, layers[0].shape[0], batches, layers[0].dtype == torch.float64, owned=True)

    @_common.outside_inference_mode
    def merge(self, other):
        """Adds the data of another accumulator of the same class, settings and layers
        (in place; returns self). Merging in any order gives the same result up to rounding."""
        if type(other) is not type(self):
            raise TypeError(f"other: expected a {type(self).__name__}, got {type(other).__name__}")
        self._check_config(other._config(), "other")
        self._flush()
        other._flush()
        if other._layout is None:
            return self
        self._check_layout(other._layout, "other")
        if self.device is None:
            self.device = other.device
        stats = {k: v.to(self.device) for k, v in other._stats.items()}
        self._add(stats, other._layout, other._samples, other._batches, other._float64)
        return self

    def _check_config(self, config: dict, name: str) -> None:
        for key, value in self._config().items():
            if not _validation.same_setting(config.get(key), value):
                raise ValueError(f"{name}: incompatible accumulator ({key}={config.get(key)!r}, expected {value!r})")

    @property
    def samples(self) -> int:
        """Samples (rows per layer) seen so far."""
        return self._samples + self._held_rows

    @property
    def batches(self) -> int:
        """update calls (merged accumulators' included) seen so far."""
        return self._batches + self._held_batches

    def compute(self, sync: bool = False, group=None) -> Tensor:
        """The ``(len(xs), len(ys))`` CKA matrix (ys=None: ``(len(xs), len(xs))``, exactly
        symmetric with unit diagonal) in float32, or float64 once a float64 batch was added.
        A constant layer (every row equal over all batches) or one whose self term is
        <= 0 gives NaN in its row and column with a RuntimeWarning naming it; a layer
        that held NaN/Inf gives NaN there without a warning.

        ``sync=True``: the matrix of all ranks' data in the torch.distributed ``group`` (a
        collective: every rank must call it), merged into a temporary as :meth:`all_reduce`
        merges, so this accumulator keeps only its own data and can be computed again
        (every evaluation) without counting any rank twice."""
        _validation.boolean("sync", sync)
        if sync:
            return self._merge_all_ranks(self._fresh(), group).compute()
        self._flush()
        if self._layout is None:
            raise ValueError(f"{type(self).__name__}.compute: no data yet (call update first)")
        self._check_enough_samples()
        (dims_x, dims_y) = self._layout
        lx = len(dims_x)
        cross, self_h, self_scale = self._terms()
        finite = self._stats["finite"] > 0
        constant = ~(self._stats["varying"] > 0)
        dtype = torch.float64 if self._float64 else torch.float32
        bad = cka_ops.degenerate(self_h, self_scale, dtype, constant, finite)
        ok = finite & ~bad
        cols = torch.arange(lx) if dims_y is None else torch.arange(lx, lx + len(dims_y))
        rows = torch.arange(lx)
        rows, cols = rows.to(cross.device), cols.to(cross.device)
        out = cka_ops.ratio(cross, self_h[rows][:, None], self_h[cols][None, :], ok[rows][:, None] & ok[cols][None, :])
        if dims_y is None:
            out = torch.where(torch.eye(lx, dtype=torch.bool, device=out.device) & ok[:, None],
                              torch.ones_like(out), out)
        if bool(bad.any()):
            names = [f"xs[{a}]" if a < lx else f"ys[{a - lx}]" for a in bad.nonzero().flatten().tolist()]
            cka_ops.warn_degenerate(f"{type(self).__name__}.compute", names)
        return out.to(dtype)

    def _check_enough_samples(self) -> None:
        pass

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue: format version, settings, layout, counts and the float64 statistics."""
        self._flush()
        layout = None
        if self._layout is not None:
            layout = {"xs": list(self._layout[0]), "ys": None if self._layout[1] is None else list(self._layout[1])}
        return {"format_version": _validation.STATE_FORMAT_VERSION, "config": self._config(), "layout": layout,
                "samples": self._samples, "batches": self._batches, "float64": self._float64,
                "stats": {k: v.clone() for k, v in self._stats.items()}}

    def _check_loaded_layout(self, layout: Layout) -> None:
        """Subclass hook: a restored layout this accumulator cannot hold raises here (before anything changes)."""

    @_common.outside_inference_mode
    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a :meth:`state_dict` of an accumulator with the same settings (exactly:
        the statistics are copied bit for bit), onto this accumulator's device if it has one.
        All or nothing: every entry is checked first (format version, settings, layout, counts, the
        shape and dtype of every statistic), and a rejected state dict (ValueError / TypeError naming
        the entry) leaves the accumulator as it was."""
        _validation.check_state_dict(state_dict, type(self).__name__,
                                     ("layout", "samples", "batches", "float64", "stats"))
        self._check_config(state_dict["config"], "state_dict")
        samples = _validation.state_count(state_dict, "samples")
        batches = _validation.state_count(state_dict, "batches")
        float64 = _validation.state_bool(state_dict, "float64")
        raw, stats = state_dict["layout"], state_dict["stats"]
        if not isinstance(stats, dict):
            raise TypeError(f"state_dict: stats must be a dict of tensors, got {type(stats).__name__}")
        if raw is None:
            if samples or batches or stats:
                raise ValueError("state_dict: no layout (an empty accumulator) but samples, batches or stats given")
            self._reset()
            return
        if not isinstance(raw, dict) or not {"xs", "ys"} <= raw.keys():
            raise ValueError(f"state_dict: layout must be None or a dict with xs and ys, got {raw!r}")
        layout: Layout = (_validation.state_widths(raw["xs"], "layout/xs", allow_none=False),
                          _validation.state_widths(raw["ys"], "layout/ys", allow_none=True))
        shapes = self._shapes(layout)
        for key, shape in shapes:
            _validation.state_tensor(stats.get(key), f"stats/{key}", shape, torch.float64)
        extra = sorted(set(map(str, stats)) - {key for key, _ in shapes})
        if extra:
            raise ValueError(f"state_dict: stats has entries {extra} that the layout {raw} does not have")
        if samples == 0 or batches == 0:
            raise ValueError(f"state_dict: a layout but samples={samples}, batches={batches}")
        self._check_loaded_layout(layout)
        device = torch.device(self.device or stats[shapes[0][0]].device)
        restored = {key: stats[key].to(device).clone() for key, _ in shapes}  # may fail: nothing changed yet
        self._reset()  # held rows included: the restored state replaces everything
        self.device, self._layout, self._stats = device, layout, restored
        self._samples, self._batches, self._float64 = samples, batches, float64

    # -- distributed -------------------------------------------------------------------------------

    def _packed(self, device: torch.device) -> Tensor:
        """[samples, batches, float64, has layout, (ys is None, Lx, Ly, widths...), statistics...]."""
        self._flush()
        head = [float(self._samples), float(self._batches), float(self._float64), float(self._layout is not None)]
        parts = []
        if self._layout is not None:
            xs, ys = self._layout
            head += [float(ys is None), float(len(xs)), float(len(ys or ())), *map(float, xs), *map(float, ys or ())]
            parts = [self._stats[key].flatten() for key, _ in self._shapes(self._layout)]
        return torch.cat([torch.tensor(head, dtype=torch.float64, device=device)] + [p.to(device) for p in parts])

    def _unpacked(self, packed: Tensor):
        """A fresh accumulator with these settings holding the state `packed` describes."""
        other = self._fresh()
        values = packed.tolist()[:7]
        if not values[3]:
            return other
        symmetric, lx, ly = bool(values[4]), int(values[5]), int(values[6])
        widths = [int(w) for w in packed[7 : 7 + lx + ly].tolist()]
        layout: Layout = (tuple(widths[:lx]), None if symmetric else tuple(widths[lx:]))
        pos, stats = 7 + lx + ly, {}
        for key, shape in other._shapes(layout):
            size = math.prod(shape)
            stats[key] = packed[pos : pos + size].reshape(shape)
            pos += size
        other._layout, other._stats = layout, stats
        other._samples, other._batches, other._float64 = int(values[0]), int(values[1]), bool(values[2])
        return other

    @_common.outside_inference_mode
    def _merge_all_ranks(self, into, group):
        """Every rank's state (this one's included) merged in rank order into `into`, which is
        emptied first (after this state was packed, so `into` may be self). An accumulator with no
        device yet gathers on the group's (``group_device``: CUDA for NCCL). Returns `into`."""
        device = self.device or group_device(group)
        states = all_gather_states(self._packed(device), torch.tensor(self._signature(), dtype=torch.float64), group)
        others = [self._unpacked(state) for state in states]
        into._reset()
        into.device = device
        for other in others:
            other.device = device
            into.merge(other)
        return into

    def all_reduce(self, group=None):
        """Merges the accumulators of every process of a torch.distributed ``group`` (gloo
        on CPU, NCCL on CUDA; every rank must call it) in place. Afterwards each rank holds the
        statistics of all ranks' data, merged in rank order, so all ranks agree bit for bit
        (all-reducing again would count every rank's data again: to evaluate while training,
        use ``compute(sync=True)``, which leaves the local state alone). Ranks with different
        settings raise ValueError on every rank. An accumulator with no data and no ``device``
        gathers on the group's device (CUDA for NCCL, else the CPU). Returns self."""
        return self._merge_all_ranks(self, group)


# ---- StreamingCKA ---------------------------------------------------------------------------------


def _streaming_pairs(layout: Layout) -> list[tuple[int, int]]:
    """Pairs of positional layers with statistics: self pairs always; ys=None: i < j among xs,
    else every (xs, ys) pair."""
    xs, ys = layout
    lx = len(xs)
    if ys is None:
        return [(a, b) for a in range(lx) for b in range(a, lx)]
    return [(a, a) for a in range(lx + len(ys))] + [(a, lx + b) for a in range(lx) for b in range(len(ys))]


def _rows(pairs: list[tuple[int, int]], count: int) -> list[list[int]]:
    """Per positional layer a, the indices into `pairs` of its pairs (a, b), in order, (a, a) first:
    a's statistics with all its partners form one row block, the partners' columns side by side."""
    rows: list[list[int]] = [[] for _ in range(count)]
    for p, (a, _) in enumerate(pairs):
        rows[a].append(p)
    return rows


def _joined(parts: list[Tensor], dim: int) -> Tensor:
    """`parts` concatenated along `dim` (dim=-1: 1-D parts stacked as rows). A view, no copy, where the
    parts already are consecutive slices of one tensor (the per-pair views of :func:`_row_views`),
    else a new tensor."""
    first = parts[0]
    if dim == -1:
        step = parts[1].storage_offset() - first.storage_offset() if len(parts) > 1 else first.shape[0]
        shape, strides, sizes = (len(parts), first.shape[0]), (step, first.stride(0)), [1] * len(parts)
        consecutive = step >= first.shape[0] * first.stride(0)  # rows that do not overlap
    else:
        sizes = [p.shape[dim] for p in parts]
        shape = tuple(sum(sizes) if i == dim else s for i, s in enumerate(first.shape))
        strides, step, consecutive = first.stride(), first.stride(dim), True
    storage, start = first.untyped_storage().data_ptr(), 0
    for p, size in zip(parts, sizes):
        consecutive = (consecutive and p.untyped_storage().data_ptr() == storage and p.stride() == first.stride()
                       and p.storage_offset() == first.storage_offset() + start * step)
        start += size
    if consecutive:
        return first.as_strided(shape, strides, first.storage_offset())
    return torch.stack(parts) if dim == -1 else torch.cat(parts, dim)


def _row_blocks(stats: dict, pairs: list[tuple[int, int]], rows: list[list[int]], debiased: bool) -> list[dict]:
    """Per layer a, its statistics with all its partners b (in `rows` order) as blocks: M (d_a, Σd_b),
    debiased also g (Σd_b,) and h (partners, d_a); views where the per-pair entries are slices of them."""
    blocks = []
    for a, row in enumerate(rows):
        keys = [f"{a},{pairs[p][1]}" for p in row]
        block = {"M": _joined([stats[f"M/{k}"] for k in keys], 1)}
        if debiased:
            block["g"] = _joined([stats[f"g/{k}"] for k in keys], 0)
            block["h"] = _joined([stats[f"h/{k}"] for k in keys], -1)
        blocks.append(block)
    return blocks


def _row_views(stats: dict, blocks: list[dict], pairs: list[tuple[int, int]], rows: list[list[int]]) -> dict:
    """`stats` with every per-pair entry replaced by its slice of the row blocks (no copies)."""
    out = dict(stats)
    for a, (row, block) in enumerate(zip(rows, blocks)):
        start = 0
        for j, p in enumerate(row):
            b = pairs[p][1]
            width = stats[f"sum/{b}"].shape[0]
            out[f"M/{a},{b}"] = block["M"][:, start : start + width]
            if "g" in block:
                out[f"g/{a},{b}"] = block["g"][start : start + width]
                out[f"h/{a},{b}"] = block["h"][j]
            start += width
    return out


def _shift_rows(stats: dict, blocks: list[dict], deltas: list[Tensor], n: int, pairs: list[tuple[int, int]],
                rows: list[list[int]], debiased: bool, into: Optional[list[dict]] = None):
    """(row blocks, P) of z' = z + δ_a per layer a from the row blocks and the sums and P of z (module
    docstring), all float64, each term one product per row block for all of its partners at once.
    `into`: the moved blocks are added into those (in place) and returned."""
    count = len(deltas)
    sums = [stats[f"sum/{a}"] for a in range(count)]
    kappa = torch.stack([d @ d for d in deltas])
    traces = torch.stack([torch.diagonal(blocks[a]["M"][:, : len(deltas[a])]).sum() for a in range(count)])
    sum_dot = torch.stack([s @ d for s, d in zip(sums, deltas)])  # s_a·δ_a
    p_new = stats["P"].clone() if debiased else None
    out = []
    for a, row in enumerate(rows):
        partners = [pairs[p][1] for p in row]
        m, da, ka = blocks[a]["M"], deltas[a], kappa[a]
        db = torch.cat([deltas[b] for b in partners])  # the partners' δ side by side, as M's columns
        sb = torch.cat([sums[b] for b in partners])
        # M + s_a δ_bᵀ + δ_a (s_b + n δ_b)ᵀ for every partner: one rank-2 product over the row
        left, right = torch.stack([sums[a], da], 1), torch.stack([db, sb + n * db])
        if into is None:
            moved = {"M": torch.addmm(m, left, right)}
        else:
            moved = into[a]
            moved["M"].add_(m).addmm_(left, right)
        if debiased:
            idx = torch.tensor(partners, device=m.device)
            kb, trb, sdb = kappa[idx], traces[idx], sum_dot[idx]
            g, h = blocks[a]["g"], blocks[a]["h"]
            # (Σd_b, partners), block diagonal: column j holds partner j's δ_b in its rows of M
            spread = m.new_zeros(m.shape[1], len(partners))
            start = 0
            for j, b in enumerate(partners):
                spread[start : start + len(deltas[b]), j] = deltas[b]
                start += len(deltas[b])
            m_db = m @ spread  # column j: M_ab δ_b
            p_row = torch.tensor(row, device=m.device)
            p_new[p_row] = (stats["P"][p_row] + 2 * (g @ spread) + 2 * (h @ da) + 4 * (da @ m_db) + kb * traces[a]
                            + ka * trb + 2 * kb * sum_dot[a] + 2 * ka * sdb + n * ka * kb)
            g_new = g + (traces[a] + 2 * sum_dot[a] + n * ka) * db + 2 * (m.T @ da) + ka * sb
            h_new = h + torch.outer(trb + 2 * sdb + n * kb, da) + 2 * m_db.T + torch.outer(kb, sums[a])
            if into is None:
                moved["g"], moved["h"] = g_new, h_new
            else:
                moved["g"].add_(g_new)
                moved["h"].add_(h_new)
        out.append(moved)
    return out, p_new


def _shift(stats: dict, deltas: list[Tensor], n: int, pairs: list[tuple[int, int]], debiased: bool) -> dict:
    """The statistics of z' = z + δ_a per layer a from those of z (module docstring), all float64."""
    rows = _rows(pairs, len(deltas))
    moved, p_new = _shift_rows(stats, _row_blocks(stats, pairs, rows, debiased), deltas, n, pairs, rows, debiased)
    out = _row_views(stats, moved, pairs, rows)
    if debiased:
        out["P"] = p_new
    for a, d in enumerate(deltas):
        out[f"sum/{a}"] = stats[f"sum/{a}"] + n * d
        out[f"shift/{a}"] = stats[f"shift/{a}"] - d
    return out


def _state_bytes(layout: Layout, debiased: bool) -> int:
    dims = _positional_layers(layout)
    per_pair = sum(dims[a] * dims[b] + (dims[a] + dims[b] + 1 if debiased else 0) for a, b in _streaming_pairs(layout))
    return 8 * (per_pair + 3 * sum(dims))


class StreamingCKA(_LayerAccumulator):
    """Exact linear CKA over batches of activations, from mergeable float64 statistics.

    ``StreamingCKA(kernel="linear", debiased=False, *, max_state_bytes=None, hold_rows=None, device=None)``

    ``update(xs, ys)`` adds a batch (see :meth:`update`); ``compute()`` equals
    ``repkern.cka_matrix(cat(xs), cat(ys), "linear", debiased=...)`` over all samples seen
    up to float rounding, whatever the batch sizes (a batch may have a single sample; the
    estimator needs n >= 2 samples in total, n >= 4 debiased). ``merge``, ``reset``, ``state_dict`` /
    ``load_state_dict``, ``all_reduce`` and ``compute(sync=True)`` (all ranks' data, the local state
    left alone: for evaluations while training) as described on each method.

    Memory: per pair of layers (a, b) with statistics — every (xs, ys) pair and every
    layer with itself; ys=None: i <= j among xs — d_a·d_b float64 values (plus d_a + d_b + 1
    for debiased), plus 3·d per layer. ``max_state_bytes`` (default 1 GiB) caps it: the first
    update whose layers would need more raises ValueError; :class:`MinibatchCKA` needs
    O(batch²) memory per layer instead. Only the linear kernel has finite sufficient
    statistics; other kernels raise ValueError (use MinibatchCKA).

    Held rows: batches of fewer than ``hold_rows`` rows (default 4096; 0 or 1: none held) are
    copied into one buffer and added together once they fill it (or when the state is read:
    compute, merge, state_dict, all_reduce) — their products as one GEMM per layer, as if
    they were one batch, which is faster than many small ones, and the float64 state updated
    once. The buffer holds at most ``hold_rows`` rows of every layer in the accumulation dtype,
    and no more than fit in ``max_state_bytes`` beside the statistics.
    """

    def __init__(self, kernel: str = "linear", debiased: bool = False, *, max_state_bytes: Optional[int] = None,
                 hold_rows: Optional[int] = None, device=None):
        if kernel != "linear":
            _validation.choice("kernel", kernel, _validation.GRAM_KERNELS)
            raise ValueError(f"kernel: StreamingCKA is exact for kernel='linear' only (got {kernel!r}); "
                             "use repkern.MinibatchCKA for other kernels")
        self.max_state_bytes = (DEFAULT_MAX_STATE_BYTES if max_state_bytes is None
                                else _validation.byte_budget("max_state_bytes", max_state_bytes))
        self.hold_rows = DEFAULT_HOLD_ROWS if hold_rows is None else _validation.integer("hold_rows", hold_rows, 0)
        super().__init__(kernel, debiased, device)

    def _config(self) -> dict:
        return {"class": "StreamingCKA", "kernel": self.kernel, "debiased": self.debiased}

    def _signature(self) -> list[float]:
        return [1.0, float(self.debiased)]

    def _stat_shapes(self, layout: Layout) -> list[tuple[str, tuple]]:
        dims = _positional_layers(layout)
        pairs = _streaming_pairs(layout)
        shapes = [(f"shift/{a}", (d,)) for a, d in enumerate(dims)] + [(f"sum/{a}", (d,)) for a, d in enumerate(dims)]
        shapes += [(f"M/{a},{b}", (dims[a], dims[b])) for a, b in pairs]
        if self.debiased:
            shapes += [("P", (len(pairs),))]
            shapes += [(f"g/{a},{b}", (dims[b],)) for a, b in pairs] + [(f"h/{a},{b}", (dims[a],)) for a, b in pairs]
        return shapes

    # what to do instead when the statistics do not fit (the end of _check_budget's message)
    _budget_advice = ("use repkern.MinibatchCKA (memory per batch, not per pair of feature dims) or raise "
                      "max_state_bytes")

    def _check_budget(self, layout: Layout, name: str = "xs") -> None:
        need = _state_bytes(layout, self.debiased)
        if need > self.max_state_bytes:
            raise ValueError(
                f"{name}: {type(self).__name__}'s exact statistics for these layers need {need} bytes "
                f"({need / 2**20:.1f} MiB: d_a·d_b float64 per pair of layers) > max_state_bytes="
                f"{self.max_state_bytes}; {self._budget_advice}")

    def _hold_capacity(self, layout: Layout, dtype: torch.dtype) -> int:
        need = _state_bytes(layout, self.debiased)
        if self._layout is None and not self._held_rows:
            self._check_budget(layout)
        row_bytes = sum(_positional_layers(layout)) * dtype.itemsize
        return min(self.hold_rows, (self.max_state_bytes - need) // row_bytes)

    def _batch_stats(self, layers: list[Tensor], layout: Layout, held: Optional[Tensor] = None) -> dict:
        acc = _common.acc_dtype(layers[0].dtype)
        dims = [t.shape[1] for t in layers]
        starts = [0] + list(itertools.accumulate(dims))
        # every layer centered on its batch mean, side by side: the products below do not cancel, and a
        # layer's partners are column ranges of z (held rows: centered in place)
        z = held if held is not None and held.dtype == acc else torch.empty(
            layers[0].shape[0], starts[-1], dtype=acc, device=layers[0].device)
        stats, norms = {}, []
        for a, t in enumerate(layers):
            ta = t.to(acc)
            mean = ta.mean(0)
            za = torch.sub(ta, mean, out=z[:, starts[a] : starts[a + 1]])
            stats[f"shift/{a}"] = mean.double()
            stats[f"sum/{a}"] = za.sum(0).double()  # centered: no cancellation in the accumulation dtype
            if self.debiased:
                norms.append(_common.square_sum64(za, -1))
        pairs = _streaming_pairs(layout)
        rows = _rows(pairs, len(layers))
        if self.debiased:
            u = torch.stack(norms, 1)
            # row a, columns of layer b: g_ab = z_bᵀ u_a; row b, columns of a: h_ab. In float64, by blocks of
            # rows (no float64 copy of all of z)
            ug = sum(u[r : r + 1024].T @ z[r : r + 1024].double() for r in range(0, z.shape[0], 1024))
        blocks = []
        for a, row in enumerate(rows):
            partners = [pairs[p][1] for p in row]
            runs = [(starts[first], starts[last + 1]) for first, last in cka_ops.column_runs(partners)]
            za = z[:, starts[a] : starts[a + 1]]
            # Mᵀ = [z_b | z_b' | ...]ᵀ z_a, one GEMM against every run of partners (10-15% faster than
            # z_aᵀ [z_b ...] with MKL at b = 4096), then M transposed into float64
            mt = z.new_empty(sum(hi - lo for lo, hi in runs), dims[a])
            col = 0
            for lo, hi in runs:
                torch.matmul(z[:, lo:hi].T, za, out=mt[col : col + hi - lo])
                col += hi - lo
            block = {"M": torch.empty(mt.shape[::-1], dtype=torch.float64, device=mt.device).copy_(mt.T)}
            if self.debiased:
                block["g"] = _joined([ug[a, lo:hi] for lo, hi in runs], 0)
                block["h"] = ug[partners, starts[a] : starts[a + 1]]
            blocks.append(block)
        stats = _row_views(stats, blocks, pairs, rows)
        if self.debiased:
            pp = u.T @ u
            stats["P"] = pp[[a for a, _ in pairs], [b for _, b in pairs]]
        return stats

    def _combine(self, theirs: dict, their_samples: int) -> None:
        pairs = _streaming_pairs(self._layout)
        count = len(_positional_layers(self._layout))
        rows = _rows(pairs, count)
        deltas = [theirs[f"shift/{a}"] - self._stats[f"shift/{a}"] for a in range(count)]
        # this state's row blocks: copied together once (after the first batch, a merge or a load), then
        # the per-pair entries are views of them and every later batch updates each row in one pass
        mine = _row_blocks(self._stats, pairs, rows, self.debiased)
        self._stats = _row_views(self._stats, mine, pairs, rows)
        _, p_new = _shift_rows(theirs, _row_blocks(theirs, pairs, rows, self.debiased), deltas, their_samples,
                               pairs, rows, self.debiased, into=mine)
        if self.debiased:
            self._stats["P"].add_(p_new)
        for a, d in enumerate(deltas):
            self._stats[f"sum/{a}"].add_(theirs[f"sum/{a}"] + their_samples * d)

    def _check_loaded_layout(self, layout: Layout) -> None:
        self._check_budget(layout, "state_dict")

    def merge(self, other):
        if isinstance(other, StreamingCKA) and self._layout is None and other._layout is not None:
            self._check_budget(other._layout, "other")
        return super().merge(other)

    def _check_enough_samples(self) -> None:
        _validation.check_sample_count("xs", self._samples, self.debiased)

    def _terms(self):
        xs, ys = self._layout
        lx = len(xs)
        pairs = _streaming_pairs(self._layout)
        count = len(_positional_layers(self._layout))
        n = self._samples
        centered = _shift(self._stats, [-self._stats[f"sum/{a}"] / n for a in range(count)], n, pairs, self.debiased)
        h = {}
        for p, (a, b) in enumerate(pairs):
            m = centered[f"M/{a},{b}"]
            value = m.square().sum()
            if self.debiased:
                trace_a = torch.diagonal(centered[f"M/{a},{a}"]).sum()
                trace_b = torch.diagonal(centered[f"M/{b},{b}"]).sum()
                value = value - n / (n - 2) * centered["P"][p] + trace_a * trace_b / ((n - 1) * (n - 2))
            h[(a, b)] = value
        self_h = torch.stack([h[(a, a)] for a in range(count)])
        cols = range(lx) if ys is None else range(lx, lx + len(ys))
        cross = torch.stack([torch.stack([h[(min(a, b), max(a, b))] for b in cols]) for a in range(lx)])
        return cross, self_h, None


# ---- MinibatchCKA ---------------------------------------------------------------------------------


class MinibatchCKA(_LayerAccumulator):
    """Minibatch CKA of Nguyen, Raghu & Kornblith (2021), any kernel.

    ``MinibatchCKA(kernel="linear", debiased=True, *, sigma=None, threshold=1.0, median="full",
    max_gram_bytes=None, device=None)``

    Per batch of b samples, HSIC₁ of every pair of layers with the unbiased estimator of
    Song et al. (b >= 4; ``debiased=False``: the biased tr(KHLH)/(b−1)², b >= 2, inflated
    at small b), through the same kernels as :func:`repkern.cka_matrix` (each layer's Gram
    once per batch; the linear kernel in feature space when that is cheaper). Then
    CKA = Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)), each batch
    weighted equally whatever its size (the published estimator; use equal batch sizes).
    The RBF median bandwidth (sigma=None) is taken per batch and layer. It estimates the
    CKA of the population, not of the concatenated data: it differs from ``cka_matrix``
    over all samples (it converges to the debiased population value as batches grow).
    ``merge``, ``reset``, ``state_dict`` / ``load_state_dict``, ``all_reduce`` and
    ``compute(sync=True)`` as :class:`StreamingCKA`'s.
    Memory: O(b²) per layer and batch (or d² for the feature path); the state is O(L²).
    """

    def __init__(self, kernel: str = "linear", debiased: bool = True, *, sigma: Optional[float] = None,
                 threshold: float = 1.0, median: str = "full", max_gram_bytes: Optional[int] = None, device=None):
        super().__init__(kernel, debiased, device)
        self.sigma = _validation.positive_number("sigma", sigma, allow_none=True)
        self.threshold = _validation.rbf_threshold(threshold)
        self.median = _validation.choice("median", median, _validation.MEDIANS)
        cka_ops.gram_budget(max_gram_bytes)  # validates it now
        self.max_gram_bytes = max_gram_bytes
        self._min_samples_per_batch = 4 if debiased else 2

    def _config(self) -> dict:
        return {"class": "MinibatchCKA", "kernel": self.kernel, "debiased": self.debiased, "sigma": self.sigma,
                "threshold": self.threshold, "median": self.median}

    def _signature(self) -> list[float]:
        return [2.0, float(_validation.GRAM_KERNELS.index(self.kernel)), float(self.debiased),
                -1.0 if self.sigma is None else self.sigma, self.threshold, float(_validation.MEDIANS.index(self.median))]

    def _stat_shapes(self, layout: Layout) -> list[tuple[str, tuple]]:
        xs, ys = layout
        count = len(_positional_layers(layout))
        return [("hsic", (len(xs), len(xs) if ys is None else len(ys))), ("self", (count,)), ("self_scale", (count,))]

    def _batch_stats(self, layers: list[Tensor], layout: Layout, held: Optional[Tensor] = None) -> dict:
        lx = len(layout[0])
        xs, ys = layers[:lx], None if layout[1] is None else layers[lx:]
        distinct, _, (x_idx, y_idx), pairs = cka_ops.matrix_layout(xs, ys)
        n = xs[0].shape[0]
        dims = [t.shape[1] for t in distinct]
        plan = cka_ops.make_plan(n, dims, [(dims[a], dims[b]) for a, b in pairs], self.kernel, self.sigma, "auto",
                             cka_ops.gram_budget(self.max_gram_bytes), cka_ops.acc_itemsize(xs[0].dtype))
        prepared = [cka_ops.prepare(t[None], self.kernel) for t in distinct]
        feats = [p for p, _ in prepared]
        log2 = torch.cat([l2 for _, l2 in prepared])
        if plan.method == "feature":
            h, self_sq = cka_ops.feature_matrix_numerators(feats, pairs, n, self.debiased), None
        else:
            h, self_sq = cka_ops.gram_numerators(feats, self.kernel, self.sigma, self.median, self.threshold, pairs,
                                                  plan, self.debiased)
        pairs_t = torch.tensor(pairs, dtype=torch.int64, device=h.device)
        # undo the linear paths' power-of-two scaling, then HSIC₁ = h / (n(n−3)) (or / (n−1)²)
        factor = torch.exp2(2 * (log2[pairs_t[:, 0]] + log2[pairs_t[:, 1]])) / cka_ops.normalizer(n, self.debiased)
        hsic = h * factor
        index = {p: i for i, p in enumerate(pairs)}
        col_idx = x_idx if ys is None else y_idx
        lookup = torch.tensor([[index[(min(a, b), max(a, b))] for b in col_idx] for a in x_idx], device=h.device)
        self_idx = torch.tensor([index[(a, a)] for a in list(x_idx) + ([] if ys is None else list(y_idx))],
                                device=h.device)
        scale = torch.zeros_like(hsic) if self_sq is None else self_sq * factor
        return {"hsic": hsic[lookup], "self": hsic[self_idx], "self_scale": scale[self_idx]}

    def _combine(self, theirs: dict, their_samples: int) -> None:
        for key in ("hsic", "self", "self_scale"):
            self._stats[key] = self._stats[key] + theirs[key]

    def _terms(self):
        scale = self._stats["self_scale"]
        return self._stats["hsic"], self._stats["self"], scale if bool((scale > 0).any()) else None
