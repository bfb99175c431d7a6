"""Object-level statistics: 3D connected components of prediction and truth, matched by IoU.

Both masks of the evaluated z range are held in memory (one bool and one int32 label volume
each, so about 10 bytes per voxel in all): fine for volumes of a few GiB of voxels, not for a
whole large dataset. Evaluate such a volume in z ranges, or switch instances off.
"""

from __future__ import annotations

import numpy as np

from joenet.volume.components import label_components

INSTANCE_METRIC_NAMES = (
    "true_objects",
    "pred_objects",
    "matched_objects",
    "object_precision",
    "object_recall",
    "object_f1",
    "matched_mean_iou",
)


def match_objects(
    truth_labels: np.ndarray, pred_labels: np.ndarray, iou_threshold: float = 0.5
) -> list[tuple[int, int, float]]:
    """One-to-one matches of truth and predicted objects with IoU >= ``iou_threshold``.

    Candidate pairs are taken greedily by decreasing IoU, each object at most once. For a
    threshold of 0.5 or more this is the unique matching (an object cannot overlap two others by
    more than half of each union), so greedy and optimal assignment agree.

    Args:
        truth_labels: int labels (0 background) of the truth objects.
        pred_labels: int labels of the predicted objects, same shape.
        iou_threshold: minimum IoU of a match, in (0, 1].

    Returns:
        ``(truth_id, pred_id, iou)`` per match, by decreasing IoU.
    """
    if truth_labels.shape != pred_labels.shape:
        raise ValueError(f"label shapes differ: {truth_labels.shape} vs {pred_labels.shape}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    truth_sizes = np.bincount(truth_labels.ravel())
    pred_sizes = np.bincount(pred_labels.ravel())
    both = (truth_labels > 0) & (pred_labels > 0)
    # Pair ids of overlapping voxels; np.unique counts intersections without an n x m matrix.
    stride = np.int64(pred_sizes.size)
    pairs, intersections = np.unique(
        truth_labels[both].astype(np.int64) * stride + pred_labels[both], return_counts=True
    )
    truth_ids, pred_ids = pairs // stride, pairs % stride
    unions = truth_sizes[truth_ids] + pred_sizes[pred_ids] - intersections
    ious = intersections / unions
    matches: list[tuple[int, int, float]] = []
    used_truth: set[int] = set()
    used_pred: set[int] = set()
    for i in np.argsort(-ious, kind="stable"):
        if ious[i] < iou_threshold:
            break
        t, p = int(truth_ids[i]), int(pred_ids[i])
        if t in used_truth or p in used_pred:
            continue
        used_truth.add(t)
        used_pred.add(p)
        matches.append((t, p, float(ious[i])))
    return matches


def instance_metrics(
    truth_mask: np.ndarray,
    pred_mask: np.ndarray,
    iou_threshold: float = 0.5,
    connectivity: int = 1,
) -> dict[str, float]:
    """Object counts and object precision, recall and F1 at an IoU matching threshold.

    Objects are 3D connected components. With no objects on either side precision, recall and
    F1 are 1 (the 0/0 convention of the pixel metrics); ``matched_mean_iou`` is 0 without matches.

    Args:
        truth_mask: (z, y, x) truth; nonzero is foreground.
        pred_mask: (z, y, x) thresholded prediction.
        iou_threshold: minimum IoU of a match.
        connectivity: see ``label_components``.

    Returns:
        ``{name: value}`` for each name in ``INSTANCE_METRIC_NAMES``.
    """
    truth_labels, n_true = label_components(truth_mask, connectivity)
    pred_labels, n_pred = label_components(pred_mask, connectivity)
    matches = match_objects(truth_labels, pred_labels, iou_threshold)
    n_matched = len(matches)
    return {
        "true_objects": n_true,
        "pred_objects": n_pred,
        "matched_objects": n_matched,
        "object_precision": n_matched / n_pred if n_pred else float(n_true == 0),
        "object_recall": n_matched / n_true if n_true else float(n_pred == 0),
        "object_f1": 2 * n_matched / (n_true + n_pred) if n_true + n_pred else 1.0,
        "matched_mean_iou": float(np.mean([iou for *_, iou in matches])) if matches else 0.0,
    }
