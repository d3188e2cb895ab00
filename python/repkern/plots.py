"""Figures for analysis results (matplotlib, imported lazily).

Object-oriented matplotlib only: figures are ``matplotlib.figure.Figure`` objects made without pyplot,
so plotting never switches the backend nor touches pyplot's open figures (a notebook's stay as they
are) and works without a display. Every function returns the Figure (a notebook shows it), saves it
when given a path, and draws into the caller's Axes when given ``ax`` (then the caller's figure is the
one returned and saved).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import torch

from repkern._files import atomic_write


def new_figure(**kwargs):
    """A ``matplotlib.figure.Figure`` outside pyplot; a clear ImportError without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'repkern[plot]' or pip install matplotlib") from exc
    return Figure(**kwargs)


def _axes_list(ax, count: int, what: str) -> list:
    """The caller's Axes, one per panel: one Axes or a sequence (list, array from subplots) of them."""
    from matplotlib.axes import Axes
    import numpy

    axes = [ax] if isinstance(ax, Axes) else list(numpy.ravel(ax))
    if len(axes) != count:
        raise ValueError(f"ax: got {len(axes)} Axes for {count} {what}; give one Axes per {what[:-1]}")
    return axes


def _finish(fig, path: Optional[str], own: bool, dpi: int):
    if own:  # the caller's figure keeps the caller's layout
        fig.tight_layout()
    if path is not None:
        save_figure(fig, os.fspath(path), dpi=dpi)
    return fig


def cka_heatmap(
    matrix: torch.Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: Optional[str] = None,
    *,
    ax=None,
    title: str = "CKA",
    xlabel: str = "",
    ylabel: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "magma",
    colorbar_label: str = "",
):
    """Heatmap of a (rows, cols) CKA (or other alignment) matrix with labelled layer axes, a colour bar
    on [vmin, vmax] (default [0, 1]) and the values written in the cells when they fit. A reversed
    colour map (name ending in ``_r``, for a distance) keeps "more similar" bright. Returns the Figure
    (saved to ``path`` when given; drawn into ``ax`` when given)."""
    values = matrix.detach().double().cpu().numpy()
    rows, cols = values.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"labels: expected {rows} row and {cols} column labels")
    own = ax is None
    if own:
        fig = new_figure(figsize=(1.0 + 0.6 * cols, 0.8 + 0.55 * rows))
        ax = fig.add_subplot()
    fig = ax.figure
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, origin="lower")
    ax.set_xticks(range(cols), col_labels, rotation=45, ha="right")
    ax.set_yticks(range(rows), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if rows * cols <= 196:
        for i in range(rows):
            for j in range(cols):
                v = values[i, j]
                position = (v - vmin) / (vmax - vmin)  # dark text on the colour map's bright end
                bright = position < 0.4 if cmap.endswith("_r") else position > 0.6
                ax.text(j, i, "nan" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v == v and bright else "white")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=colorbar_label)
    return _finish(fig, path, own, dpi=130)


def save_figure(fig, path: str, **kwargs) -> None:
    """fig.savefig(path), written atomically (the format from path's extension, PNG without one)."""
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)


def sparsity_profiles(
    profiles: Mapping[str, Mapping[str, Sequence[float]]],
    layer_labels: Sequence[str],
    path: Optional[str] = None,
    *,
    ax=None,
    metrics: Optional[Sequence[str]] = None,
    title: str = "Hidden-state sparsity by layer",
):
    """One panel per metric, one line per input set: ``profiles[input set][metric]``
    is a per-layer sequence. Returns the Figure (saved to ``path`` when given; drawn into
    ``ax`` when given: one Axes, or a sequence of one Axes per metric; the caller's figure gets no title)."""
    sets = list(profiles)
    if not sets:
        raise ValueError("profiles: no input sets")
    metrics = list(metrics or next(iter(profiles.values())).keys())
    own = ax is None
    if own:
        fig = new_figure(figsize=(4.2 * len(metrics), 3.4))
        axes = list(fig.subplots(1, len(metrics), squeeze=False)[0])
    else:
        axes = _axes_list(ax, len(metrics), "metrics")
        fig = axes[0].figure
    x = range(len(layer_labels))
    for ax, metric in zip(axes, metrics):
        for name in sets:
            values = [float(v) for v in profiles[name][metric]]
            if len(values) != len(layer_labels):
                raise ValueError(f"profiles[{name!r}][{metric!r}]: expected {len(layer_labels)} layers")
            ax.plot(x, values, marker="o", label=name)
        ax.set_xticks(list(x), layer_labels, rotation=45, ha="right")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if own:
        fig.suptitle(title)
    return _finish(fig, path, own, dpi=130)


def sensitivity_curves(
    values: torch.Tensor,
    layer_labels: Sequence[str],
    scales: Sequence[float],
    path: Optional[str] = None,
    *,
    ax=None,
    title: str = "Perturbation sensitivity",
    ylabel: str = "similarity to the unperturbed model",
):
    """One line per layer: the mean over draws of ``values`` (layers, scales, draws) against the noise
    scale (a symmetric-log axis when the positive scales span a factor of 10 or more), with the range
    over draws shaded. Returns the Figure (saved to ``path`` when given; drawn
    into ``ax`` when given)."""
    data = values.detach().double().cpu()
    if data.dim() != 3 or data.shape[:2] != (len(layer_labels), len(scales)):
        raise ValueError(f"values: expected shape ({len(layer_labels)}, {len(scales)}, draws), got {tuple(data.shape)}")
    own = ax is None
    if own:
        fig = new_figure(figsize=(5.6, 3.8))
        ax = fig.add_subplot()
    fig = ax.figure
    x = [float(s) for s in scales]
    for label, per_scale in zip(layer_labels, data):
        line, = ax.plot(x, per_scale.mean(-1).tolist(), marker="o", label=label)
        if data.shape[-1] > 1:
            ax.fill_between(x, per_scale.amin(-1).tolist(), per_scale.amax(-1).tolist(), color=line.get_color(),
                            alpha=0.15, linewidth=0)
    positive = [s for s in x if s > 0]
    if positive and max(positive) >= 10 * min(positive):  # geometric scales: logarithmic, 0 kept on a linear stretch
        ax.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
    ax.set_xlabel("relative weight-noise scale")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(fig, path, own, dpi=130)
