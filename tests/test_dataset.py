from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from joenet.data.dataset import RandomPatchDataset, ShardSampler, TileDataset
from joenet.data.regions import Region
from joenet.volume import VolumeError, ZarrVolume


@pytest.fixture
def volume(volume_path: Path) -> ZarrVolume:
    return ZarrVolume(volume_path)


def test_volume_reads_normalised_image_and_masks(volume: ZarrVolume, volume_path: Path) -> None:
    import zarr

    group = zarr.open_group(str(volume_path), mode="r")
    image, target, valid = volume.read(3, 10, 20, 32)
    assert image.shape == (1, 32, 32) and image.dtype == np.float32
    np.testing.assert_allclose(image[0] * 255, group["raw"][3, 10:42, 20:52], atol=1e-4)
    np.testing.assert_array_equal(target[1], group["labels/mito"][3, 10:42, 20:52])
    assert valid.shape == (1, 32, 32) and valid.all()  # no labels/mask: every pixel counts
    assert volume.labelled == (True, True)
    image, target, valid = volume.read(3, 0, 0, (96, 64))  # a whole-height strip
    assert image.shape == (1, 96, 64) and target.shape == (2, 96, 64)


def test_ignore_mask_marks_unannotated_pixels(tmp_path: Path) -> None:
    import zarr

    group = zarr.open_group(str(tmp_path / "masked.zarr"), mode="w")
    group.create_array("raw", data=np.full((2, 32, 32), 100, dtype=np.uint8))
    group.create_array("labels/mito", data=np.ones((2, 32, 32), dtype=np.uint8))
    mask = np.zeros((2, 32, 32), dtype=np.uint8)
    mask[:, :16] = 1  # only the top half was annotated
    group.create_array("labels/mask", data=mask)
    volume = ZarrVolume(tmp_path / "masked.zarr")
    sample = TileDataset([Region(volume, 0, 2)], size=32)[1]
    assert sample["valid"][0, :16].eq(1).all() and sample["valid"][0, 16:].eq(0).all()
    assert volume.labelled == (False, True)  # the mask is not a class


def test_same_seed_gives_same_patches(volume: ZarrVolume) -> None:
    regions = [Region(volume, 0, 8)]
    first = RandomPatchDataset(regions, window=48, patches_per_epoch=10, seed=7)
    second = RandomPatchDataset(regions, window=48, patches_per_epoch=10, seed=7)
    other_seed = RandomPatchDataset(regions, window=48, patches_per_epoch=10, seed=8)
    for sample_id in (0, 5, 13):  # 13 = epoch 1, index 3
        a, b = first[sample_id], second[sample_id]
        assert torch.equal(a["position"], b["position"])
        assert torch.equal(a["image"], b["image"])
        assert a["seed"] == b["seed"]
    positions = {tuple(first[i]["position"].tolist()) for i in range(10)}
    assert len(positions) > 5  # positions really are random
    next_epoch = {tuple(first[10 + i]["position"].tolist()) for i in range(10)}
    assert positions != next_epoch
    assert any(not torch.equal(first[i]["position"], other_seed[i]["position"]) for i in range(10))


def test_training_windows_stay_in_their_slices(volume: ZarrVolume) -> None:
    dataset = RandomPatchDataset([Region(volume, 0, 8)], window=64, patches_per_epoch=200, seed=0)
    for sample_id in range(200):
        _, z, y, x = dataset[sample_id]["position"].tolist()
        assert 0 <= z < 8  # validation slices 8..11 never appear
        assert 0 <= y <= 96 - 64 and 0 <= x <= 96 - 64


def test_tiles_count_every_validation_pixel_once(volume: ZarrVolume) -> None:
    dataset = TileDataset([Region(volume, 8, 12)], size=40)  # 96 = 40 + 40 + a flush tile
    coverage = np.zeros((12, 96, 96))
    for index in range(len(dataset)):
        sample = dataset[index]
        _, z, y, x = sample["position"].tolist()
        coverage[z, y : y + 40, x : x + 40] += sample["valid"][0].numpy()
    assert (coverage[8:] == 1).all()
    assert (coverage[:8] == 0).all()
    assert len(dataset) == 4 * 3 * 3


def test_shard_sampler_splits_without_duplicates() -> None:
    shards = [ShardSampler(10, rank, 3) for rank in range(3)]
    ids = sorted(i for shard in shards for i in shard)
    assert ids == list(range(10))
    assert sum(len(s) for s in shards) == 10
    for shard in shards:
        shard.set_epoch(2)
    assert sorted(i for shard in shards for i in shard) == list(range(20, 30))
    fixed = ShardSampler(10, 0, 1, offset_by_epoch=False)
    fixed.set_epoch(5)
    assert list(fixed) == list(range(10))


def test_spawn_workers_read_the_same_samples(volume: ZarrVolume) -> None:
    dataset = RandomPatchDataset([Region(volume, 0, 8)], window=32, patches_per_epoch=4, seed=3)
    loader = DataLoader(
        dataset,
        batch_size=2,
        sampler=ShardSampler(4),
        num_workers=1,
        multiprocessing_context="spawn",
    )
    batches = list(loader)
    assert torch.equal(
        torch.cat([b["position"] for b in batches]),
        torch.stack([dataset[i]["position"] for i in range(4)]),
    )
    assert torch.equal(batches[0]["image"][1], dataset[1]["image"])


def test_missing_or_malformed_volume_errors(tmp_path: Path) -> None:
    import zarr

    with pytest.raises(VolumeError, match="no such file"):
        ZarrVolume(tmp_path / "missing.zarr")
    group = zarr.open_group(str(tmp_path / "noraw.zarr"), mode="w")
    group.create_array("image", shape=(2, 8, 8), dtype="uint8")
    with pytest.raises(VolumeError, match="no 'raw' array"):
        ZarrVolume(tmp_path / "noraw.zarr")
    group.create_array("raw", shape=(2, 8, 8), dtype="uint8")
    group.create_array("labels/mito", shape=(2, 8, 9), dtype="uint8")
    with pytest.raises(VolumeError, match=r"labels/mito: shape \(2, 8, 9\) differs"):
        ZarrVolume(tmp_path / "noraw.zarr")


def test_missing_label_class_is_marked_unlabelled(tmp_path: Path) -> None:
    import zarr

    group = zarr.open_group(str(tmp_path / "mito_only.zarr"), mode="w")
    group.create_array("raw", shape=(2, 16, 16), dtype="uint8")
    group.create_array("labels/mito", shape=(2, 16, 16), dtype="uint8")
    volume = ZarrVolume(tmp_path / "mito_only.zarr")
    assert volume.labelled == (False, True)
    sample = TileDataset([Region(volume, 0, 2)], size=16)[0]
    assert sample["labelled"].tolist() == [False, True]
