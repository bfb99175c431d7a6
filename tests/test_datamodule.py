from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from joenet.data.datamodule import EMDataModule
from joenet.volume import VolumeError


def _datamodule(volume_path: Path, **kwargs) -> EMDataModule:
    defaults = dict(
        train_z=(0, 8),
        val_z=(8, 12),
        patch_size=32,
        batch_size=4,
        patches_per_epoch=8,
        num_workers=0,
    )
    return EMDataModule(str(volume_path), **{**defaults, **kwargs})


def test_loaders_give_windows_for_training_and_patches_for_validation(volume_path: Path) -> None:
    dm = _datamodule(volume_path)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    window = dm.augment.window
    assert window > 32
    assert train["image"].shape == (4, 1, window, window)
    assert train["target"].shape == (4, 2, window, window)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 1, 32, 32)
    assert len(dm.val_dataset) == 4 * 3 * 3


def test_augmentation_only_while_training(volume_path: Path) -> None:
    dm = _datamodule(volume_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    dm.trainer = SimpleNamespace(training=True)  # what Lightning's fit loop reports
    augmented = dm.on_after_batch_transfer(batch, 0)
    assert augmented["image"].shape == (4, 1, 32, 32)
    assert augmented["target"].shape == (4, 2, 32, 32)
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer(val, 0) is val


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(train_z=(0, 10), val_z=(8, 12)), "overlap"),
        (dict(val_z=(8, 13)), r"data.val_z=\[8, 13\] must be \[start, stop\)"),
        (dict(train_z=(5, 5)), "data.train_z"),
        (dict(patch_size=96), "lower data.patch_size"),
    ],
)
def test_bad_ranges_and_sizes_are_clear_errors(volume_path: Path, kwargs, message) -> None:
    with pytest.raises(VolumeError, match=message) as info:
        _datamodule(volume_path, **kwargs).setup("fit")
    assert str(volume_path) in str(info.value)


def test_patch_size_must_be_a_multiple_of_16(volume_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        _datamodule(volume_path, patch_size=40)


def test_ranks_draw_different_patches(volume_path: Path) -> None:
    positions = []
    for rank in range(2):
        dm = _datamodule(volume_path)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, training=True)
        dm.setup("fit")
        loader = dm.train_dataloader()
        positions.append(torch.cat([b["position"] for b in loader]))
    assert len(positions[0]) == len(positions[1]) == 4
    assert not torch.equal(positions[0], positions[1])


def test_parameters_drawn_in_workers_match_drawing_on_device(volume_path: Path) -> None:
    dm = _datamodule(volume_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "augment_params" in batch  # drawn by the collate function, in the workers
    dm.trainer = SimpleNamespace(training=True)
    from_workers = dm.on_after_batch_transfer(dict(batch), 0)
    batch.pop("augment_params")
    on_device = dm.augment(batch)
    for key in ("image", "target", "valid"):
        assert torch.equal(from_workers[key], on_device[key])
    assert "augment_params" not in from_workers
