"""Results of the analysis workflows (:func:`repkern.compare_models`, :func:`repkern.perturbation_sensitivity`,
:func:`repkern.profile_sparsity`):
saved as a JSON file (settings and readable numbers) next to a tensor file (``torch.save`` of a flat
dict of CPU tensors, read back with ``weights_only=True``), plotted with matplotlib (``.plot`` returns a
``matplotlib.figure.Figure``, made without pyplot: see :mod:`repkern.plots`).

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

from repkern import _files, plots
from repkern._validation.similarity import OPTIONS, REQUIRED
from repkern.results.sparsity import SparsityStats

FORMAT_VERSION = 1


def _paths(path) -> tuple[str, str]:
    base = os.fspath(path)
    if base.endswith(".json"):
        base = base[: -len(".json")]
    return base + ".json", base + ".pt"


class _Saved:
    """Reads the fields of a saved result, each checked: a missing or malformed field is a ValueError
    naming the file and the field, never a KeyError or a silently wrong result."""

    def __init__(self, json_path: str, meta: dict, tensors: dict):
        self.json_path, self.meta, self.tensors = json_path, meta, tensors

    def error(self, message: str) -> ValueError:
        return ValueError(f"path: {self.json_path}: {message}")

    def field(self, key: str, kind, what: str, source: Optional[dict] = None, where: str = ""):
        source = self.meta if source is None else source
        if not isinstance(source, dict) or key not in source:
            raise self.error(f"missing field {where}{key!r}")
        value = source[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(f"field {where}{key!r} must be {what}, got {value!r:.80}")
        return value

    def count(self, key: str) -> int:
        value = self.field(key, int, "an int >= 0")
        if value < 0:
            raise self.error(f"field {key!r} must be an int >= 0, got {value}")
        return value

    def names(self, key: str) -> list:
        value = self.field(key, list, "a list of layer names")
        if not all(isinstance(v, str) for v in value):
            raise self.error(f"field {key!r} must be a list of layer names (strings), got {value!r:.80}")
        return value

    def metric(self) -> str:
        value = self.field("metric", str, "a string")
        if value not in _RANGES and value not in DISTANCES:
            raise self.error(f"field 'metric' must name an alignment metric, got {value!r:.80}")
        return value

    def tensor(self, key: str, shape: Optional[tuple] = None) -> Tensor:
        value = self.tensors.get(key)
        if not isinstance(value, Tensor):
            raise self.error(f"the tensor file has no tensor {key!r}")
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise self.error(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        return value


def _json_number(value: float) -> Optional[float]:
    """JSON has no NaN/Inf: they are written as null (the tensor file keeps them)."""
    return value if math.isfinite(value) else None


def _write(path, kind: str, meta: dict, tensors: dict) -> str:
    """Both files atomically (repkern._files): the JSON is encoded first, then the two are written to
    temporary files and moved into place; any failure leaves an earlier result at `path` as it was."""
    json_path, tensor_path = _paths(path)
    document = {"type": kind, "format_version": FORMAT_VERSION, "tensors": os.path.basename(tensor_path), **meta}
    text = json.dumps(document, indent=2, allow_nan=False)  # an unencodable value fails here, before any write
    cpu = {name: t.detach().cpu() for name, t in tensors.items()}
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    _files.write_together([(tensor_path, "wb", lambda f: torch.save(cpu, f)),
                           (json_path, "w", lambda f: f.write(text))])
    return json_path


@dataclasses.dataclass
class CkaResult:
    """CKA between the layers of two models (or of one model with itself) over a dataset.

    ``matrix[i, j]`` compares ``layers_a[i]`` with ``layers_b[j]``; ``samples`` rows (sentences or
    tokens, per ``pool``) were seen in ``batches`` batches. What :func:`repkern.compare_models` returns for
    ``metric="cka"`` (the other metrics give an :class:`AlignmentResult`)."""

    matrix: Tensor
    layers_a: list
    layers_b: list
    kernel: str
    debiased: bool
    estimator: str
    pool: str
    samples: int
    batches: int

    @property
    def metric(self) -> str:
        """``"cka"`` (the same attribute as :attr:`AlignmentResult.metric`)."""
        return "cka"

    def _meta(self) -> dict:
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "matrix"}
        meta["matrix"] = [[_json_number(v) for v in row] for row in self.matrix.double().tolist()]
        return meta

    def save(self, path) -> str:
        """Writes ``<path>.json`` and ``<path>.pt`` (a trailing ``.json`` in path is allowed); returns the JSON path."""
        return _write(path, "cka", self._meta(), {"matrix": self.matrix})

    @classmethod
    def _from_saved(cls, saved: _Saved) -> "CkaResult":
        layers_a, layers_b = saved.names("layers_a"), saved.names("layers_b")
        matrix = saved.tensor("matrix", (len(layers_a), len(layers_b)))
        if not matrix.is_floating_point():
            raise saved.error(f"tensor 'matrix' must be floating point, got {matrix.dtype}")
        return cls(matrix=matrix, layers_a=layers_a, layers_b=layers_b, kernel=saved.field("kernel", str, "a string"),
                   debiased=saved.field("debiased", bool, "true or false"),
                   estimator=saved.field("estimator", str, "a string"), pool=saved.field("pool", str, "a string"),
                   samples=saved.count("samples"), batches=saved.count("batches"))

    def plot(self, path=None, *, ax=None, title: Optional[str] = None, xlabel: str = "model B",
             ylabel: str = "model A"):
        """Heatmap with labelled layer axes and a colour bar. Returns the ``matplotlib.figure.Figure``;
        saves it to ``path`` when given (format from the extension); draws into the Axes ``ax`` when
        given (then its figure is returned)."""
        kind = ("debiased " if self.debiased else "") + f"{self.kernel} CKA ({self.estimator})"
        return plots.cka_heatmap(self.matrix, self.layers_a, self.layers_b, path, ax=ax,
                                 title=title or kind, xlabel=xlabel, ylabel=ylabel, colorbar_label="CKA")


# Metrics that are distances (0 = the same representation up to the metric's invariances), and the fixed colour
# range of each bounded metric (an unbounded distance, shape_distance with score="euclidean", scales to its data).
DISTANCES = ("shape_distance",)
_RANGES = {"cka": (0.0, 1.0), "mutual_knn": (0.0, 1.0), "cycle_knn": (0.0, 1.0), "cknna": (-1.0, 1.0),
           "svcca": (0.0, 1.0), "pwcca": (0.0, 1.0), "rsa": (-1.0, 1.0)}


def metric_label(metric: str, options: Mapping) -> str:
    """The metric and the options that differ from its defaults, for a title: ``mutual_knn (k=10)``."""
    defaults = OPTIONS.get(metric, {})
    parts = [f"{key}={value}" for key, value in options.items()
             if key in defaults and (defaults[key] is REQUIRED or value != defaults[key])]
    label = f"{metric} ({', '.join(parts)})" if parts else metric
    return label + (" [distance: lower = more similar]" if metric in DISTANCES else "")


def _colour_scale(metric: str, options: Mapping, matrix: Tensor) -> dict:
    """vmin, vmax and colour map of a heatmap of ``metric``: distances get the reversed map, so that "more
    similar" is bright for every metric."""
    if metric == "shape_distance":
        if options.get("score", "angular") == "angular":
            top = math.pi / 2  # the angular shape distance lies in [0, π/2]
        else:
            finite = matrix[torch.isfinite(matrix)]
            top = float(finite.max()) if finite.numel() and float(finite.max()) > 0 else 1.0
        return {"vmin": 0.0, "vmax": top, "cmap": "magma_r"}
    low, high = _RANGES[metric]
    return {"vmin": low, "vmax": high, "cmap": "magma"}


