"""Lightning callbacks of joenet."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import default_collate


class ValidationImageLogger(L.Callback):
    """Log ``input | ground truth | prediction`` panels of fixed validation patches to TensorBoard.

    One image per class (tag ``val/images_<class>``), one row per patch, logged after each
    validation. The patches are spread evenly over the validation tiles and stay the same for the
    whole run, so the panels show how the predictions of the same places evolve.

    Args:
        num_patches: rows per panel.
    """

    def __init__(self, num_patches: int = 4):
        self.num_patches = num_patches

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        dataset = getattr(trainer.datamodule, "val_dataset", None)
        if not loggers or dataset is None or trainer.sanity_checking:
            return
        count = min(self.num_patches, len(dataset))
        indices = torch.linspace(0, len(dataset) - 1, count).long().tolist()
        batch = default_collate([dataset[i] for i in indices])
        with torch.no_grad():
            probs = pl_module(batch["image"].to(pl_module.device)).sigmoid().float().cpu()
        for channel, name in enumerate(pl_module.hparams.class_names):
            panel = _panel(batch["image"], batch["target"][:, channel], probs[:, channel])
            for logger in loggers:
                logger.experiment.add_image(f"val/images_{name}", panel, trainer.global_step)


def _panel(image: Tensor, target: Tensor, probs: Tensor, gap: int = 2) -> Tensor:
    """(1, rows * (S + gap), 3 * S + 2 * gap) grey image: input | truth | prediction per row."""
    rows = []
    for img, tgt, prb in zip(image[:, 0], target, probs, strict=True):
        spacer = torch.ones(img.shape[0], gap)
        rows.append(torch.cat([img, spacer, tgt, spacer, prb], dim=1))
        rows.append(torch.ones(gap, rows[-1].shape[1]))
    return torch.cat(rows[:-1], dim=0).clamp(0, 1)[None]
