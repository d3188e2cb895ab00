"""Analysis workflows over a dataset: an alignment metric (CKA by default) between the layers of two
models, each layer's sensitivity to weight noise, per-layer sparsity.

CKA, the second-order alignment metrics and the sparsity statistics stream: each batch's activations go
into accumulators and are dropped, so memory does not grow with the dataset. The kNN metrics, rsa and
:func:`perturbation_sensitivity` need every row at once and keep at most ``max_samples`` of them.
Batches are moved to the model's device and run there (a tensor is passed as ``model(batch)``, a
tuple/list as ``model(*batch)``, a mapping as ``model(**batch)``; a mapping's
``attention_mask`` marks padding for pooling, see :func:`repkern.capture`). A mapping's keys that the
model's ``forward`` does not take (``text``, ``labels``, ``idx`` of a Hugging Face dataset) are left out;
a ``forward(**kwargs)`` gets them all, unless the keywords are typed ``**kwargs: Unpack[SomeTypedDict]``
(as in Hugging Face models): then the TypedDict's keys are the ones it takes.

Models run in eval mode (dropout off) without autograd; their previous mode is restored afterwards.
Each forward pass stops after the last requested layer (``capture(..., stop_early=True)``): nothing
after it is computed. Activations are moved to the accumulators' device, so a model spread over
devices (``device_map``) works.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import typing
from collections.abc import Iterable, Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn

from repkern import _validation
from repkern._validation.similarity import (OPTIONS, SIMILARITY_METRICS, check_options,
                                            check_similarity_matrix_args)
from repkern.capture import capture, resolve_layers
from repkern.ops.similarity import similarity_matrix
from repkern.ops.sparsity import SparsityAccumulator
from repkern.ops.streaming_alignment import StreamingAlignment
from repkern.results import AlignmentResult, CkaResult, PerturbationResult, SparsityProfile

ESTIMATORS = ("exact", "minibatch")
STREAMED = ("shape_distance", "svcca", "pwcca")  # compare_models streams them through StreamingAlignment
# Rows kept by default where every row is needed at once: 16384 rows of a 4096-wide float32 layer are 256 MiB;
# rsa's RDM of n rows holds n(n − 1)/2 float64 (4096 rows: 64 MiB per layer).
DEFAULT_MAX_SAMPLES = 16384
DEFAULT_MAX_SAMPLES_RSA = 4096


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _typed_kwargs(annotation) -> Optional[frozenset]:
    """The keys of ``**kwargs: Unpack[SomeTypedDict]`` (PEP 692: exactly those keywords, as in Hugging Face
    models' ``**kwargs: Unpack[TransformersKwargs]``); None for any other ``**kwargs``."""
    args = typing.get_args(annotation)
    if getattr(typing.get_origin(annotation), "_name", None) != "Unpack" or len(args) != 1:
        return None
    required, optional = (getattr(args[0], name, None) for name in ("__required_keys__", "__optional_keys__"))
    return None if required is None or optional is None else frozenset(required | optional)


def _signature(fn) -> inspect.Signature:
    try:
        return inspect.signature(fn, eval_str=True)  # string annotations (from __future__ import annotations)
    except Exception:  # an annotation that does not evaluate: the names and kinds are all that is used
        return inspect.signature(fn)


def forward_keywords(model: nn.Module) -> tuple[Optional[frozenset], frozenset]:
    """(keywords ``model.forward`` takes, or None when it takes any ``**kwargs`` or has no readable
    signature; the keywords it requires)."""
    try:
        params = _signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None, frozenset()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepted = frozenset(p.name for p in named)
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            typed = _typed_kwargs(p.annotation)
            if typed is None:
                return None, frozenset()
            accepted |= typed
    return accepted, frozenset(p.name for p in named if p.default is p.empty)


def _model_inputs(batch, device: torch.device, model: nn.Module) -> tuple[tuple, dict, Optional[torch.Tensor]]:
    """(args, kwargs, attention mask) of one batch on ``device`` (batch forms: module docstring); a
    mapping keeps only the keys ``model.forward`` takes (the mask is returned for pooling either way)."""
    if isinstance(batch, Mapping):
        accepted, required = forward_keywords(model)
        mask = batch.get("attention_mask")
        kwargs = {k: v for k, v in batch.items() if accepted is None or k in accepted}
        missing = sorted(required - kwargs.keys())
        if missing:
            raise TypeError(f"dataloader: a batch with keys {sorted(batch)} lacks {missing}, which "
                            f"{type(model).__name__}.forward requires")
        return (), _to_device(kwargs, device), _to_device(mask, device)
    batch = _to_device(batch, device)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}, None
    return (batch,), {}, None


