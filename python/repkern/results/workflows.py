"""Results of the analysis workflows (:func:`repkern.compare_models`, :func:`repkern.profile_sparsity`):
saved as a JSON file (settings and readable numbers) next to a tensor file (``torch.save`` of a flat
dict of CPU tensors, read back with ``weights_only=True``), plotted with matplotlib.

    result.save("out/cka")            # -> out/cka.json + out/cka.pt
    again = repkern.load_result("out/cka.json")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from repkern import plots
from repkern.results.sparsity import SparsityStats

FORMAT_VERSION = 1


def _paths(path) -> tuple[str, str]:
    base = os.fspath(path)
    if base.endswith(".json"):
        base = base[: -len(".json")]
    return base + ".json", base + ".pt"


def _json_number(value: float) -> Optional[float]:
    """JSON has no NaN/Inf: they are written as null (the tensor file keeps them)."""
    return value if math.isfinite(value) else None


def _write(path, kind: str, meta: dict, tensors: dict) -> str:
    json_path, tensor_path = _paths(path)
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    torch.save({name: t.detach().cpu() for name, t in tensors.items()}, tensor_path)
    document = {"type": kind, "format_version": FORMAT_VERSION, "tensors": os.path.basename(tensor_path), **meta}
    with open(json_path, "w") as f:
        json.dump(document, f, indent=2, allow_nan=False)
    return json_path


@dataclasses.dataclass
class CkaResult:
    """CKA between the layers of two models (or of one model with itself) over a dataset.

    ``matrix[i, j]`` compares ``layers_a[i]`` with ``layers_b[j]``; ``samples`` rows (sentences or
    tokens, per ``pool``) were seen in ``batches`` batches."""

    matrix: Tensor
    layers_a: list
    layers_b: list
    kernel: str
    debiased: bool
    estimator: str
    pool: str
    samples: int
    batches: int

    def _meta(self) -> dict:
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "matrix"}
        meta["matrix"] = [[_json_number(v) for v in row] for row in self.matrix.double().tolist()]
        return meta

    def save(self, path) -> str:
        """Writes ``<path>.json`` and ``<path>.pt`` (a trailing ``.json`` in path is allowed); returns the JSON path."""
        return _write(path, "cka", self._meta(), {"matrix": self.matrix})

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> "CkaResult":
        fields = {f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name != "matrix"}
        return cls(matrix=tensors["matrix"], **fields)

    def plot(self, path, *, title: Optional[str] = None, xlabel: str = "model B", ylabel: str = "model A") -> str:
        """Heatmap with labelled layer axes and a colour bar; returns ``path``."""
        kind = ("debiased " if self.debiased else "") + f"{self.kernel} CKA ({self.estimator})"
        return plots.cka_heatmap(self.matrix, self.layers_a, self.layers_b, os.fspath(path),
                                 title=title or kind, xlabel=xlabel, ylabel=ylabel)


@dataclasses.dataclass
class SparsityProfile:
    """Per-layer sparsity statistics of one model over a dataset: ``stats[layer]`` is the
    :class:`~repkern.SparsityStats` of all rows (sentences or tokens, per ``pool``) that layer produced."""

    layers: list
    stats: dict
    pool: str
    batches: int

    def summary(self) -> dict:
        """``{metric: [value per layer]}``: mean over rows of ``hoyer``, ``l0_fraction`` (L0/d), ``gini``,
        ``thresholded_l0``, ``top<p>_l1`` (share of Σ|a| in the top p of entries, one per top_p), and the
        per-feature ``dead_fraction`` (features that never fired)."""
        out: dict[str, list] = {}

        def put(metric, value):
            out.setdefault(metric, []).append(float(value))

        for layer in self.layers:
            s = self.stats[layer]
            d = s.count.shape[0]
            put("hoyer", s.row_mean["hoyer"])
            put("l0_fraction", s.row_mean["l0"] / d)
            for name in ("gini", "thresholded_l0"):
                if name in s.row_mean:
                    put(name, s.row_mean[name])
            if "top_p_l1" in s.row_mean:
                for p, value in zip(s.top_p, s.row_mean["top_p_l1"].tolist()):
                    put(f"top{100 * p:g}%_l1", value)
            put("dead_fraction", int(s.n_dead) / d)
        return out

    def save(self, path) -> str:
        """Writes ``<path>.json`` (settings, summary) and ``<path>.pt`` (every statistic); returns the JSON path."""
        tensors, settings = {}, {}
        for i, layer in enumerate(self.layers):
            settings[layer] = {}
            for name, value in self.stats[layer].to_dict().items():
                if isinstance(value, Tensor):
                    tensors[f"{i}/{name}"] = value
                elif value is not None:
                    settings[layer][name] = list(value) if isinstance(value, tuple) else value
        summary = {metric: [_json_number(v) for v in values] for metric, values in self.summary().items()}
        meta = {"layers": list(self.layers), "pool": self.pool, "batches": self.batches, "summary": summary,
                "stats_settings": settings}
        return _write(path, "sparsity", meta, tensors)

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> "SparsityProfile":
        stats = {}
        for i, layer in enumerate(meta["layers"]):
            prefix = f"{i}/"
            flat = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
            flat.update(meta["stats_settings"][layer])
            stats[layer] = SparsityStats.from_dict(flat)
        return cls(layers=meta["layers"], stats=stats, pool=meta["pool"], batches=meta["batches"])

    def plot(self, path, *, label: str = "inputs", metrics: Optional[Sequence[str]] = None) -> str:
        """Per-layer profile of each metric; returns ``path``. Several input sets on one figure:
        :func:`plot_sparsity_profiles`."""
        return plot_sparsity_profiles({label: self}, path, metrics=metrics)


DEFAULT_PROFILE_METRICS = ("hoyer", "l0_fraction", "gini", "thresholded_l0")


def plot_sparsity_profiles(profiles: Mapping[str, SparsityProfile], path, *,
                           metrics: Optional[Sequence[str]] = None, title: str = "Sparsity by layer") -> str:
    """One panel per metric (default: Hoyer, L0 fraction, Gini, thresholded L0 where computed), one line per
    input set (``profiles`` maps a label to a profile of the same layers); returns ``path``."""
    if not profiles:
        raise ValueError("profiles: no input sets")
    first = next(iter(profiles.values()))
    for label, profile in profiles.items():
        if not isinstance(profile, SparsityProfile):
            raise TypeError(f"profiles[{label!r}]: expected a SparsityProfile, got {type(profile).__name__}")
        if list(profile.layers) != list(first.layers):
            raise ValueError(f"profiles[{label!r}]: layers {profile.layers} differ from {first.layers}")
    summaries = {label: profile.summary() for label, profile in profiles.items()}
    available = set.intersection(*(set(s) for s in summaries.values()))
    metrics = list(metrics) if metrics is not None else [m for m in DEFAULT_PROFILE_METRICS if m in available]
    for metric in metrics:
        if metric not in available:
            raise ValueError(f"metrics: {metric!r} is not in every profile's summary (available: {sorted(available)})")
    chosen = {label: {m: s[m] for m in metrics} for label, s in summaries.items()}
    return plots.sparsity_profiles(chosen, list(first.layers), os.fspath(path), metrics=metrics, title=title)


_RESULT_TYPES = {"cka": CkaResult, "sparsity": SparsityProfile}


def load_result(path):
    """Reads a result written by ``.save(path)`` (``path`` with or without ``.json``): a
    :class:`CkaResult` or :class:`SparsityProfile`, tensors on the CPU."""
    json_path, _ = _paths(path)
    with open(json_path) as f:
        meta = json.load(f)
    kind = meta.get("type") if isinstance(meta, dict) else None
    if kind not in _RESULT_TYPES:
        raise ValueError(f"path: {json_path} is not a saved repkern result (type {kind!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"path: {json_path} has format version {meta.get('format_version')}, "
                         f"this repkern reads {FORMAT_VERSION}")
    tensors = torch.load(os.path.join(os.path.dirname(json_path), meta["tensors"]), map_location="cpu",
                         weights_only=True)
    return _RESULT_TYPES[kind]._from_saved(meta, tensors)
