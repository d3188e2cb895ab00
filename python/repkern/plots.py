"""Figures for analysis results (matplotlib, imported lazily; the Agg backend
is used so that plotting works without a display)."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import torch

from repkern._files import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend; a clear ImportError without matplotlib."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'repkern[demo]' or pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cka_heatmap(
    matrix: torch.Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str,
    *,
    title: str = "CKA",
    xlabel: str = "",
    ylabel: str = "",
) -> str:
    """Heatmap of a (rows, cols) CKA matrix with labelled layer axes, a colour bar
    on [0, 1] and the values written in the cells when they fit. Returns `path`."""
    plt = pyplot()
    values = matrix.detach().double().cpu().numpy()
    rows, cols = values.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"labels: expected {rows} row and {cols} column labels")
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * cols, 0.8 + 0.55 * rows))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    ax.set_xticks(range(cols), col_labels, rotation=45, ha="right")
    ax.set_yticks(range(rows), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if rows * cols <= 196:
        for i in range(rows):
            for j in range(cols):
                v = values[i, j]
                ax.text(j, i, "nan" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v == v and v > 0.6 else "white")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)
    return path


def save_figure(fig, path: str, **kwargs) -> None:
    """fig.savefig(path), written atomically (the format from path's extension, PNG without one)."""
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)


def sparsity_profiles(
    profiles: Mapping[str, Mapping[str, Sequence[float]]],
    layer_labels: Sequence[str],
    path: str,
    *,
    metrics: Optional[Sequence[str]] = None,
    title: str = "Hidden-state sparsity by layer",
) -> str:
    """One panel per metric, one line per input set: ``profiles[input set][metric]``
    is a per-layer sequence. Returns `path`."""
    plt = pyplot()
    sets = list(profiles)
    if not sets:
        raise ValueError("profiles: no input sets")
    metrics = list(metrics or next(iter(profiles.values())).keys())
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    x = range(len(layer_labels))
    for ax, metric in zip(axes[0], metrics):
        for name in sets:
            values = [float(v) for v in profiles[name][metric]]
            if len(values) != len(layer_labels):
                raise ValueError(f"profiles[{name!r}][{metric!r}]: expected {len(layer_labels)} layers")
            ax.plot(x, values, marker="o", label=name)
        ax.set_xticks(list(x), layer_labels, rotation=45, ha="right")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)
    return path