def run_batch(cap, batch, device: torch.device) -> dict:
    """Pooled activations of one batch, run on ``device`` (``cap``: an entered :func:`repkern.capture`)."""
    args, kwargs, mask = _model_inputs(batch, device, cap.model)
    cap.forward(*args, **kwargs)
    return cap.collect(mask)


@contextlib.contextmanager
def _evaluating(*models: nn.Module):
    modes = [(m, m.training) for m in models]
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.train(training)


def _progress(batches, enabled: bool, desc: str):
    """tqdm bar over ``batches`` when enabled and tqdm is installed; the plain iterable otherwise."""
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return batches
    return tqdm(batches, desc=desc, total=len(batches) if hasattr(batches, "__len__") else None, leave=False)


def _check_common(dataloader, progress) -> None:
    if not isinstance(dataloader, Iterable) or isinstance(dataloader, (torch.Tensor, str)):
        raise TypeError(f"dataloader: expected an iterable of batches, got {type(dataloader).__name__}")
    _validation.boolean("progress", progress)


def _check_model(name: str, model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_layers(name: str, names: list) -> None:
    """At least one layer to compare or profile (an empty list is an error, not an empty result)."""
    if not names:
        raise ValueError(f"{name}: no layers given (expected module names, globs or modules)")


def _cka_accumulator(estimator: str, kernel: str, debiased: bool, options: dict):
    import repkern

    if estimator == "exact":
        if kernel != "linear":
            raise ValueError(f"kernel: the exact streaming estimator is linear only, got {kernel!r}; "
                             "use estimator='minibatch' (or repkern.cka_matrix on stored activations)")
        return repkern.StreamingCKA(kernel=kernel, debiased=debiased, **options)
    return repkern.MinibatchCKA(kernel=kernel, debiased=debiased, **options)


def _max_samples(metric: str, max_samples) -> int:
    if max_samples is None:
        return DEFAULT_MAX_SAMPLES_RSA if metric == "rsa" else DEFAULT_MAX_SAMPLES
    if isinstance(max_samples, bool) or not isinstance(max_samples, int):
        raise TypeError(f"max_samples: expected an int or None, got {type(max_samples).__name__}")
    if max_samples < 1:
        raise ValueError(f"max_samples: expected >= 1, got {max_samples}")
    return max_samples


class _Rows:
    """Every pooled row of some layers, kept on one device for a metric that needs them all at once;
    more than ``limit`` rows is a ValueError naming max_samples (the rows are never truncated)."""

    def __init__(self, count: int, limit: int, metric: str, pool: str):
        self.chunks: list[list[Tensor]] = [[] for _ in range(count)]
        self.rows, self.limit, self.metric, self.pool = 0, limit, metric, pool

    def add(self, layers: list[Tensor]) -> None:
        rows = layers[0].shape[0]
        if self.rows + rows > self.limit:
            raise ValueError(f"max_samples: metric={self.metric!r} keeps every row in memory and the dataloader "
                             f"gave more than max_samples={self.limit} rows (pool={self.pool!r}); raise "
                             "max_samples or pass fewer batches")
        self.rows += rows
        for chunks, t in zip(self.chunks, layers):
            chunks.append(t)

    def layers(self, joined: dict) -> list[Tensor]:
        """Each layer's rows in one tensor; a layer whose chunks are the same tensors as one already in
        `joined` (a layer of model_a in both layer lists) is that tensor, so it is held once."""
        out = []
        for chunks in self.chunks:
            key = tuple(map(id, chunks))  # the chunks are alive (held here), so their ids are theirs
            if key not in joined:
                joined[key] = torch.cat(chunks)
            out.append(joined[key])
        return out


class _Streamed:
    """compare_models' sink for cka (StreamingCKA / MinibatchCKA) and the second-order metrics
    (StreamingAlignment): each batch goes into the accumulator and is dropped."""

    def __init__(self, acc, metric: str, options: dict):
        self.acc, self.metric, self.options = acc, metric, options

    def update(self, xs: list[Tensor], ys: Optional[list[Tensor]]) -> None:
        self.acc.update(xs, ys)

    def compute(self) -> Tensor:
        return self.acc.compute() if self.metric == "cka" else self.acc.compute(self.metric, **self.options)


class _Pooled:
    """compare_models' sink for the kNN metrics and rsa: every row kept (up to max_samples), then
    :func:`repkern.similarity_matrix`."""

    def __init__(self, count_a: int, count_b: Optional[int], limit: int, metric: str, options: dict, pool: str):
        self.xs = _Rows(count_a, limit, metric, pool)
        self.ys = None if count_b is None else _Rows(count_b, limit, metric, pool)
        self.metric, self.options = metric, options

    def update(self, xs: list[Tensor], ys: Optional[list[Tensor]]) -> None:
        self.xs.add(xs)
        if ys is not None:
            self.ys.add(ys)

    def compute(self) -> Tensor:
        joined: dict = {}  # similarity_matrix computes a layer passed as the same tensor in xs and ys once
        xs = self.xs.layers(joined)
        ys = None if self.ys is None else self.ys.layers(joined)
        return similarity_matrix(xs, ys, metric=self.metric, **self.options)


def _sink(metric: str, kernel: str, debiased: Optional[bool], estimator: str, max_samples, pool: str,
          options: dict, counts: tuple[int, Optional[int]]):
    """(the accumulator of compare_models' metric, the debiased flag of a CKA result, the metric's options
    with defaults filled in); every setting is checked here, before any forward pass."""
    limit = _max_samples(metric, max_samples)
    if metric == "cka":
        _validation.choice("estimator", estimator, ESTIMATORS)
        debiased = estimator == "minibatch" if debiased is None else _validation.boolean("debiased", debiased)
        return _Streamed(_cka_accumulator(estimator, kernel, debiased, options), metric, {}), debiased, {}
    if kernel != "linear" or debiased is not None or estimator != "exact":
        raise TypeError(f"kernel, debiased, estimator: settings of metric='cka' only; metric={metric!r} takes "
                        f"its own options (its options: {', '.join(OPTIONS[metric]) or 'none'})")
    filled = check_options(metric, options, "compare_models")
    if metric in STREAMED:
        acc = StreamingAlignment()
        acc._options(metric, options)  # bad values (alpha, score, dims, keep) fail now, not after the data
        return _Streamed(acc, metric, options), None, filled
    return _Pooled(counts[0], counts[1], limit, metric, options, pool), None, filled


def compare_models(
    model_a: nn.Module,
    model_b: Optional[nn.Module],
    dataloader: Iterable,
    layers_a,
    layers_b=None,
    *,
    metric: str = "cka",
    kernel: str = "linear",
    debiased: Optional[bool] = None,
    estimator: str = "exact",
    pool: str = "mean",
    max_samples: Optional[int] = None,
    progress: bool = True,
    **options,
) -> Union[CkaResult, AlignmentResult]:
    """An alignment metric (CKA by default) between every layer in ``layers_a`` of ``model_a`` and every
    layer in ``layers_b`` of ``model_b`` over the batches of ``dataloader`` (each batch is fed to both models).

    Args:
        model_b: ``None`` (or ``model_a`` itself) compares model_a with itself: it runs once per
            batch, and with ``layers_b=None`` the result is the symmetric layer × layer matrix.
        layers_a, layers_b: module names, globs or module objects, as for :func:`repkern.capture`
            (``layers_b=None``: the same specification as ``layers_a``).
        metric: ``"cka"`` (default), ``"mutual_knn"``, ``"cycle_knn"``, ``"cknna"``, ``"shape_distance"``,
            ``"svcca"``, ``"pwcca"`` or ``"rsa"``, each as :func:`repkern.similarity_matrix` over all rows:

            - ``"cka"`` streams through the estimator below (the options are the accumulator's);
            - ``"shape_distance"``, ``"svcca"``, ``"pwcca"`` stream through :class:`repkern.StreamingAlignment`
              (float64 second-order statistics, memory independent of the number of rows; equal to
              similarity_matrix on all rows up to float64 rounding);
            - the kNN metrics and ``"rsa"`` need every row at once: each layer's pooled rows are kept on
              model_a's device, at most ``max_samples`` of them, then passed to similarity_matrix.
        kernel, estimator, debiased: CKA only. ``estimator="exact"``: :class:`repkern.StreamingCKA`,
            linear kernel only, equal to :func:`repkern.cka_matrix` on all activations at once (float64
            sufficient statistics); ``"minibatch"``: :class:`repkern.MinibatchCKA` (Nguyen et al. 2021;
            each batch is one minibatch), any ``kernel`` (``"linear"``, ``"rbf"``, ``"cosine"``).
            ``debiased=None`` takes the estimator's default: ``False`` for exact (like ``cka_matrix``),
            ``True`` for minibatch (the biased minibatch estimator is inflated at small batches).
        pool: ``"mean"`` (one row per sequence, masked mean), ``"last"`` or ``"all"`` (one row per
            non-padding token; both models must then see the same tokens).
        max_samples: the most rows kept for the kNN metrics and rsa (None: 16384, and 4096 for rsa,
            whose RDMs hold n(n−1)/2 float64 per layer); more rows raise a ValueError naming it (the
            data are never truncated). The streaming metrics keep no rows and ignore it.
        progress: tqdm progress bar (shown only when tqdm is installed).
        options: ``metric="cka"``: passed on to the accumulator's constructor (``max_state_bytes``, ...);
            any other metric: its options as :func:`repkern.similarity_matrix` takes them (``k``,
            ``knn_metric``, ``tile_bytes``; ``alpha``, ``score``; ``dims``, ``keep``; ``rdm``,
            ``compare``). An unknown name is a TypeError naming it.

    Accumulates on model_a's device (every activation is moved there); each forward pass stops after
    the last requested layer. Returns a :class:`repkern.CkaResult` for ``metric="cka"``, else an
    :class:`repkern.AlignmentResult` (both: ``.matrix`` ``(len(layers_a), len(layers_b))`` on the CPU,
    ``.metric``, ``.save``, ``.plot``).
    """
    _check_model("model_a", model_a)
    if model_b is not None:
        _check_model("model_b", model_b)
    _check_common(dataloader, progress)
    _validation.choice("metric", metric, SIMILARITY_METRICS)
    same_model = model_b is None or model_b is model_a
    model_b = model_a if model_b is None else model_b
    symmetric = same_model and layers_b is None
    layers_b = layers_a if layers_b is None else layers_b
    device_a, device_b = model_device(model_a), model_device(model_b)
    samples = batches = 0
    with contextlib.ExitStack() as stack:
        if same_model:
            # One capture of both layer sets: with stop_early, a second capture's later layers would never run.
            names_a = [name for name, _ in resolve_layers(model_a, layers_a)]
            names_b = [name for name, _ in resolve_layers(model_a, layers_b)]
            cap_a = stack.enter_context(capture(model_a, names_a + names_b, pool=pool, stop_early=True))
        else:
            cap_a = stack.enter_context(capture(model_a, layers_a, pool=pool, stop_early=True))
            cap_b = stack.enter_context(capture(model_b, layers_b, pool=pool, stop_early=True))
            names_a, names_b = cap_a.names, cap_b.names
        _check_layers("layers_a", names_a)
        _check_layers("layers_b", names_b)
        sink, debiased, filled = _sink(metric, kernel, debiased, estimator, max_samples, pool, options,
                                       (len(names_a), None if symmetric else len(names_b)))
        stack.enter_context(_evaluating(model_a, model_b))
        for batch in _progress(dataloader, progress, "compare_models"):
            acts_a = run_batch(cap_a, batch, device_a)
            acts_b = acts_a if same_model else run_batch(cap_b, batch, device_b)
            # Every activation to the accumulator's device: layers of a device_map model sit on several devices.
            xs = [acts_a[name].to(device_a) for name in names_a]
            ys = None if symmetric else [acts_b[name].to(device_a) for name in names_b]
            rows = xs[0].shape[0]
            if ys is not None and ys[0].shape[0] != rows:
                raise ValueError(f"dataloader: batch {batches} gave {rows} rows in model_a and {ys[0].shape[0]} in "
                                 f"model_b (pool={pool!r} needs the same sequences and padding in both)")
            sink.update(xs, ys)
            samples += rows
            batches += 1
    if batches == 0:
        raise ValueError("dataloader: yielded no batches")
    matrix = sink.compute().cpu()
    if metric == "cka":
        return CkaResult(matrix=matrix, layers_a=names_a, layers_b=names_b, kernel=kernel, debiased=debiased,
                         estimator=estimator, pool=pool, samples=samples, batches=batches)
    return AlignmentResult(matrix=matrix, layers_a=names_a, layers_b=names_b, metric=metric, options=filled,
                           pool=pool, samples=samples, batches=batches)


def _check_scales(scales) -> list[float]:
    if isinstance(scales, (str, bytes, torch.Tensor)) or not isinstance(scales, Iterable):
        raise TypeError(f"scales: expected a sequence of numbers, got {type(scales).__name__}")
    scales = list(scales)
    if not scales:
        raise ValueError("scales: no noise scales given")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"scales: expected finite numbers >= 0, got {s!r}")
    return [float(s) for s in scales]


