"""Mito IoU of a network on whole slices, and what ``time_to_accuracy.py --diagnose`` measures.

The columns say why a curve falls (see ``time_to_accuracy.py``): the training slices' IoU
(overfitting), BatchNorm with per-slice or re-estimated statistics (running statistics that do
not fit whole slices) and the best probability threshold (calibration).

:func:`tiled_mito_logits` predicts the slices as ``python -m joenet.predict`` does, tile by tile:
with per-sample normalisation (InstanceNorm, as MONAI's BasicUNet) each tile is normalised by its
own statistics, so tiled and whole-slice predictions differ, and only measuring both says by how
much.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


def mask_iou(predicted: torch.Tensor, masks: torch.Tensor) -> float:
    return int((predicted & masks).sum()) / max(int((predicted | masks).sum()), 1)


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode inside the block, back in the mode it was in after it."""
    was_training = net.training
    try:
        yield net.eval()
    finally:
        net.train(was_training)


@torch.inference_mode()
def mito_logits(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mito logits (S, H, W) of each slice, the network in its current mode."""
    return torch.stack([net(image[None])[0, 1] for image in images])


def mito_iou(net: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    """IoU of channel 1 (mito) at probability 0.5 over all the given slices, in eval mode."""
    with eval_mode(net):
        logits = mito_logits(net, images)
    return mask_iou(logits > 0, masks)  # logit > 0 <=> probability > 0.5


@torch.inference_mode()
def tiled_mito_logits(
    net: nn.Module, images: torch.Tensor, tile: int = 256, overlap: int = 64, grid: int = 16
) -> torch.Tensor:
    """Mito logits (S, H, W) blended from tiles by joenet's predictor (Gaussian, eval mode).

    ``grid``: the network's tile step (16 for joenet's 5 levels and BasicUNet's 4 poolings).
    """
    from joenet.predict.tiling import PlanePredictor, plan_axis

    predictor = PlanePredictor(net, torch.device("cpu"), batch_size=1)
    _, _, height, width = images.shape
    margin = overlap // 2  # tile_margin's value whenever the receptive field exceeds the overlap
    tiles = [plan_axis(0, n, n, tile, overlap, margin, grid) for n in (height, width)]
    pad = [(0, 0), *((0, max(0, t.stop - n)) for t, n in zip(tiles, (height, width), strict=True))]
    planes = np.pad(images[:, 0].numpy(), pad, mode="reflect")  # as the volume reader pads
    with eval_mode(net):
        probs = predictor.predict(planes, *tiles, (0, height), (0, width))[:, 1]
    probs = torch.from_numpy(probs).clamp(1e-7, 1 - 1e-7)
    return torch.log(probs / (1 - probs))


def tiled_against_whole(
    net: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    tile: int = 256,
    overlap: int = 64,
    whole: torch.Tensor | None = None,
) -> dict[str, float]:
    """Tiled prediction's IoU, and how far its probabilities are from whole-slice prediction.

    ``whole``: the whole-slice :func:`mito_logits` in eval mode, when the caller has them.
    """
    if whole is None:
        with eval_mode(net):
            whole = mito_logits(net, images)
    tiled = tiled_mito_logits(net, images, tile, overlap)
    difference = (tiled.sigmoid() - whole.sigmoid()).abs()
    return {
        "tiled_iou": round(mask_iou(tiled > 0, masks), 4),
        "mean_abs_prob_diff": round(float(difference.mean()), 5),
        "max_abs_prob_diff": round(float(difference.max()), 4),
        "flipped_pixels": round(float(((tiled > 0) != (whole > 0)).float().mean()), 5),
    }


def threshold_sweep(logits: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """The probability threshold (0.1-0.9) with the best IoU, and that IoU."""
    best = (0.5, -1.0)
    for threshold in np.arange(0.1, 0.91, 0.1):
        iou = mask_iou(logits > float(np.log(threshold / (1 - threshold))), masks)
        best = max(best, (round(float(threshold), 1), iou), key=lambda t: t[1])
    return best


def _batch_norms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def diagnose(net: nn.Module, val: tuple, train: tuple) -> dict[str, float]:
    """The ``--diagnose`` columns for one network; ``net`` itself is left as it was."""
    with eval_mode(net):
        logits = mito_logits(net, val[0])
    threshold, threshold_iou = threshold_sweep(logits, val[1])
    row = {
        "train_iou": mito_iou(net, *train),
        "best_threshold": threshold,
        "best_threshold_iou": threshold_iou,
    }
    if _batch_norms(net):
        per_slice = copy.deepcopy(net).eval()
        for module in _batch_norms(per_slice):
            module.train()  # each forward normalises by its own slice's statistics
        row["batchstat_iou"] = mask_iou(mito_logits(per_slice, val[0]) > 0, val[1])
        recalibrated = copy.deepcopy(net).train()
        for module in _batch_norms(recalibrated):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the training slices
        mito_logits(recalibrated, train[0])
        row["recal_iou"] = mito_iou(recalibrated, *val)
    return {k: round(v, 4) for k, v in row.items()}
