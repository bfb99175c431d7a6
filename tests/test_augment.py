"""Tests of the batched on-device augmentation (joenet.data.augment)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from joenet.data.augment import BatchAugment, _cubic_matrix, center_crop, window_size

PATCH = 32


def make_batch(aug: BatchAugment, num: int = 4, seed: int = 0, side: int | None = None) -> dict:
    """Windows with smooth random blobs as targets and an image that is a function of them."""
    side = side or aug.window
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num, 2, 6, 6, generator=gen)
    target = (F.interpolate(coarse, size=(side, side), mode="bilinear") > 0.5).float()
    return {
        "image": 0.2 + 0.6 * target[:, 1:2],  # (B, 1, W, W), intensity = f(mito mask)
        "target": target,  # (B, 2, W, W)
        "valid": torch.ones(num, 1, side, side),
        "seed": torch.arange(num, dtype=torch.int64) + 1000 * seed,
        "labelled": torch.tensor([[True, False]] * num),
        "name": [f"sample{i}" for i in range(num)],
    }


def geometry_only(**kwargs: object) -> BatchAugment:
    return BatchAugment(PATCH, brightness=0.0, contrast=0.0, **kwargs)


def test_window_size() -> None:
    assert window_size(256, rotate=False, elastic_alpha=0.0) == 256
    rotated = window_size(256, rotate=True, elastic_alpha=0.0)
    assert rotated % 2 == 0 and rotated >= 256 * math.sqrt(2) + 1
    assert rotated == 364
    assert window_size(256, rotate=True, elastic_alpha=8.0) == 380
    assert window_size(256, rotate=False, elastic_alpha=8.0) == 274
    assert window_size(32, rotate=True, elastic_alpha=8.0) == 64
    with pytest.raises(ValueError, match="even"):
        window_size(33, rotate=True, elastic_alpha=0.0)
    assert BatchAugment(256, rotate=True, elastic=False).window == 364
    assert BatchAugment(256, rotate=False, flip=True).window == 256


def test_separable_field_equals_bicubic_interpolation() -> None:
    control = torch.randn(3, 2, 5, 5)
    cubic = _cubic_matrix(5, 48)
    expected = F.interpolate(control, size=(48, 48), mode="bicubic", align_corners=True)
    torch.testing.assert_close(cubic @ control @ cubic.T, expected, atol=1e-5, rtol=0)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="contrast"):
        BatchAugment(PATCH, contrast=1.0)
    with pytest.raises(ValueError, match="elastic"):
        BatchAugment(PATCH, elastic=True, elastic_alpha=0.0)
    aug = BatchAugment(PATCH)
    with pytest.raises(ValueError, match="window"):
        aug(make_batch(aug, side=aug.window - 2))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"elastic": True, "noise": True, "gamma": 0.3},
        {"rotate": False, "flip": True},
        {"rotate": False, "flip": False},
    ],
)
def test_shapes_dtypes_binary_passthrough(kwargs: dict) -> None:
    aug = BatchAugment(PATCH, **kwargs)
    batch = make_batch(aug)
    before = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out = aug(batch)
    assert out is not batch
    assert out["image"].shape == (4, 1, PATCH, PATCH) and out["image"].dtype == torch.float32
    assert out["target"].shape == (4, 2, PATCH, PATCH) and out["target"].dtype == torch.float32
    assert out["valid"].shape == (4, 1, PATCH, PATCH) and out["valid"].dtype == torch.float32
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    for key in ("target", "valid"):
        assert set(out[key].unique().tolist()) <= {0.0, 1.0}
    assert out["valid"].all()
    for key in ("labelled", "name", "seed"):
        assert out[key] is batch[key]
    for key, value in before.items():  # the input batch is not modified
        assert torch.equal(batch[key], value)


def test_image_only_batch() -> None:
    aug = BatchAugment(PATCH, elastic=True)
    batch = make_batch(aug)
    out = aug({"image": batch["image"], "seed": batch["seed"]})
    assert set(out) == {"image", "seed"} and out["image"].shape == (4, 1, PATCH, PATCH)


def test_image_and_masks_stay_aligned() -> None:
    aug = geometry_only(elastic=True)
    batch = make_batch(aug, num=8)
    out = aug(batch)
    agree = ((out["image"] > 0.5) == out["target"][:, 1:2].bool()).float().mean()
    assert agree > 0.99
    # The augmentation really moved things: the centre crop alone no longer matches.
    crop = center_crop(batch["target"], PATCH)
    assert (crop != out["target"]).float().mean() > 0.05


def _sentinel_batch(aug: BatchAugment, num: int, ring: int = 2) -> dict:
    """Windows 2 * ring larger than needed: 0.7 inside ``aug.window``, sentinel 0 in the ring."""
    side = aug.window + 2 * ring
    inner = torch.zeros(num, 1, side, side)
    inner[..., ring:-ring, ring:-ring] = 1
    return {
        "image": 0.7 * inner,
        "target": inner.repeat(1, 2, 1, 1),
        "valid": inner.clone(),
        "seed": torch.arange(num, dtype=torch.int64),
    }


def _max_elastic_params(aug: BatchAugment, num: int, alpha: float) -> dict:
    params = aug.sample_params(torch.arange(num))
    # Constant and alternating-sign control grids push every point the maximum distance.
    signs = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]]).repeat(num, 1)[:num]
    params["elastic"] = signs[:, :, None, None].expand(-1, -1, 4, 4) * alpha
    params["angle"] = torch.linspace(0, 2 * math.pi, num + 1)[:num] + math.pi / 4
    return params


def test_no_empty_corners() -> None:
    aug = geometry_only(elastic=True, elastic_alpha=6.0)
    # Sampled parameters for many seeds, then worst cases: 45 degree corners, maximum field.
    batch = _sentinel_batch(aug, num=64)
    outs = [aug(batch), aug.apply(batch, _max_elastic_params(aug, 64, aug.elastic_alpha))]
    for out in outs:
        torch.testing.assert_close(out["image"], torch.full_like(out["image"], 0.7))
        assert out["target"].all() and out["valid"].all()
    # The check is sharp: 2 px more displacement than this window was sized for reach the ring.
    stronger = geometry_only(elastic=True, elastic_alpha=aug.elastic_alpha + 2)
    out = stronger.apply(batch, _max_elastic_params(stronger, 64, stronger.elastic_alpha))
    assert out["image"].min() < 0.7 - 1e-3


def test_no_empty_corners_rotation_only() -> None:
    aug = geometry_only()
    batch = _sentinel_batch(aug, num=32)
    params = aug.sample_params(batch["seed"])
    params["angle"] = torch.linspace(0, 2 * math.pi, 32)
    for out in (aug(batch), aug.apply(batch, params)):
        torch.testing.assert_close(out["image"], torch.full_like(out["image"], 0.7))


def test_reproducible_and_independent_of_batch() -> None:
    aug = BatchAugment(PATCH, elastic=True, noise=True, gamma=0.2)
    batch = make_batch(aug, num=6)
    first, second = aug(batch), aug(batch)
    for key in ("image", "target", "valid"):
        assert torch.equal(first[key], second[key])
    # Alone, or in another order, a sample is augmented the same way.
    for i in (0, 3, 5):
        alone = aug({k: v[i : i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)})
        for key in ("image", "target", "valid"):
            torch.testing.assert_close(alone[key][0], first[key][i], atol=1e-6, rtol=0)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    shuffled = aug({k: v[order] for k, v in batch.items() if isinstance(v, torch.Tensor)})
    for key in ("image", "target", "valid"):
        torch.testing.assert_close(shuffled[key], first[key][order], atol=1e-6, rtol=0)
    # Other seeds, other augmentation.
    other = aug({**batch, "seed": batch["seed"] + 100})
    assert not torch.equal(other["image"], first["image"])


def test_rotation_by_quarter_turn_matches_rot90() -> None:
    aug = geometry_only(flip=False)
    batch = make_batch(aug)
    batch["image"] = torch.rand_like(batch["image"])
    params = aug.sample_params(batch["seed"])
    params["angle"] = torch.full((4,), math.pi / 2)
    out = aug.apply(batch, params)
    for key in ("image", "target", "valid"):
        expected = torch.rot90(center_crop(batch[key], PATCH), k=1, dims=(-2, -1))
        torch.testing.assert_close(out[key], expected, atol=1e-4, rtol=0)


def test_flips_without_rotation_are_exact() -> None:
    aug = geometry_only(rotate=False)
    batch = make_batch(aug, num=8)
    batch["image"] = torch.rand_like(batch["image"])
    params = aug.sample_params(batch["seed"])
    out = aug.apply(batch, params)
    assert params["flip_h"].any() and not params["flip_h"].all()
    for i in range(8):
        expected = center_crop(batch["target"][i], PATCH)
        if params["flip_h"][i]:
            expected = expected.flip(-1)
        if params["flip_v"][i]:
            expected = expected.flip(-2)
        assert torch.equal(out["target"][i], expected)


def test_brightness_and_contrast_ranges() -> None:
    aug = BatchAugment(PATCH, rotate=False, flip=False, brightness=0.1, contrast=0.2)
    batch = make_batch(aug, num=16)
    # Values in [0.3, 0.7] never reach the clamp: mean and std show the exact transform.
    image = 0.3 + 0.4 * torch.rand_like(batch["image"])
    batch["image"] = image
    params = aug.sample_params(batch["seed"])
    out = aug.apply(batch, params)["image"]
    shift = out.mean(dim=(1, 2, 3)) - image.mean(dim=(1, 2, 3))
    scale = out.std(dim=(1, 2, 3)) / image.std(dim=(1, 2, 3))
    torch.testing.assert_close(shift, params["brightness"], atol=1e-5, rtol=0)
    torch.testing.assert_close(scale, params["contrast"], atol=1e-4, rtol=0)
    assert shift.abs().max() <= 0.1 + 1e-6 and (scale - 1).abs().max() <= 0.2 + 1e-5
    assert shift.std() > 0.01 and scale.std() > 0.02  # really random per sample


def test_output_is_clamped() -> None:
    aug = BatchAugment(PATCH, rotate=False, flip=False, brightness=0.5, contrast=0.9, gamma=0.5)
    batch = make_batch(aug, num=16)
    batch["image"] = torch.rand_like(batch["image"])
    out = aug(batch)["image"]
    assert out.min() == 0 and out.max() == 1


def test_gamma() -> None:
    aug = BatchAugment(PATCH, rotate=False, flip=False, brightness=0, contrast=0, gamma=0.5)
    batch = make_batch(aug, num=16)
    batch["image"] = torch.rand_like(batch["image"])
    params = aug.sample_params(batch["seed"])
    assert params["gamma"].min() >= 1 / 1.5 and params["gamma"].max() <= 1.5
    out = aug.apply(batch, params)["image"]
    expected = center_crop(batch["image"], PATCH) ** params["gamma"].view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_noise_std() -> None:
    aug = BatchAugment(64, rotate=False, flip=False, brightness=0, contrast=0, noise=True)
    batch = make_batch(aug, num=4)
    batch["image"] = torch.full_like(batch["image"], 0.5)
    out = aug(batch)["image"]
    assert abs((out - 0.5).std().item() - aug.noise_std) < 0.1 * aug.noise_std
    assert abs((out - 0.5).mean().item()) < 0.005


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    aug = BatchAugment(PATCH, elastic=True, noise=True, gamma=0.2)
    batch = make_batch(aug, num=8)
    batch["image"] = (batch["image"] + 0.1 * torch.rand_like(batch["image"])).clamp(0, 1)
    cpu = aug(batch)
    gpu = aug({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    torch.testing.assert_close(gpu["image"].cpu(), cpu["image"], atol=1e-4, rtol=0)
    for key in ("target", "valid"):  # thresholds may flip where a value sits at 0.5
        assert (gpu[key].cpu() == cpu[key]).float().mean() > 0.999


def _defect_batch(size: int = 64) -> dict:
    torch.manual_seed(0)
    image = torch.rand(1, 1, size, size) * 0.5 + 0.25
    target = (torch.rand(1, 2, size, size) > 0.5).float()
    return {"image": image, "target": target, "valid": torch.ones(1, 1, size, size)}


def test_em_defects_each_kind() -> None:
    from joenet.data.em_defects import apply_defects

    batch = _defect_batch()
    image, target, valid = batch["image"], batch["target"], batch["valid"]
    # kind: which * 3 -> 0 low contrast, 1 missing band, 2 misaligned band.
    low, t, v = apply_defects(image, target, valid, torch.tensor([[0.0, 0.1, 0.5, 0.0]]), 1.0)
    assert torch.equal(t, target) and torch.equal(v, valid)
    torch.testing.assert_close(low.std(), image.std() * 0.1, rtol=1e-3, atol=0)
    torch.testing.assert_close(low.mean(), image.mean())
    band, t, v = apply_defects(image, target, valid, torch.tensor([[0.0, 0.5, 0.5, 0.0]]), 1.0)
    blank = band[0, 0].eq(0).all(dim=1)  # rows filled with black
    assert blank.sum() == 64 // 16 and torch.equal(v[0, 0].eq(0).all(dim=1), blank)
    assert torch.equal(t, target) and torch.equal(band[0, 0][~blank], image[0, 0][~blank])
    moved, t, v = apply_defects(image, target, valid, torch.tensor([[0.0, 0.9, 0.5, 1.0]]), 1.0)
    top, shift = int(0.5 * 64 * 3 / 4), 64 // 16
    assert torch.equal(moved[..., :top, :], image[..., :top, :])
    assert torch.equal(moved[..., top:, shift:], image[..., top:, :-shift])
    assert torch.equal(t[..., top:, shift:], target[..., top:, :-shift])  # labels move along
    assert not v[..., top:, :shift].any() and v[..., top:, shift:].all() and v[..., :top, :].all()
    # Above the probability: no defect.
    same = apply_defects(image, target, valid, torch.tensor([[0.6, 0.5, 0.5, 0.5]]), 0.5)
    assert all(torch.equal(a, b) for a, b in zip(same, (image, target, valid), strict=True))


def test_em_defects_in_batch_augment_keep_other_draws() -> None:
    seeds = torch.arange(32)
    plain = BatchAugment(32, rotate=True, noise=True).sample_params(seeds)
    with_defects = BatchAugment(32, rotate=True, noise=True, defects=0.5).sample_params(seeds)
    for key, value in plain.items():
        assert torch.equal(value, with_defects[key]), key  # turning defects on changes no draw
    assert with_defects["defect"].shape == (32, 4)
    hits = (with_defects["defect"][:, 0] < 0.5).sum()
    assert 6 <= hits <= 26  # about half the patches
    augment = BatchAugment(32, rotate=False, flip=False, brightness=0, contrast=0, defects=1.0)
    batch = {
        "image": torch.rand(4, 1, 32, 32),
        "target": torch.ones(4, 2, 32, 32),
        "valid": torch.ones(4, 1, 32, 32),
        "seed": torch.arange(4),
    }
    out = augment(batch)
    assert out["image"].shape == (4, 1, 32, 32) and out["valid"].shape == (4, 1, 32, 32)
    assert not torch.equal(out["image"], batch["image"])  # every patch got a defect
    torch.testing.assert_close(augment(batch)["image"], out["image"])  # a function of the seeds
    with pytest.raises(ValueError, match="defects is a probability"):
        BatchAugment(32, defects=1.5)