def _json_options(options: Mapping) -> dict:
    """Metric options as JSON values (a (dims_x, dims_y) pair as a list)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}


@dataclasses.dataclass
class AlignmentResult:
    """An alignment metric other than CKA between the layers of two models (or of one model with itself)
    over a dataset: what :func:`repkern.compare_models` returns for ``metric != "cka"``.

    ``matrix[i, j]`` is ``metric`` of ``layers_a[i]`` and ``layers_b[j]`` (a similarity, except
    ``shape_distance``: a distance, 0 for the same representation); ``options`` are the metric's
    settings (as :func:`repkern.similarity_matrix` takes them, defaults filled in); ``samples`` rows
    (sentences or tokens, per ``pool``) were seen in ``batches`` batches."""

    matrix: Tensor
    layers_a: list
    layers_b: list
    metric: str
    options: dict
    pool: str
    samples: int
    batches: int

    def save(self, path) -> str:
        """Writes ``<path>.json`` and ``<path>.pt`` (a trailing ``.json`` in path is allowed); returns the JSON path."""
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("matrix", "options")}
        meta["options"] = _json_options(self.options)
        meta["matrix"] = [[_json_number(v) for v in row] for row in self.matrix.double().tolist()]
        return _write(path, "alignment", meta, {"matrix": self.matrix})

    @classmethod
    def _from_saved(cls, saved: _Saved) -> "AlignmentResult":
        layers_a, layers_b = saved.names("layers_a"), saved.names("layers_b")
        matrix = saved.tensor("matrix", (len(layers_a), len(layers_b)))
        if not matrix.is_floating_point():
            raise saved.error(f"tensor 'matrix' must be floating point, got {matrix.dtype}")
        return cls(matrix=matrix, layers_a=layers_a, layers_b=layers_b, metric=saved.metric(),
                   options=saved.field("options", dict, "an object"), pool=saved.field("pool", str, "a string"),
                   samples=saved.count("samples"), batches=saved.count("batches"))

    def plot(self, path=None, *, ax=None, title: Optional[str] = None, xlabel: str = "model B",
             ylabel: str = "model A"):
        """Heatmap with labelled layer axes and a colour bar labelled with the metric: [0, 1] for the
        similarities bounded there, [−1, 1] for rsa and cknna, [0, π/2] reversed (bright = close) for
        the angular shape distance. Returns the ``matplotlib.figure.Figure``; saves it to ``path``
        when given; draws into the Axes ``ax`` when given (then its figure is returned)."""
        label = metric_label(self.metric, self.options)
        return plots.cka_heatmap(self.matrix, self.layers_a, self.layers_b, path, ax=ax, title=title or label,
                                 xlabel=xlabel, ylabel=ylabel, colorbar_label=self.metric,
                                 **_colour_scale(self.metric, self.options, self.matrix))


@dataclasses.dataclass
class PerturbationResult:
    """What :func:`repkern.perturbation_sensitivity` returns: ``values[i, j, d]`` is ``metric`` between
    layer ``layers[i]`` of the model and the same layer of the model with weight noise of relative scale
    ``scales[j]``, draw ``d`` (a similarity, except ``shape_distance``: a distance); :attr:`mean`
    averages the draws. ``options``: the metric's settings (defaults filled in); ``seed``: draw d used
    seed ``seed + d``; ``samples`` rows (per ``pool``) in ``batches`` batches."""

    values: Tensor
    layers: list
    scales: list
    metric: str
    options: dict
    pool: str
    seed: int
    samples: int
    batches: int

    @property
    def mean(self) -> Tensor:
        """``(len(layers), len(scales))``: the mean over draws."""
        return self.values.mean(-1)

    @property
    def draws(self) -> int:
        return self.values.shape[-1]

    def save(self, path) -> str:
        """Writes ``<path>.json`` (settings, the mean per layer and scale) and ``<path>.pt`` (every draw);
        returns the JSON path."""
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("values", "options")}
        meta["options"] = _json_options(self.options)
        meta["draws"] = self.draws
        meta["mean"] = [[_json_number(v) for v in row] for row in self.mean.double().tolist()]
        return _write(path, "perturbation", meta, {"values": self.values})

    @classmethod
    def _from_saved(cls, saved: _Saved) -> "PerturbationResult":
        layers = saved.names("layers")
        scales = saved.field("scales", list, "a list of numbers")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scales):
            raise saved.error(f"field 'scales' must be a list of numbers, got {scales!r:.80}")
        values = saved.tensor("values", (len(layers), len(scales), saved.count("draws")))
        if not values.is_floating_point():
            raise saved.error(f"tensor 'values' must be floating point, got {values.dtype}")
        return cls(values=values, layers=layers, scales=[float(s) for s in scales], metric=saved.metric(),
                   options=saved.field("options", dict, "an object"), pool=saved.field("pool", str, "a string"),
                   seed=saved.count("seed"), samples=saved.count("samples"), batches=saved.count("batches"))

    def plot(self, path=None, *, ax=None, title: Optional[str] = None):
        """One line per layer: the mean over draws against the noise scale, the range over draws shaded;
        the y axis names the metric (a distance for shape_distance). Returns the
        ``matplotlib.figure.Figure``; saves it to ``path`` when given; draws into ``ax`` when given."""
        what = "distance" if self.metric in DISTANCES else "similarity"
        title = title or f"Perturbation sensitivity: {metric_label(self.metric, self.options)}"
        return plots.sensitivity_curves(self.values, self.layers, self.scales, path, ax=ax, title=title,
                                        ylabel=f"{self.metric} {what} to the unperturbed model")


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
    def _from_saved(cls, saved: _Saved) -> "SparsityProfile":
        layers = saved.names("layers")
        settings = saved.field("stats_settings", dict, "an object with one entry per layer")
        stats = {}
        for i, layer in enumerate(layers):
            prefix = f"{i}/"
            flat = {name[len(prefix):]: t for name, t in saved.tensors.items() if name.startswith(prefix)}
            d = None
            for name in _FEATURE_TENSORS + _SUMMARY_TENSORS:
                t = saved.tensor(prefix + name)
                if name in _FEATURE_TENSORS:
                    d = t.shape[0] if d is None and t.dim() == 1 else d
                    saved.tensor(prefix + name, (d,))
                elif name in _SCALAR_TENSORS:
                    saved.tensor(prefix + name, ())
            where = f"stats_settings[{layer!r}]."
            own = saved.field(layer, dict, "an object", settings, "stats_settings.")
            flat["rows"] = saved.field("rows", int, "an int", own, where)
            flat["top_p"] = saved.field("top_p", list, "a list of fractions", own, where)
            flat["eps"] = saved.field("eps", (int, float), "a number", own, where)
            flat["dense_threshold"] = saved.field("dense_threshold", (int, float), "a number", own, where)
            if not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in flat["top_p"]):
                raise saved.error(f"field {where}'top_p' must be a list of fractions, got {flat['top_p']!r:.80}")
            stats[layer] = SparsityStats.from_dict(flat)
        return cls(layers=layers, stats=stats, pool=saved.field("pool", str, "a string"),
                   batches=saved.count("batches"))

    def plot(self, path=None, *, ax=None, label: str = "inputs", metrics: Optional[Sequence[str]] = None):
        """Per-layer profile of each metric, one panel each. Returns the ``matplotlib.figure.Figure``;
        saves it to ``path`` when given; draws into ``ax`` when given (one Axes per metric). Several
        input sets on one figure: :func:`plot_sparsity_profiles`."""
        return plot_sparsity_profiles({label: self}, path, ax=ax, metrics=metrics)


# Tensors every saved SparsityStats holds (per feature (d,), summaries, 0-d totals); the per-row fields and the
# row summaries are optional (accumulator results have no per-row tensors).
_FEATURE_TENSORS = ("count", "fire_count", "frequency", "mean", "var", "kurtosis", "min", "max", "mean_abs",
                    "nan_count", "inf_count", "dead", "dense")
_SCALAR_TENSORS = ("n_dead", "n_dense", "nan_total", "inf_total")
_SUMMARY_TENSORS = _SCALAR_TENSORS + ("density_histogram", "density_edges", "row_edges")

DEFAULT_PROFILE_METRICS = ("hoyer", "l0_fraction", "gini", "thresholded_l0")


def plot_sparsity_profiles(profiles: Mapping[str, SparsityProfile], path=None, *, ax=None,
                           metrics: Optional[Sequence[str]] = None, title: str = "Sparsity by layer"):
    """One panel per metric (default: Hoyer, L0 fraction, Gini, thresholded L0 where computed), one line per
    input set (``profiles`` maps a label to a profile of the same layers). Returns the
    ``matplotlib.figure.Figure``; saves it to ``path`` when given; draws into ``ax`` when given (one
    Axes per metric)."""
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
    return plots.sparsity_profiles(chosen, list(first.layers), path, ax=ax, metrics=metrics, title=title)


_RESULT_TYPES = {"cka": CkaResult, "alignment": AlignmentResult, "perturbation": PerturbationResult,
                 "sparsity": SparsityProfile}


def _own_file_name(name) -> bool:
    """A plain file name: no folder part, not absolute, not '.' or '..' (the tensor file of a result is
    read from the result's own folder only, whatever the JSON says)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
            and os.path.basename(name) == name and not os.path.isabs(name) and not os.path.splitdrive(name)[0]
            and "/" not in name and (os.altsep is None or os.altsep not in name))


