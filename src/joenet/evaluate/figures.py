"""Evaluation figures: slice panels with an error overlay, and precision-recall curves.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
``pyplot``: no global backend is switched and nothing is left open, so this module is safe to
import from a notebook or a headless server alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from joenet.evaluate.counts import (
    metrics_at_level,
    precision_recall_curve,
    threshold_to_level,
)

# Error overlay colours (RGB in [0, 1]): true positive, false positive, false negative.
ERROR_COLOURS = {"TP": (0.1, 0.8, 0.1), "FP": (0.95, 0.1, 0.1), "FN": (0.15, 0.45, 1.0)}


def display_range(raw: np.ndarray) -> np.ndarray:
    """Raw intensities scaled to [0, 1] between the 1st and 99th percentile, for display."""
    raw = raw.astype(np.float32)
    low, high = np.percentile(raw, (1, 99)) if raw.size else (0.0, 1.0)
    return np.clip((raw - low) / max(float(high - low), 1e-6), 0.0, 1.0)


def error_overlay(
    raw: np.ndarray, truth: np.ndarray, pred: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """TP/FP/FN coloured over the raw image.

    Args:
        raw: (y, x) image, any numeric dtype.
        truth: (y, x) mask; nonzero is foreground.
        pred: (y, x) thresholded prediction; nonzero is foreground.
        alpha: opacity of the colours.

    Returns:
        (y, x, 3) float RGB in [0, 1]; true negatives show the raw image only.
    """
    grey = display_range(raw)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    truth, pred = truth > 0, pred > 0
    for name, where in (("TP", truth & pred), ("FP", ~truth & pred), ("FN", truth & ~pred)):
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(ERROR_COLOURS[name])
    return rgb


def save_slice_figure(
    path: str | Path,
    raw: np.ndarray,
    truth: np.ndarray,
    levels: np.ndarray,
    level: int,
    title: str,
) -> Path:
    """Save raw | truth | prediction | error overlay of one slice as a PNG.

    Args:
        path: PNG file to write.
        raw: (y, x) image.
        truth: (y, x) truth mask.
        levels: (y, x) uint8 prediction levels ``round(255 p)``.
        level: cut level; ``levels >= level`` is predicted foreground.
        title: figure title, e.g. class, z and threshold.

    Returns:
        ``path`` as a ``Path``.
    """
    pred = levels >= level
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    axes[0].imshow(display_range(raw), cmap="gray", vmin=0, vmax=1)
    axes[1].imshow(truth > 0, cmap="gray", vmin=0, vmax=1)
    image = axes[2].imshow(levels.astype(np.float32) / 255.0, cmap="magma", vmin=0, vmax=1)
    fig.colorbar(image, ax=axes[2], fraction=0.046, pad=0.02)
    axes[3].imshow(error_overlay(raw, truth, pred))
    for ax, name in zip(axes, ("raw", "truth", "prediction (probability)", "errors"), strict=True):
        ax.set_title(name)
        ax.set_axis_off()
    axes[3].legend(
        handles=[Patch(color=colour, label=name) for name, colour in ERROR_COLOURS.items()],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncols=3,
        fontsize="small",
        frameon=False,
    )
    fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path


def save_pr_curve(
    path: str | Path, histogram: np.ndarray, threshold: float, best_threshold: float, title: str
) -> Path:
    """Save the precision-recall curve of one class with two operating points marked.

    Args:
        path: PNG file to write.
        histogram: (2, 256) counts from ``level_histogram``.
        threshold: the configured probability threshold.
        best_threshold: the best threshold (tuned on the evaluated data: optimistic).
        title: figure title.

    Returns:
        ``path`` as a ``Path``.
    """
    curve = precision_recall_curve(histogram)
    fig = Figure(figsize=(5, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(curve["recall"], curve["precision"], color="0.2", lw=1.5, label="all thresholds")
    points = ((threshold, "o", "threshold"), (best_threshold, "*", "best (optimistic)"))
    for value, marker, label in points:
        point = metrics_at_level(histogram, threshold_to_level(value))
        ax.plot(
            point["recall"],
            point["precision"],
            marker,
            ms=11 if marker == "*" else 8,
            label=f"{label} {value:.3g}: IoU {point['iou']:.3f}",
        )
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
