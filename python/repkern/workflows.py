"""Analysis workflows over a dataset: CKA between the layers of two models, per-layer sparsity.

Both stream: each batch's activations go into accumulators and are dropped, so memory does not grow
with the dataset. Batches are moved to the model's device and run there (a tensor is passed as
``model(batch)``, a tuple/list as ``model(*batch)``, a mapping as ``model(**batch)``; a mapping's
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
import typing
from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch import nn

from repkern import _validation
from repkern.capture import capture, resolve_layers
from repkern.ops.sparsity import SparsityAccumulator
from repkern.results import CkaResult, SparsityProfile

ESTIMATORS = ("exact", "minibatch")


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


def compare_models(
    model_a: nn.Module,
    model_b: Optional[nn.Module],
    dataloader: Iterable,
    layers_a,
    layers_b=None,
    *,
    kernel: str = "linear",
    debiased: Optional[bool] = None,
    estimator: str = "exact",
    pool: str = "mean",
    progress: bool = True,
    **estimator_options,
) -> CkaResult:
    """CKA between every layer in ``layers_a`` of ``model_a`` and every layer in ``layers_b`` of
    ``model_b`` over the batches of ``dataloader`` (each batch is fed to both models).

    Args:
        model_b: ``None`` (or ``model_a`` itself) compares model_a with itself: it runs once per
            batch, and with ``layers_b=None`` the result is the symmetric layer × layer matrix.
        layers_a, layers_b: module names, globs or module objects, as for :func:`repkern.capture`
            (``layers_b=None``: the same specification as ``layers_a``).
        estimator: ``"exact"``: :class:`repkern.StreamingCKA`, linear kernel only, equal to
            :func:`repkern.cka_matrix` on all activations at once (float64 sufficient statistics);
            ``"minibatch"``: :class:`repkern.MinibatchCKA` (Nguyen et al. 2021; each batch is one
            minibatch), any ``kernel`` (``"linear"``, ``"rbf"``, ``"cosine"``).
        debiased: ``None`` takes the estimator's default: ``False`` for exact (like ``cka_matrix``),
            ``True`` for minibatch (the biased minibatch estimator is inflated at small batches).
        pool: ``"mean"`` (one row per sequence, masked mean), ``"last"`` or ``"all"`` (one row per
            non-padding token; both models must then see the same tokens).
        progress: tqdm progress bar (shown only when tqdm is installed).
        estimator_options: passed on to the accumulator's constructor.

    Accumulates on model_a's device (every activation is moved there); each forward pass stops after
    the last requested layer. Returns a
    :class:`repkern.CkaResult` (``.matrix`` ``(len(layers_a), len(layers_b))`` on the CPU, ``.save``,
    ``.plot``).
    """
    _check_model("model_a", model_a)
    if model_b is not None:
        _check_model("model_b", model_b)
    _check_common(dataloader, progress)
    _validation.choice("estimator", estimator, ESTIMATORS)
    debiased = estimator == "minibatch" if debiased is None else _validation.boolean("debiased", debiased)
    same_model = model_b is None or model_b is model_a
    model_b = model_a if model_b is None else model_b
    symmetric = same_model and layers_b is None
    layers_b = layers_a if layers_b is None else layers_b
    acc = _cka_accumulator(estimator, kernel, debiased, estimator_options)
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
            acc.update(xs, ys)
            samples += rows
            batches += 1
    if batches == 0:
        raise ValueError("dataloader: yielded no batches")
    return CkaResult(matrix=acc.compute().cpu(), layers_a=names_a, layers_b=names_b, kernel=kernel,
                     debiased=debiased, estimator=estimator, pool=pool, samples=samples, batches=batches)


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