def load_result(path):
    """Reads a result written by ``.save(path)`` (``path`` with or without ``.json``): a
    :class:`CkaResult`, :class:`AlignmentResult`, :class:`PerturbationResult` or :class:`SparsityProfile`,
    tensors on the CPU.

    Only the JSON file and the tensor file it names in its own folder are read (a name with a folder
    part, absolute or with ``..``, is refused). A file that is not a complete result of this format
    version — invalid JSON, a missing or malformed field, a tensor of the wrong shape, a corrupted
    tensor file — raises ValueError naming the file (OSError when a file cannot be read at all)."""
    json_path, _ = _paths(path)
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as exc:  # invalid JSON or UTF-8
        raise ValueError(f"path: {json_path} is not a saved repkern result ({type(exc).__name__}: {exc})") from exc
    kind = meta.get("type") if isinstance(meta, dict) else None
    if not isinstance(kind, str) or kind not in _RESULT_TYPES:
        raise ValueError(f"path: {json_path} is not a saved repkern result (type {kind!r:.80})")
    if meta.get("format_version") != FORMAT_VERSION or isinstance(meta.get("format_version"), bool):
        raise ValueError(f"path: {json_path} has format version {meta.get('format_version')!r:.80}, "
                         f"this repkern reads {FORMAT_VERSION}")
    name = meta.get("tensors")
    if not _own_file_name(name):
        raise ValueError(f"path: {json_path}: 'tensors' must name a file in the result's own folder, got {name!r:.200}")
    tensor_path = os.path.join(os.path.dirname(json_path), name)
    try:
        tensors = torch.load(tensor_path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # truncated or corrupted: pickle's, zipfile's and torch's own error types
        raise ValueError(f"path: {tensor_path} is not a readable tensor file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"path: {tensor_path} does not hold a dict of named tensors")
    return _RESULT_TYPES[kind]._from_saved(_Saved(json_path, meta, tensors))
