"""Analysis workflows over a dataset: CKA between the layers of two models, per-layer sparsity.

Both stream: each batch's activations go into accumulators and are dropped, so memory does not grow
with the dataset. Batches are moved to the model's device and run there (a tensor is passed as
``model(batch)``, a tuple/list as ``model(*batch)``, a mapping as ``model(**batch)``; a mapping's
``attention_mask`` marks padding for pooling, see :func:`repkern.capture`). Models run in eval mode
(dropout off) without autograd; their previous mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch import nn

from repkern import _validation
from repkern.capture import capture
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


def _model_inputs(batch, device: torch.device) -> tuple[tuple, dict, Optional[torch.Tensor]]:
    """(args, kwargs, attention mask) of one batch on ``device`` (batch forms: module docstring)."""
    batch = _to_device(batch, device)
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        return (), kwargs, kwargs.pop("attention_mask", None)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}, None
    return (batch,), {}, None


def run_batch(cap, batch, device: torch.device) -> dict:
    """Pooled activations of one batch, run on ``device`` (``cap``: an entered :func:`repkern.capture`)."""
    args, kwargs, mask = _model_inputs(batch, device)
    return cap.run(*args, attention_mask=mask, **kwargs)


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


def _check_layers(name: str, cap) -> None:
    """At least one layer to compare or profile (an empty list is an error, not an empty result)."""
    if not cap.names:
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

    Runs on model_a's device (model_b's activations are moved there). Returns a
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
        cap_a = stack.enter_context(capture(model_a, layers_a, pool=pool))
        cap_b = cap_a if symmetric else stack.enter_context(capture(model_b, layers_b, pool=pool))
        _check_layers("layers_a", cap_a)
        _check_layers("layers_b", cap_b)
        stack.enter_context(_evaluating(model_a, model_b))
        for batch in _progress(dataloader, progress, "compare_models"):
            args, kwargs, mask = _model_inputs(batch, device_a)
            acts_a = cap_a.run(*args, attention_mask=mask, **kwargs)
            if symmetric:
                acts_b = None
            elif same_model:
                acts_b = cap_b.collect(mask)  # the hooks of cap_b saw the same forward pass
            else:
                acts_b = run_batch(cap_b, batch, device_b)
            xs = [acts_a[name] for name in cap_a.names]
            ys = None if acts_b is None else [acts_b[name].to(device_a) for name in cap_b.names]
            rows = xs[0].shape[0]
            if ys is not None and ys[0].shape[0] != rows:
                raise ValueError(f"dataloader: batch {batches} gave {rows} rows in model_a and {ys[0].shape[0]} in "
                                 f"model_b (pool={pool!r} needs the same sequences and padding in both)")
            acc.update(xs, ys)
            samples += rows
            batches += 1
    if batches == 0:
        raise ValueError("dataloader: yielded no batches")
    return CkaResult(matrix=acc.compute().cpu(), layers_a=cap_a.names, layers_b=cap_b.names, kernel=kernel,
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
    with capture(model, layers, pool=pool) as cap, _evaluating(model):
        _check_layers("layers", cap)
        for batch in _progress(dataloader, progress, "profile_sparsity"):
            for name, acts in run_batch(cap, batch, device).items():
                if name not in accumulators:
                    accumulators[name] = SparsityAccumulator(acts.shape[-1], device=device, **stats_options)
                accumulators[name].update(acts)
            batches += 1
    if batches == 0:
        raise ValueError("dataloader: yielded no batches")
    return SparsityProfile(layers=cap.names, stats={name: accumulators[name].compute() for name in cap.names},
                           pool=pool, batches=batches)
