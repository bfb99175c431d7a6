"""Per-class segmentation metrics from confusion counts accumulated over a whole stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.classification import MultilabelStatScores

METRIC_NAMES = ("iou", "dice", "precision", "recall", "accuracy")
_IGNORE = -1


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
        tp, fp, tn, fn = (s.double() for s in (self.tp, self.fp, self.tn, self.fn))
        counted = tp + fp + tn + fn
        # 0/0 happens when a class is absent from both prediction and truth: that is a perfect
        # score (1), not a failure; any other zero denominator means the score really is 0.
        perfect = (tp + fp + fn) == 0
        per_metric = {
            "iou": _ratio(tp, tp + fp + fn, perfect),
            "dice": _ratio(2 * tp, 2 * tp + fp + fn, perfect),
            "precision": _ratio(tp, tp + fp, perfect),
            "recall": _ratio(tp, tp + fn, perfect),
            "accuracy": _ratio(tp + tn, counted, perfect),
        }
        labelled = [i for i in range(len(self.class_names)) if counted[i] > 0]
        results: dict[str, Tensor] = {}
        for metric, values in per_metric.items():
            for i in labelled:
                results[f"{metric}_{self.class_names[i]}"] = values[i].float()
            if labelled:
                results[metric] = values[labelled].mean().float()
        return results


def _ratio(numerator: Tensor, denominator: Tensor, perfect: Tensor) -> Tensor:
    value = numerator / denominator.clamp_min(1.0)
    return torch.where(perfect, torch.ones_like(value), value)
