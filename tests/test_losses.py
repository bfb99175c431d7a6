from __future__ import annotations

import math

import pytest
import torch

from joenet.losses import BCEDiceLoss


def _masks(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 2, 16, 16, generator=generator) > 0.6).float()


def test_perfect_prediction_is_near_zero() -> None:
    target = _masks()
    logits = (target * 2 - 1) * 20  # confident and right
    assert BCEDiceLoss()(logits, target).item() < 1e-6


def test_inverted_prediction_is_high() -> None:
    target = _masks()
    logits = (1 - 2 * target) * 20  # confident and wrong
    loss = BCEDiceLoss()(logits, target).item()
    assert loss > 10  # BCE ~ 20 per pixel, Dice loss ~ 1


def test_equals_hand_computation() -> None:
    logits = torch.tensor([[[[0.0, 2.0]], [[-1.0, 1.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])
    expected = []
    for channel in range(2):
        z = logits[0, channel, 0].tolist()
        t = target[0, channel, 0].tolist()
        p = [1 / (1 + math.exp(-v)) for v in z]
        bce = (
            sum(
                -(ti * math.log(pi) + (1 - ti) * math.log(1 - pi))
                for pi, ti in zip(p, t, strict=True)
            )
            / 2
        )
        dice = (2 * sum(pi * ti for pi, ti in zip(p, t, strict=True)) + 1) / (sum(p) + sum(t) + 1)
        expected.append(bce + 1 - dice)
    loss = BCEDiceLoss(smooth=1.0)(logits, target)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_unlabelled_channel_is_ignored() -> None:
    target = _masks()
    logits = (target * 2 - 1) * 20
    logits[:, 0] = torch.randn_like(logits[:, 0]) * 5  # channel 0 is garbage...
    labelled = torch.tensor([[False, True], [False, True]])  # ...but not labelled
    loss_fn = BCEDiceLoss()
    assert loss_fn(logits, target, labelled).item() < 1e-6
    # Only channel 1 counts: equal to the loss of channel 1 alone.
    alone = loss_fn(logits[:, 1:], target[:, 1:])
    assert loss_fn(logits, target, labelled).item() == pytest.approx(alone.item(), abs=1e-7)


def test_invalid_pixels_are_ignored() -> None:
    target = _masks()
    logits = (target * 2 - 1) * 20
    valid = torch.ones(2, 1, 16, 16)
    valid[:, :, :8] = 0
    logits[:, :, :8] = -logits[:, :, :8]  # wrong, but only where invalid
    assert BCEDiceLoss()(logits, target, valid=valid).item() < 1e-6
    assert BCEDiceLoss()(logits, target).item() > 1


def test_empty_masks_predicted_empty_score_zero_loss() -> None:
    target = torch.zeros(2, 2, 8, 8)
    logits = torch.full_like(target, -20.0)
    assert BCEDiceLoss()(logits, target).item() < 1e-6


def test_nothing_labelled_gives_zero_with_gradient() -> None:
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    loss = BCEDiceLoss()(logits, _masks()[:, :, :8, :8], torch.zeros(2, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_computed_in_fp32_under_autocast() -> None:
    target = _masks()
    logits = torch.randn(2, 2, 16, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = BCEDiceLoss()(logits, target)
    assert loss.dtype == torch.float32
    reference = BCEDiceLoss()(logits.float(), target)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
