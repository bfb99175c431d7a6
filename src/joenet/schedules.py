"""The learning-rate schedule of training: linear warm-up, then cosine, over steps or time."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up over the first ``warmup`` share, then cosine to 0, of a progress in [0, 1].

    ``progress(step)`` says how far training is (steps or time); only the step count is saved
    in checkpoints, so a run resumes on the same curve.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, progress: Callable[[int], float], warmup: float
    ) -> None:
        self._progress = progress
        self.warmup = warmup
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        done = min(max(self._progress(self.last_epoch), 0.0), 1.0)
        factor = 0.5 * (1.0 + math.cos(math.pi * done))
        if done < self.warmup:
            factor *= done / self.warmup
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "_progress"}
