"""BCE + soft Dice per channel for multi-label (sigmoid) segmentation with partial labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BCEDiceLoss(nn.Module):
    """``BCE + Dice`` per channel, averaged over the channels that are labelled.

    Each output channel is an independent binary problem (nuclei, mito), as in the seed. A sample
    says which channels carry labels (``labelled``) and which pixels count (``valid``): the loss of
    an unlabelled channel is skipped, never computed against fake zeros.

    Args:
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.
        smooth: Dice smoothing. It is added to numerator and denominator, so an empty mask
            predicted empty scores Dice 1 (loss 0) instead of 0/0.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        labelled: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """Loss of ``logits`` (B, C, H, W) against 0/1 ``target`` (B, C, H, W).

        Args:
            logits: raw network outputs.
            target: binary masks.
            labelled: (B, C) bool, which channels of each sample carry labels (default: all).
            valid: (B, 1, H, W) or (B, C, H, W) 0/1, which pixels count (default: all).

        Returns:
            A scalar; 0 (with a gradient path) when no channel of the batch is labelled.
        """
        # Autocast would run the reductions below in bf16/fp16, where sums over 10^6 pixels lose
        # precision; the loss is cheap, so it always runs in fp32.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            target = target.float()
            b, c = logits.shape[:2]
            if labelled is None:
                labelled = torch.ones(b, c, dtype=torch.bool, device=logits.device)
            weight = labelled.to(logits.dtype)[:, :, None, None].expand_as(logits)  # (B, C, H, W)
            if valid is not None:
                weight = weight * valid.to(logits.dtype)

            # Per channel, over all labelled samples and valid pixels of the batch (a batch-level
            # Dice is stable on patches where a class is absent).
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            pixels = weight.sum(dim=(0, 2, 3))  # (C,)
            bce = (bce * weight).sum(dim=(0, 2, 3)) / pixels.clamp_min(1.0)

            probs = torch.sigmoid(logits) * weight
            target = target * weight
            intersection = (probs * target).sum(dim=(0, 2, 3))
            denominator = probs.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
            dice = (2 * intersection + self.smooth) / (denominator + self.smooth)

            per_channel = self.bce_weight * bce + self.dice_weight * (1 - dice)  # (C,)
            # Masked mean instead of boolean indexing: no host-device synchronisation in the step.
            present = (pixels > 0).to(per_channel.dtype)
            return (per_channel * present).sum() / present.sum().clamp_min(1.0)


def deep_supervision_loss(
    criterion: BCEDiceLoss, loss: Tensor, aux_logits: list[Tensor], batch: dict[str, Tensor]
) -> Tensor:
    """Full-resolution loss plus the auxiliary heads' at 1/2, 1/4, ...: weights 1, 1/2, 1/4, ...
    normalised to sum 1 (nnU-Net's decay), so the loss keeps its scale.

    Targets are area-downsampled (the foreground share of each coarse pixel, a soft target); a
    coarse pixel counts only where all its pixels were valid.
    """
    weights = [0.5**k for k in range(len(aux_logits) + 1)]
    total = loss * weights[0]
    target, valid = batch["target"].float(), batch["valid"].float()
    for k, logits in enumerate(aux_logits, start=1):
        factor = 2**k
        coarse_target = F.avg_pool2d(target, factor)
        coarse_valid = F.avg_pool2d(valid, factor) > 1 - 1e-6
        total = total + weights[k] * criterion(
            logits, coarse_target, batch["labelled"], coarse_valid
        )
    return total / sum(weights)
