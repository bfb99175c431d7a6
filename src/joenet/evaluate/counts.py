"""Confusion counts at every uint8 threshold from one histogram, and metrics from counts.

Predictions are stored as uint8 levels ``u = round(255 * p)`` of a probability ``p``. For each
class we count, per level ``u``, the truth-positive and the truth-negative pixels (a (2, 256)
histogram). A pixel is predicted positive at threshold ``t`` iff its stored probability
``u / 255 >= t``, i.e. iff ``u >= threshold_to_level(t) = ceil(255 t)``; so the confusion matrix
of every threshold is a reverse cumulative sum of the histogram. That makes the best-threshold
search exact over all 255 distinct operating points and costs one pass over the data.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from joenet.metrics import metrics_from_counts

if TYPE_CHECKING:
    import zarr

LEVELS = 256


def threshold_to_level(threshold: float) -> int:
    """The smallest uint8 level ``u`` with ``u / 255 >= threshold``.

    Args:
        threshold: probability threshold in [0, 1].

    Returns:
        ``ceil(255 * threshold)`` (0..255); predictions ``u >= level`` are positive.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    # Rounding first keeps float noise from moving a level: 255 * 0.2 is 51.00000000000001.
    return math.ceil(round(255.0 * threshold, 9))


def to_levels(prediction: np.ndarray, binary: bool = False) -> np.ndarray:
    """Prediction values as uint8 levels ``round(255 * p)``.

    Args:
        prediction: uint8 levels (returned as they are), 0/1 masks (``binary=True`` or bool
            dtype: mapped to 0/255) or float probabilities in [0, 1].
        binary: the uint8 array holds 0/1 masks (a prediction written with a threshold).

    Returns:
        uint8 array of the same shape.
    """
    if prediction.dtype == bool or binary:
        return np.where(prediction > 0, np.uint8(255), np.uint8(0))
    if prediction.dtype == np.uint8:
        return prediction
    if prediction.dtype.kind == "f":
        return np.rint(np.clip(prediction, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(
        f"unsupported prediction dtype {prediction.dtype} "
        "(expected uint8 levels round(255 p), bool/0-1 masks or float probabilities)"
    )


def level_histogram(levels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pixel counts per prediction level, split by truth.

    Args:
        levels: uint8 prediction levels, any shape.
        truth: labels of the same shape; ``truth > 0`` is foreground.

    Returns:
        int64 array (2, 256): row 0 truth-negative, row 1 truth-positive counts per level.
    """
    if levels.shape != truth.shape:
        raise ValueError(f"prediction {levels.shape} and truth {truth.shape} shapes differ")
    index = levels.astype(np.int64).ravel() + LEVELS * (truth.ravel() > 0)
    return np.bincount(index, minlength=2 * LEVELS).reshape(2, LEVELS)


def accumulate_histogram(
    pred: zarr.Array | np.ndarray,
    truth: zarr.Array | np.ndarray,
    z_range: tuple[int, int],
    keep: bool = False,
    block_voxels: int = 2**22,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``level_histogram`` of a (z, y, x) volume, read block by block over z.

    Only one block of ``block_voxels`` is in memory at a time (plus, for ``level_histogram``,
    its int64 index: 8 bytes per voxel), unless ``keep`` asks for the whole range.

    Args:
        pred: (z, y, x) zarr or numpy array of prediction values (see ``to_levels``).
        truth: labels of the same shape; nonzero is foreground.
        z_range: half-open ``(start, stop)`` of the slices to count.
        keep: also return the uint8 levels and the truth mask of the range.
        block_voxels: voxels read at a time (at least one slice).

    Returns:
        ``(histogram, levels, truth_mask)``; the last two are None unless ``keep``.
    """
    start, stop = z_range
    plane = tuple(pred.shape[1:])
    depth = max(1, block_voxels // int(np.prod(plane)))
    histogram = np.zeros((2, LEVELS), dtype=np.int64)
    # uint8 levels rather than a bool mask: the same memory, and the cut can be chosen later.
    levels = np.empty((stop - start, *plane), dtype=np.uint8) if keep else None
    labels = np.empty((stop - start, *plane), dtype=bool) if keep else None
    for z in range(start, stop, depth):
        block = slice(z, min(z + depth, stop))
        block_levels = to_levels(np.asarray(pred[block]))
        block_labels = np.asarray(truth[block]) > 0
        histogram += level_histogram(block_levels, block_labels)
        if levels is not None and labels is not None:
            levels[block.start - start : block.stop - start] = block_levels
            labels[block.start - start : block.stop - start] = block_labels
    return histogram, levels, labels


def confusion_at_levels(histogram: np.ndarray) -> dict[str, np.ndarray]:
    """``tp, fp, fn, tn`` for every cut level ``k`` in 0..256 (positive iff ``u >= k``).

    Args:
        histogram: (2, 256) counts from ``level_histogram``.

    Returns:
        Four int64 arrays of length 257; index 256 predicts nothing positive.
    """
    negatives, positives = (np.asarray(row, dtype=np.int64) for row in histogram)
    # Reverse cumulative sums: counts at or above each level, with 0 appended for k = 256.
    above_pos = np.append(np.cumsum(positives[::-1])[::-1], 0)
    above_neg = np.append(np.cumsum(negatives[::-1])[::-1], 0)
    return {
        "tp": above_pos,
        "fp": above_neg,
        "fn": positives.sum() - above_pos,
        "tn": negatives.sum() - above_neg,
    }


def best_level(histogram: np.ndarray, prefer: int, metric: str = "iou") -> int:
    """The cut level in 1..255 that maximises ``metric``; ties go to the level nearest ``prefer``.

    Dice is a monotone function of IoU, so both pick the same level. Ties are common (a 0/1
    prediction gives the same counts at every level), and resolving them towards the default
    threshold keeps the reported best threshold meaningful.

    Args:
        histogram: (2, 256) counts from ``level_histogram``.
        prefer: level that wins ties, usually ``threshold_to_level(threshold)``.
        metric: a name from ``METRIC_NAMES``.

    Returns:
        The level ``k``; its threshold is ``k / 255``.
    """
    confusion = confusion_at_levels(histogram)
    values = metrics_from_counts(**confusion)[metric][1:LEVELS]  # levels 1..255
    candidates = np.flatnonzero(np.isclose(values, values.max(), rtol=0.0, atol=1e-12)) + 1
    return int(candidates[np.argmin(np.abs(candidates - prefer))])


def precision_recall_curve(histogram: np.ndarray) -> dict[str, np.ndarray]:
    """Precision and recall at thresholds ``k / 255`` for ``k`` in 1..255 (ascending).

    Args:
        histogram: (2, 256) counts from ``level_histogram``.

    Returns:
        ``{"threshold", "precision", "recall"}``, float64 arrays of length 255.
    """
    confusion = confusion_at_levels(histogram)
    metrics = metrics_from_counts(**confusion)
    levels = np.arange(1, LEVELS)
    return {
        "threshold": levels / 255.0,
        "precision": metrics["precision"][levels],
        "recall": metrics["recall"][levels],
    }


def metrics_at_level(histogram: np.ndarray, level: int) -> dict[str, float]:
    """Counts and metrics at one cut level, as plain Python numbers (for JSON and CSV)."""
    confusion = {name: int(value[level]) for name, value in confusion_at_levels(histogram).items()}
    metrics = {name: float(value) for name, value in metrics_from_counts(**confusion).items()}
    return {**metrics, **confusion}
