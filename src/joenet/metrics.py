"""Segmentation metrics from confusion counts: one formula for training and for evaluation.

``metrics_from_counts`` holds the formulas (numpy); ``SegmentationMetrics`` accumulates the counts
of a training stage with torchmetrics and applies them; ``joenet.evaluate`` applies them to the
counts of a whole prediction volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics.classification import MultilabelStatScores

# The per-class metrics training logs (val/iou_mito, ...): names users' monitors and scripts read.
LOGGED_METRICS = ("iou", "dice", "precision", "recall", "accuracy")
METRIC_NAMES = (*LOGGED_METRICS, "iou_background", "miou")
_IGNORE = -1


def metrics_from_counts(
    tp: np.ndarray | float, fp: np.ndarray | float, fn: np.ndarray | float, tn: np.ndarray | float
) -> dict[str, np.ndarray]:
    """Foreground IoU, Dice, precision, recall, accuracy, background IoU and their mean (mIoU).

    When a class is absent from both
    prediction and truth (``tp + fp + fn == 0``) every foreground score is 1, not 0/0; any other
    zero denominator gives 0. Background IoU is 1 when there is no background anywhere. ``miou``
    is the mean of foreground and background IoU, as some EM papers report "mIoU".

    Args:
        tp: true positives (scalars or arrays that broadcast).
        fp: false positives.
        fn: false negatives.
        tn: true negatives.

    Returns:
        ``{name: float64 array}`` for each name in ``METRIC_NAMES``.
    """
    tp, fp, fn, tn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, fn, tn))
    perfect = (tp + fp + fn) == 0
    iou = _ratio(tp, tp + fp + fn, perfect)
    iou_background = _ratio(tn, tn + fp + fn, (tn + fp + fn) == 0)
    return {
        "iou": iou,
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, perfect),
        "precision": _ratio(tp, tp + fp, perfect),
        "recall": _ratio(tp, tp + fn, perfect),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, perfect),
        "iou_background": iou_background,
        "miou": (iou + iou_background) / 2,
    }


def _ratio(numerator: np.ndarray, denominator: np.ndarray, perfect: np.ndarray) -> np.ndarray:
    value = numerator / np.maximum(denominator, 1.0)
    return np.where(perfect, 1.0, value)


class SegmentationMetrics(MultilabelStatScores):
    """IoU, Dice, precision, recall and pixel accuracy per class, plus their means.

    The counts (tp, fp, tn, fn per class) are summed over every pixel of every batch of a stage and
    synchronised across DDP ranks by torchmetrics, so the figures are global, not averages of
    per-batch or per-sample scores. Pixels of unlabelled channels and pixels outside ``valid`` are
    passed to torchmetrics as ``ignore_index`` and never counted.

    ``compute()`` returns ``{f"{metric}_{class}": value}`` for each class that had at least one
    labelled pixel, and ``{metric}`` (mean over those classes); a class without labels is left out
    entirely rather than reported as 0 or NaN.

    Args:
        class_names: one name per output channel, e.g. ``("nuclei", "mito")``.
        threshold: probability above which a pixel is predicted foreground.
    """

    def __init__(self, class_names: Sequence[str], threshold: float = 0.5):
        super().__init__(
            num_labels=len(class_names),
            threshold=threshold,
            average=None,
            multidim_average="global",
            ignore_index=_IGNORE,
        )
        self.class_names = list(class_names)

    def update(  # type: ignore[override]
        self,
        probs: Tensor,
        target: Tensor,
        labelled: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> None:
        """Add a batch: ``probs`` and 0/1 ``target`` (B, C, H, W); masks as in ``BCEDiceLoss``."""
        target = target.long()
        if labelled is not None:
            target = target.masked_fill(~labelled.bool()[:, :, None, None], _IGNORE)
        if valid is not None:
            target = target.masked_fill(~valid.bool(), _IGNORE)
        super().update(probs, target)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Metrics per labelled class and their means over those classes."""
        tp, fp, tn, fn = (s.double().cpu().numpy() for s in (self.tp, self.fp, self.tn, self.fn))
        counted = tp + fp + tn + fn
        every = metrics_from_counts(tp, fp, fn, tn)
        device = self.tp.device  # back where the counts live (logging may sync across ranks)
        per_metric = {name: torch.from_numpy(every[name]).to(device) for name in LOGGED_METRICS}
        labelled = [i for i in range(len(self.class_names)) if counted[i] > 0]
        results: dict[str, Tensor] = {}
        for metric, values in per_metric.items():
            for i in labelled:
                results[f"{metric}_{self.class_names[i]}"] = values[i].float()
            if labelled:
                results[metric] = values[labelled].mean().float()
        return results
