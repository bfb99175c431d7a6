"""Spatial holdout, foreground-aware sampling, constant-patch rejection and several volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from joenet.data.datamodule import EMDataModule
from joenet.data.dataset import RandomPatchDataset
from joenet.data.regions import Box, Region, foreground_points, start_rectangles
from joenet.volume import VolumeError, ZarrVolume


def _datamodule(**kwargs) -> EMDataModule:
    defaults = dict(patch_size=32, batch_size=4, patches_per_epoch=64, num_workers=0)
    return EMDataModule(**{**defaults, **kwargs})


def test_start_rectangles_are_exactly_the_windows_beside_the_holdout(volume_path: Path) -> None:
    volume = ZarrVolume(volume_path)  # 96 x 96 slices
    holdout = Box(20, 50, 30, 70)
    window = 24
    region = Region(volume, 0, 8, exclude=holdout)
    allowed = set()
    for y0, y1, x0, x1 in start_rectangles(region, window):
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                assert (y, x) not in allowed  # the rectangles do not overlap
                allowed.add((y, x))
    expected = {
        (y, x)
        for y in range(96 - window + 1)
        for x in range(96 - window + 1)
        if not holdout.overlaps(y, x, window)
    }
    assert allowed == expected


def test_spatial_holdout_keeps_training_windows_out(volume_path: Path) -> None:
    dm = _datamodule(
        path=str(volume_path), train_z=(0, 12), val_z=None, holdout={"y": [0, 48], "x": [0, 48]}
    )
    dm.setup("fit")
    window = dm.augment.window
    for sample_id in range(200):
        _, _, y, x = dm.train_dataset[sample_id]["position"].tolist()
        assert not (y < 48 and x < 48), "a training window reads the holdout corner"
        assert y + window <= 96 and x + window <= 96
    # Validation tiles cover the holdout box of every slice, each pixel exactly once.
    coverage = np.zeros((12, 96, 96))
    for index in range(len(dm.val_dataset)):
        tile = dm.val_dataset[index]
        _, z, y, x = tile["position"].tolist()
        coverage[z, y : y + 32, x : x + 32] += tile["valid"][0].numpy()
    assert (coverage[:, :48, :48] == 1).all()
    assert coverage.sum() == 12 * 48 * 48


def test_holdout_errors(volume_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"holdout .* is smaller than data.patch_size"):
        _datamodule(
            path=str(volume_path), train_z=(0, 8), val_z=None, holdout={"y": [0, 16], "x": [0, 64]}
        ).setup("fit")
    with pytest.raises(VolumeError, match=r"no 4[0-9] px training window fits beside"):
        _datamodule(
            path=str(volume_path),
            train_z=(0, 8),
            val_z=None,
            holdout={"y": [30, 66], "x": [30, 66]},
        ).setup("fit")
    with pytest.raises(VolumeError, match="must be \\{y: \\[start, stop\\]"):
        _datamodule(
            path=str(volume_path), train_z=(0, 8), val_z=None, holdout={"y": [0, 40]}
        ).setup("fit")


def _centre_foreground_rate(dm: EMDataModule, channel: int, count: int = 150) -> float:
    half = dm.augment.window // 2
    hits = [dm.train_dataset[i]["target"][channel, half, half].item() for i in range(count)]
    return float(np.mean(hits))


def test_foreground_sampling_centres_windows_on_objects(volume_path: Path) -> None:
    base = dict(path=str(volume_path), train_z=(0, 8), val_z=(8, 12))
    uniform = _datamodule(**base)
    uniform.setup("fit")
    oversampled = _datamodule(**base, foreground_fraction=1.0)
    oversampled.setup("fit")
    mito_rate = _centre_foreground_rate(uniform, 1)
    assert mito_rate < 0.3  # mito is a few percent of the volume
    # Every window is centred on a foreground voxel of nuclei or mito.
    half = oversampled.augment.window // 2
    for i in range(100):
        target = oversampled.train_dataset[i]["target"]
        assert target[:, half, half].max() == 1 or _clipped(oversampled, i)


def _clipped(dm: EMDataModule, sample_id: int) -> bool:
    """Windows centred near the slice border are shifted inwards: their centre may miss."""
    _, _, y, x = dm.train_dataset[sample_id]["position"].tolist()
    last = 96 - dm.augment.window
    return y in (0, last) or x in (0, last)


def test_foreground_points_respect_the_mask_of_annotated_pixels(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "v.zarr"), mode="w")
    group.create_array("raw", data=np.random.default_rng(0).integers(0, 255, (2, 32, 32), np.uint8))
    mito = np.zeros((2, 32, 32), np.uint8)
    mito[:, 4:8, 4:8] = 1
    mito[:, 20:24, 20:24] = 1
    mask = np.ones_like(mito)
    mask[:, 16:] = 0
    group.create_array("labels/mito", data=mito)
    group.create_array("labels/mask", data=mask)
    points = foreground_points(
        Region(ZarrVolume(tmp_path / "v.zarr"), 0, 2), 1, 1000, np.random.default_rng(0)
    )
    assert len(points) == 2 * 16
    assert set(points[:, 1]) == {4, 5, 6, 7}


def test_constant_windows_are_redrawn(tmp_path: Path) -> None:
    raw = np.zeros((4, 64, 64), np.uint8)  # unimaged except one textured quarter
    raw[:, :32, :32] = np.random.default_rng(0).integers(0, 255, (4, 32, 32), np.uint8)
    group = zarr.open_group(str(tmp_path / "v.zarr"), mode="w")
    group.create_array("raw", data=raw)
    group.create_array("labels/mito", data=np.zeros_like(raw))
    region = Region(ZarrVolume(tmp_path / "v.zarr"), 0, 4)

    def constant_share(reject: bool) -> float:
        dataset = RandomPatchDataset([region], 24, 100, seed=0, reject_constant=reject)
        images = [dataset[i]["image"] for i in range(100)]
        return float(np.mean([float(im.max() - im.min()) == 0 for im in images]))

    assert constant_share(reject=False) > 0.2
    assert constant_share(reject=True) == 0.0


def test_several_volumes(volume_path: Path, tmp_path: Path) -> None:
    source = zarr.open_group(str(volume_path), mode="r")
    second = zarr.open_group(str(tmp_path / "second.zarr"), mode="w")
    second.create_array("raw", data=source["raw"][:6])
    second.create_array("labels/mito", data=source["labels/mito"][:6])
    dm = _datamodule(
        volumes=[
            {"path": str(volume_path)},
            {"path": str(tmp_path / "second.zarr"), "train_z": [0, 6], "val_z": None},
        ],
        train_z=(0, 8),
        val_z=(8, 12),
    )
    dm.setup("fit")
    regions = {int(dm.train_dataset[i]["position"][0]) for i in range(60)}
    assert regions == {0, 1}
    labelled = {tuple(dm.train_dataset[i]["labelled"].tolist()) for i in range(60)}
    assert labelled == {(True, True), (False, True)}  # the second volume has no nuclei labels
    assert len(dm.val_dataset) == 4 * 3 * 3  # only the first volume validates
    with pytest.raises(VolumeError, match=r"data.volumes\[1\].train_z"):
        _datamodule(
            volumes=[
                {"path": str(volume_path)},
                {"path": str(tmp_path / "second.zarr"), "train_z": [0, 9]},
            ],
            train_z=(0, 8),
            val_z=(8, 12),
        ).setup("fit")
    with pytest.raises(ValueError, match=r"either data\.path"):
        _datamodule(path=str(volume_path), volumes=[{"path": str(volume_path)}])