def _perturb(params: list[tuple[nn.Parameter, Tensor, float]], scale: float, seed: int) -> None:
    """p ← p₀ + (scale·rms(p₀))·z for every parameter, z ~ N(0, 1) from a CPU generator seeded with
    ``seed``, drawn parameter by parameter in ``named_parameters()`` order (so a draw's noise is the same
    at every scale)."""
    generator = torch.Generator().manual_seed(seed)
    for p, original, rms in params:
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        z = torch.randn(p.shape, generator=generator, dtype=dtype).to(device=p.device, dtype=p.dtype)
        p.copy_(original + z.mul_(scale * rms))


def perturbation_sensitivity(
    model: nn.Module,
    dataloader: Iterable,
    layers,
    scales,
    *,
    metric: str = "cka",
    draws: int = 3,
    seed: int = 0,
    pool: str = "mean",
    max_samples: Optional[int] = None,
    progress: bool = True,
    **options,
) -> PerturbationResult:
    """How far each layer's representation moves when the weights get Gaussian noise: per layer and noise
    scale, ``metric`` between the model's activations and those of the model with perturbed weights.

    Two models with the same outputs can differ in how robust their representations are (a "fractured"
    representation falls apart under small weight noise); this measures it layer by layer.

    Perturbation: every floating-point parameter p of ``model.named_parameters()`` (tied parameters
    once; buffers such as BatchNorm statistics untouched) becomes ``p + scale · rms(p) · z``, with
    rms(p) = sqrt(mean(p²)) of the unperturbed tensor and z standard normal of p's shape. Draw d
    (0 ≤ d < ``draws``) takes z from a CPU ``torch.Generator`` seeded with ``seed + d``, parameter by
    parameter in ``named_parameters()`` order (float32, float64 for a float64 parameter, then cast to
    p's dtype and device): the same z at every scale, so the scales of one draw differ by the noise's
    size only. Scale 0 is the unperturbed model: its rows are the unperturbed rows themselves (no forward
    pass), so each layer compares with itself exactly (1, or 0 for shape_distance; cycle_knn computed).

    The caller's model is perturbed in place and restored bit for bit from a copy of its parameters
    (also when an exception interrupts the run); its train/eval mode is restored as in
    :func:`repkern.compare_models`.

    Args:
        layers: module names, globs or module objects, as for :func:`repkern.capture`.
        scales: noise scales (finite, >= 0), relative to each parameter's RMS.
        metric: any metric of :func:`repkern.similarity_matrix` (``"cka"`` default: linear CKA);
            ``options`` are its options (``k`` for the kNN metrics, ...).
        draws: noise draws per scale (>= 1); seed: the first draw's seed.
        pool: ``"mean"`` (one row per sequence), ``"last"`` or ``"all"`` (one row per token).
        max_samples: the most rows kept (None: 16384, 4096 for rsa); more is a ValueError naming it.
        progress: tqdm progress bars (shown only when tqdm is installed).

    The batches are read from ``dataloader`` once and kept, so every perturbed model sees the same rows
    (a shuffling loader would pair different samples). The unperturbed model's activations are computed
    once and reused for every scale and draw; each (scale, draw) then runs all batches once and compares
    each layer with :func:`repkern.similarity_matrix` (one pair per layer). Memory: the batches, one copy
    of the parameters, and two sets of every layer's rows (unperturbed and current).

    Returns a :class:`repkern.PerturbationResult`: ``values`` ``(len(layers), len(scales), draws)``
    float64 on the CPU, ``.mean`` over draws, ``.save``, ``.plot`` (one line per layer against the scale).
    """
    _check_model("model", model)
    _check_common(dataloader, progress)
    _validation.choice("metric", metric, SIMILARITY_METRICS)
    scales = _check_scales(scales)
    _validation.integer("draws", draws, 1)
    if _validation.integer("seed", seed, 0) + draws - 1 >= 2**64:
        raise ValueError(f"seed: seed + draws - 1 must be below 2**64 (torch.Generator seeds), got seed={seed}")
    filled = check_options(metric, options, "perturbation_sensitivity")
    limit = _max_samples(metric, max_samples)
    device = model_device(model)
    batches = list(dataloader)
    if not batches:
        raise ValueError("dataloader: yielded no batches")
    with capture(model, layers, pool=pool, stop_early=True) as cap, _evaluating(model):
        names = cap.names
        _check_layers("layers", names)

        def activations(show: bool) -> list[Tensor]:
            rows = _Rows(len(names), limit, metric, pool)
            for batch in _progress(batches, show, "perturbation_sensitivity (unperturbed)"):
                acts = run_batch(cap, batch, device)
                rows.add([acts[name].to(device) for name in names])  # a device_map model's layers: one device
            return rows.layers({})

        original = activations(progress)
        check_similarity_matrix_args(original, original, metric, dict(options))  # bad options fail before the draws
        params = [(p, p.detach().clone(), float(p.detach().double().square().mean().sqrt()))
                  for _, p in model.named_parameters() if p.is_floating_point()]
        values = torch.empty(len(names), len(scales), draws, dtype=torch.float64)
        runs = [(d, j) for d in range(draws) for j in range(len(scales))]
        try:
            for d, j in _progress(runs, progress, "perturbation_sensitivity"):
                if scales[j] == 0:  # p + 0·z is p: the unperturbed rows themselves, no forward pass
                    perturbed_layers = original
                else:
                    _perturb(params, scales[j], seed + d)
                    perturbed_layers = activations(False)
                for i, perturbed in enumerate(perturbed_layers):
                    values[i, j, d] = float(similarity_matrix([original[i]], [perturbed], metric=metric,
                                                              **options)[0, 0])
        finally:
            for p, saved, _ in params:
                p.copy_(saved)
    return PerturbationResult(values=values, layers=names, scales=scales, metric=metric,
                              options=filled, pool=pool, seed=seed,
                              samples=original[0].shape[0], batches=len(batches))


