"""Arguments of the CKA/HSIC family: :func:`repkern.hsic`, :func:`repkern.cka`, :func:`repkern.cka_from_grams`,
:func:`repkern.cka_matrix` and the streaming accumulators."""

from __future__ import annotations

import torch

from repkern._validation.common import boolean, choice, floating_tensor, positive_number
from repkern._validation.gram import GRAM_KERNELS, MEDIANS, rbf_threshold


def check_samples(name: str, t, *, min_dim: int, shape_hint: str) -> torch.Tensor:
    """A floating tensor with n >= 1 samples (dim −2) and d >= 1 features (dim −1)."""
    floating_tensor(name, t, min_dim=min_dim, shape_hint=shape_hint)
    if t.shape[-2] < 1 or t.shape[-1] < 1:
        raise ValueError(f"{name}: needs n >= 1 samples and d >= 1 features {shape_hint}, got shape {tuple(t.shape)}")
    return t


def check_same_kind(name: str, t: torch.Tensor, first_name: str, first: torch.Tensor) -> None:
    """`t` has the dtype and device of `first` (no silent promotion or transfer)."""
    if t.dtype != first.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from {first_name}'s {first.dtype}")
    if t.device != first.device:
        raise ValueError(f"{name}: on device {t.device} but {first_name} on {first.device}")


def check_sample_count(name: str, n: int, debiased: bool) -> None:
    """Biased HSIC divides by (n−1)², the unbiased estimator by n(n−3) and (n−2)."""
    need = 4 if debiased else 2
    if n < need:
        which = "the unbiased estimator (debiased=True)" if debiased else "HSIC"
        raise ValueError(f"{name}: {which} needs n >= {need} samples, got n={n}")


def check_hsic_args(x, y, kernel, debiased, sigma, threshold, median):
    """Validates the arguments of :func:`hsic` / :func:`cka`; returns (sigma, threshold)."""
    hint = "(shape (..., n, d))"
    check_samples("x", x, min_dim=2, shape_hint=hint)
    check_samples("y", y, min_dim=2, shape_hint=hint)
    check_same_kind("y", y, "x", x)
    if y.shape[-2] != x.shape[-2]:
        raise ValueError(f"y: has n={y.shape[-2]} samples but x has n={x.shape[-2]} (shapes {tuple(x.shape)}, "
                         f"{tuple(y.shape)})")
    if y.shape[:-2] != x.shape[:-2]:
        raise ValueError(f"y: batch dims {tuple(y.shape[:-2])} differ from x's {tuple(x.shape[:-2])}")
    choice("kernel", kernel, GRAM_KERNELS)
    boolean("debiased", debiased)
    check_sample_count("x", x.shape[-2], debiased)
    sigma = positive_number("sigma", sigma, allow_none=True)
    threshold = rbf_threshold(threshold)
    choice("median", median, MEDIANS)
    return sigma, threshold


def check_grams(k, l, debiased):
    hint = "(shape (..., n, n))"
    check_samples("k", k, min_dim=2, shape_hint=hint)
    check_samples("l", l, min_dim=2, shape_hint=hint)
    for name, g in (("k", k), ("l", l)):
        if g.shape[-1] != g.shape[-2]:
            raise ValueError(f"{name}: expected square Gram matrices (..., n, n), got shape {tuple(g.shape)}")
    check_same_kind("l", l, "k", k)
    if l.shape != k.shape:
        raise ValueError(f"l: shape {tuple(l.shape)} differs from k's {tuple(k.shape)}")
    boolean("debiased", debiased)
    check_sample_count("k", k.shape[-1], debiased)


def check_layers(name: str, layers, first=None) -> list:
    """A non-empty sequence of (n, d_i) tensors sharing n, dtype and device (with `first`'s too)."""
    if isinstance(layers, torch.Tensor) or not isinstance(layers, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple of (n, d) tensors, got {type(layers).__name__}")
    if len(layers) == 0:
        raise ValueError(f"{name}: expected at least one layer")
    ref_name, ref = (f"{name}[0]", layers[0]) if first is None else first
    for i, t in enumerate(layers):
        check_samples(f"{name}[{i}]", t, min_dim=2, shape_hint="(shape (n, d))")
        if t.dim() != 2:
            raise ValueError(f"{name}[{i}]: expected shape (n, d), got {tuple(t.shape)}")
        check_same_kind(f"{name}[{i}]", t, ref_name, ref)
        if t.shape[0] != ref.shape[0]:
            raise ValueError(f"{name}[{i}]: has n={t.shape[0]} samples but {ref_name} has n={ref.shape[0]}")
    return list(layers)


def check_cka_matrix_args(xs, ys, kernel, debiased, sigma, threshold, median):
    """Validates :func:`cka_matrix` arguments; returns (xs, ys or None, sigma, threshold)."""
    xs = check_layers("xs", xs)
    if ys is not None:
        ys = check_layers("ys", ys, ("xs[0]", xs[0]))
    choice("kernel", kernel, GRAM_KERNELS)
    boolean("debiased", debiased)
    check_sample_count("xs[0]", xs[0].shape[0], debiased)
    sigma = positive_number("sigma", sigma, allow_none=True)
    threshold = rbf_threshold(threshold)
    choice("median", median, MEDIANS)
    return xs, ys, sigma, threshold


