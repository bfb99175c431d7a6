from __future__ import annotations

import pytest
import torch

from joenet.metrics import SegmentationMetrics


def _counts(probs: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int, int]:
    pred = probs > 0.5
    truth = target.bool()
    return (
        int((pred & truth).sum()),
        int((pred & ~truth).sum()),
        int((~pred & ~truth).sum()),
        int((~pred & truth).sum()),
    )


def test_matches_hand_counted_confusion() -> None:
    # Channel 0: tp=2, fp=1, tn=3, fn=2 over 8 pixels.
    probs0 = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.4, 0.45])
    truth0 = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1])
    # Channel 1: tp=1, fp=0, tn=6, fn=1.
    probs1 = torch.tensor([0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    truth1 = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])
    probs = torch.stack([probs0, probs1]).reshape(1, 2, 2, 4)
    target = torch.stack([truth0, truth1]).reshape(1, 2, 2, 4)
    metric = SegmentationMetrics(["nuclei", "mito"])
    metric.update(probs, target)
    out = {k: v.item() for k, v in metric.compute().items()}
    assert out["iou_nuclei"] == pytest.approx(2 / 5)
    assert out["dice_nuclei"] == pytest.approx(4 / 7)
    assert out["precision_nuclei"] == pytest.approx(2 / 3)
    assert out["recall_nuclei"] == pytest.approx(2 / 4)
    assert out["accuracy_nuclei"] == pytest.approx(5 / 8)
    assert out["iou_mito"] == pytest.approx(1 / 2)
    assert out["dice_mito"] == pytest.approx(2 / 3)
    assert out["precision_mito"] == pytest.approx(1.0)
    assert out["recall_mito"] == pytest.approx(1 / 2)
    assert out["accuracy_mito"] == pytest.approx(7 / 8)
    assert out["dice"] == pytest.approx((4 / 7 + 2 / 3) / 2)
    assert out["iou"] == pytest.approx((2 / 5 + 1 / 2) / 2)


def test_accumulates_global_counts_not_batch_means() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for size in (1, 3):  # unequal batches: a mean of batch scores would differ
        probs = torch.rand(size, 2, 8, 8, generator=generator)
        target = (torch.rand(size, 2, 8, 8, generator=generator) > 0.7).long()
        batches.append((probs, target))
    metric = SegmentationMetrics(["nuclei", "mito"])
    for probs, target in batches:
        metric.update(probs, target)
    out = metric.compute()
    probs = torch.cat([b[0] for b in batches])
    target = torch.cat([b[1] for b in batches])
    for channel, name in enumerate(["nuclei", "mito"]):
        tp, fp, _, fn = _counts(probs[:, channel], target[:, channel])
        assert out[f"iou_{name}"].item() == pytest.approx(tp / (tp + fp + fn))
        assert out[f"dice_{name}"].item() == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_unlabelled_class_is_not_reported() -> None:
    probs = torch.rand(2, 2, 8, 8)
    target = (torch.rand(2, 2, 8, 8) > 0.5).long()
    labelled = torch.tensor([[False, True], [False, True]])
    metric = SegmentationMetrics(["nuclei", "mito"])
    metric.update(probs, target, labelled)
    out = metric.compute()
    assert not any("nuclei" in key for key in out)
    assert "dice_mito" in out
    assert out["dice"].item() == pytest.approx(out["dice_mito"].item())
    assert all(torch.isfinite(v) for v in out.values())


def test_invalid_pixels_are_not_counted() -> None:
    probs = torch.zeros(1, 2, 4, 4)
    target = torch.ones(1, 2, 4, 4, dtype=torch.long)
    probs[..., :2, :] = 1.0
    valid = torch.zeros(1, 1, 4, 4)
    valid[..., :2, :] = 1
    metric = SegmentationMetrics(["nuclei", "mito"])
    metric.update(probs, target, valid=valid)
    out = metric.compute()
    assert out["iou_mito"].item() == 1.0
    assert out["accuracy_nuclei"].item() == 1.0


def test_absent_class_predicted_absent_is_perfect() -> None:
    metric = SegmentationMetrics(["nuclei", "mito"])
    metric.update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4, dtype=torch.long))
    out = metric.compute()
    assert out["dice_nuclei"].item() == 1.0
    assert out["iou_mito"].item() == 1.0
    assert out["precision_mito"].item() == 1.0


def test_reset_clears_counts() -> None:
    metric = SegmentationMetrics(["nuclei", "mito"])
    metric.update(torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 4, 4, dtype=torch.long))
    metric.reset()
    metric.update(torch.ones(1, 2, 4, 4), torch.ones(1, 2, 4, 4, dtype=torch.long))
    assert metric.compute()["dice"].item() == 1.0