def profile_sparsity(
    model: nn.Module,
    dataloader: Iterable,
    layers,
    *,
    pool: str = "all",
    progress: bool = True,
    **stats_options,
) -> SparsityProfile:
    """Sparsity statistics of each layer's activations over the batches of ``dataloader``.

    Args:
        layers: module names, globs or module objects, as for :func:`repkern.capture`.
        pool: ``"all"`` (every non-padding token is a row, the default), ``"mean"`` or ``"last"``.
        progress: tqdm progress bar (shown only when tqdm is installed).
        stats_options: settings of :class:`repkern.SparsityAccumulator` (``eps``, ``top_p``,
            ``dense_threshold``, ...), one accumulator per layer, on the model's device.

    Returns a :class:`repkern.SparsityProfile`: ``stats[layer]`` equals :func:`repkern.sparsity_stats`
    of that layer's rows of all batches concatenated (per-row statistics as summaries: ``row_mean``,
    ``row_histogram``); ``.summary()``, ``.save``, ``.plot``.
    """
    _check_model("model", model)
    _check_common(dataloader, progress)
    if "device" in stats_options:
        raise TypeError("device: profile_sparsity accumulates on the model's device; move the model instead")
    SparsityAccumulator(1, **stats_options)  # bad settings fail here, before any forward pass
    device = model_device(model)
    accumulators: dict[str, SparsityAccumulator] = {}
    batches = 0
    with capture(model, layers, pool=pool, stop_early=True) as cap, _evaluating(model):
        _check_layers("layers", cap.names)
        for batch in _progress(dataloader, progress, "profile_sparsity"):
            for name, acts in run_batch(cap, batch, device).items():
                if name not in accumulators:
                    accumulators[name] = SparsityAccumulator(acts.shape[-1], device=device, **stats_options)
                accumulators[name].update(acts.to(device))  # a device_map model's layers sit on several devices
            batches += 1
    if batches == 0:
        raise ValueError("dataloader: yielded no batches")
    return SparsityProfile(layers=cap.names, stats={name: accumulators[name].compute() for name in cap.names},
                           pool=pool, batches=batches)
