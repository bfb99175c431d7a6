"""LightningDataModule: Z-split regions of a zarr volume, random patches, fixed val tiles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, default_collate

from joenet.data.augment import BatchAugment
from joenet.data.dataset import RandomPatchDataset, Region, ShardSampler, TileDataset
from joenet.data.synthetic import ensure_synthetic_volume
from joenet.data.volume import VolumeError, ZarrVolume

_PARAMS_KEY = "augment_params"


class _CollateWithAugmentParams:
    """Collate, then draw the batch's augmentation parameters from the samples' seeds.

    Drawing in the workers keeps that CPU work out of the training process and means the device
    never has to send seeds back to the host (a synchronisation) before augmenting.
    """

    def __init__(self, augment: BatchAugment):
        self.augment = augment

    def __call__(self, samples: list[dict]) -> dict:
        batch = default_collate(samples)
        batch[_PARAMS_KEY] = self.augment.sample_params(batch["seed"])
        return batch


class EMDataModule(L.LightningDataModule):
    """Patches of an EM volume in the zarr layout ``raw`` + ``labels/{nuclei,mito}``.

    Training draws ``patches_per_epoch`` random windows per epoch (split over DDP ranks) from the
    slices ``[train_z[0], train_z[1])``; validation tiles every slice of ``[val_z[0], val_z[1])``.
    Workers only read; augmentation runs on the whole batch on its device, after the transfer
    (``on_after_batch_transfer``), so a GPU does the resampling when there is one.

    Args:
        path: the zarr group.
        train_z: half-open slice range for training (the seed's default).
        val_z: half-open slice range for validation.
        class_names: output channels, in order.
        patch_size: side of the square patches the model sees (a multiple of 16).
        batch_size: per device.
        patches_per_epoch: training samples per epoch over all devices.
        num_workers: DataLoader worker processes (0 reads in the main process).
        seed: run seed; sample positions and augmentation derive from (seed, epoch, index).
        augment: keyword arguments of ``BatchAugment`` (empty: its defaults).
        synthetic: when given, ``path`` is the cache of the built-in synthetic volume and these
            are the keyword arguments of ``ensure_synthetic_volume`` (shape, seed).
        cache_bytes: volumes up to this size are held in memory (see ``ZarrVolume``).
        multiprocessing_context: worker start method (``spawn`` as on macOS); None: the
            platform's default.
    """

    def __init__(
        self,
        path: str,
        train_z: Sequence[int] = (800, 880),
        val_z: Sequence[int] = (880, 900),
        class_names: Sequence[str] = ("nuclei", "mito"),
        patch_size: int = 256,
        batch_size: int = 16,
        patches_per_epoch: int = 1000,
        num_workers: int = 2,
        seed: int = 0,
        augment: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        cache_bytes: int = 2**30,
        multiprocessing_context: str | None = None,
    ):
        super().__init__()
        if patch_size % 16:
            raise ValueError(f"data.patch_size must be a multiple of 16, got {patch_size}")
        self.path = str(path)
        self.train_z = tuple(train_z)
        self.val_z = tuple(val_z)
        self.class_names = list(class_names)
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.patches_per_epoch = patches_per_epoch
        self.num_workers = num_workers
        self.seed = seed
        self.synthetic = dict(synthetic) if synthetic else None
        self.cache_bytes = cache_bytes
        self.multiprocessing_context = multiprocessing_context
        self.augment = BatchAugment(patch_size=patch_size, **dict(augment or {}))
        self.train_dataset: RandomPatchDataset | None = None
        self.val_dataset: TileDataset | None = None

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_synthetic_volume(Path(self.path), **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        volume = ZarrVolume(self.path, self.class_names, cache_bytes=self.cache_bytes)
        train = self._region(volume, self.train_z, "data.train_z")
        val = self._region(volume, self.val_z, "data.val_z")
        if train.z_start < val.z_stop and val.z_start < train.z_stop:
            raise VolumeError(
                f"{self.path}: data.train_z {list(self.train_z)} and data.val_z "
                f"{list(self.val_z)} overlap; validation slices must be held out"
            )
        window = self.augment.window
        _, height, width = volume.shape
        if window > min(height, width):
            raise VolumeError(
                f"{self.path}: slices are {height}x{width} px but training reads "
                f"{window}x{window} windows (data.patch_size={self.patch_size} plus room for "
                "rotation/elastic): lower data.patch_size or disable data.augment.rotate"
            )
        self.train_dataset = RandomPatchDataset([train], window, self.patches_per_epoch, self.seed)
        self.val_dataset = TileDataset([val], self.patch_size)

    def state_dict(self) -> dict[str, Any]:
        """What prediction needs to treat new data like the training data; saved in checkpoints.

        Lightning stores it under ``checkpoint["EMDataModule"]``.
        """
        volume = self.train_dataset.regions[0].volume if self.train_dataset else None
        return {
            "class_names": list(self.class_names),
            "patch_size": self.patch_size,
            "voxel_size_nm": volume.voxel_size_nm if volume else None,
            "normalization": {"kind": "dtype_range"},  # uint8 / 255, uint16 / 65535, float clip
        }

    def _region(self, volume: ZarrVolume, z_range: tuple, key: str) -> Region:
        depth = volume.shape[0]
        if len(z_range) != 2 or not 0 <= z_range[0] < z_range[1] <= depth:
            raise VolumeError(
                f"{self.path}: {key}={list(z_range)} must be [start, stop) with "
                f"0 <= start < stop <= {depth} (the volume has {depth} slices)"
            )
        return Region(volume, int(z_range[0]), int(z_range[1]))

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def _loader(self, dataset: Any, sampler: ShardSampler, collate_fn: Any = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=self.multiprocessing_context if self.num_workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        sampler = ShardSampler(self.patches_per_epoch, rank, world)
        return self._loader(self.train_dataset, sampler, _CollateWithAugmentParams(self.augment))

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        sampler = ShardSampler(len(self.val_dataset), rank, world, offset_by_epoch=False)
        return self._loader(self.val_dataset, sampler)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        params = batch.pop(_PARAMS_KEY, None)
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch
        if params is None:  # a batch from another loader: draw the parameters here
            return self.augment(batch)
        return self.augment.apply(batch, params)
