"""LightningDataModule: Z-split regions of a zarr volume, random patches, fixed val tiles."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from joenet.data.augment import BatchAugment
from joenet.data.dataset import RandomPatchDataset, ShardSampler, TileDataset
from joenet.data.regions import crop_regions, foreground_points, has_foreground, volume_regions
from joenet.synthetic import ensure_synthetic_volume
from joenet.volume import VolumeError, ZarrVolume

log = logging.getLogger(__name__)

_PARAMS_KEY = "augment_params"
# Foreground voxels remembered per slice and class for centring windows: enough to reach every
# object of a slice, few enough to hold for thousands of slices (48 kB per slice and class).
_FOREGROUND_POINTS_PER_SLICE = 2000
# Patch sides are multiples of this: the default 5-level network's divisor (UNet2d checks its
# own, 32 for 6 levels) and prediction's smallest tile step (joenet.predict.tiling.STEP).
PATCH_MULTIPLE = 16


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
    """Patches of EM volumes in the zarr layout ``raw`` + ``labels/{nuclei,mito}``.

    Training draws ``patches_per_epoch`` random windows per epoch (split over DDP ranks) from the
    slices ``[train_z[0], train_z[1])``; validation tiles every slice of ``[val_z[0], val_z[1])``,
    or, with a spatial ``holdout``, the holdout's YX box (which training windows never touch).
    Workers only read; augmentation runs on the whole batch on its device, after the transfer
    (``on_after_batch_transfer``), so a GPU does the resampling when there is one.

    Args:
        path: the zarr group (one volume); or use ``volumes``.
        train_z: half-open slice range for training (the seed's default).
        val_z: half-open slice range for validation (None: the training slices, with a holdout).
        holdout: ``{"y": [start, stop], "x": [start, stop]}``, a YX box held out for validation.
        volumes: several volumes, each a mapping with ``path`` and optionally ``train_z``,
            ``val_z`` (None: no validation from it), ``holdout`` and ``volume`` (options of its
            own); missing keys take the values above. Regions are drawn in proportion to their
            number of slices.
        class_names: output channels, in order.
        patch_size: side of the square patches the model sees (a multiple of 16).
        batch_size: per device.
        patches_per_epoch: training samples per epoch over all devices.
        num_workers: DataLoader worker processes (0 reads in the main process).
        seed: run seed; sample positions and augmentation derive from (seed, epoch, index).
        augment: keyword arguments of ``BatchAugment`` (empty: its defaults).
        foreground_fraction: share of training windows centred on a labelled object.
        reject_constant: redraw training windows of constant intensity (unimaged regions).
        synthetic: when given, ``path`` is the cache of the built-in synthetic volume and these
            are the keyword arguments of ``ensure_synthetic_volume`` (shape, seed).
        cache_bytes: volumes up to this size are held in memory (see ``ZarrVolume``).
        volume: further keyword arguments of ``ZarrVolume`` for every volume (``raw_key``,
            ``scale_level``, ``voxel_size_nm``, ``normalization``, ``label_keys``, ...).
        multiprocessing_context: worker start method (``spawn`` as on macOS); None: the
            platform's default.
    """

    def __init__(
        self,
        path: str | None = None,
        train_z: Sequence[int] = (800, 880),
        val_z: Sequence[int] | None = (880, 900),
        holdout: Mapping[str, Sequence[int]] | None = None,
        volumes: Sequence[Mapping[str, Any]] | None = None,
        class_names: Sequence[str] = ("nuclei", "mito"),
        patch_size: int = 256,
        batch_size: int = 16,
        patches_per_epoch: int = 1000,
        num_workers: int = 2,
        seed: int = 0,
        augment: Mapping[str, Any] | None = None,
        foreground_fraction: float = 0.0,
        reject_constant: bool = True,
        synthetic: Mapping[str, Any] | None = None,
        cache_bytes: int = 2**30,
        volume: Mapping[str, Any] | None = None,
        multiprocessing_context: str | None = None,
    ):
        super().__init__()
        if patch_size % PATCH_MULTIPLE:
            raise ValueError(
                f"data.patch_size must be a multiple of {PATCH_MULTIPLE}, got {patch_size}"
            )
        if not 0 <= foreground_fraction <= 1:
            raise ValueError(
                f"data.foreground_fraction must be in [0, 1], got {foreground_fraction}"
            )
        if (path is None) == (volumes is None):
            raise ValueError("give either data.path (one volume) or data.volumes (a list)")
        defaults = {"train_z": train_z, "val_z": val_z, "holdout": holdout}
        specs = [{"path": path}] if volumes is None else [dict(v) for v in volumes]
        self.volume_specs = [{**defaults, **spec} for spec in specs]
        self._keys = (
            ["data"] if volumes is None else [f"data.volumes[{i}]" for i in range(len(specs))]
        )
        self.path = str(self.volume_specs[0]["path"])
        self.class_names = list(class_names)
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.patches_per_epoch = patches_per_epoch
        self.num_workers = num_workers
        self.seed = seed
        self.foreground_fraction = foreground_fraction
        self.reject_constant = reject_constant
        self.synthetic = dict(synthetic) if synthetic else None
        self.cache_bytes = cache_bytes
        self.volume_options = dict(volume or {})
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
        train_regions, val_regions = [], []
        for spec, key in zip(self.volume_specs, self._keys, strict=True):
            options = {**self.volume_options, **dict(spec.get("volume") or {})}
            volume = ZarrVolume(
                str(spec["path"]), self.class_names, cache_bytes=self.cache_bytes, **options
            )
            if volume.has_crops:
                crops = crop_regions(volume, spec, key, self.augment.window, self.patch_size)
                train_regions += crops[0]
                val_regions += crops[1]
                continue
            train, val = volume_regions(volume, spec, key, self.augment.window, self.patch_size)
            for region in (train, val):
                if region is not None:
                    volume.check_label_values(region.z_start, region.z_stop)
            train_regions.append(train)
            if val is not None:
                val_regions.append(val)
        if not val_regions:
            raise VolumeError(f"{self.path}: no validation data: set data.val_z or data.holdout")
        _check_some_labels(train_regions, self.class_names)
        foreground = None
        if self.foreground_fraction > 0:
            rng = np.random.default_rng((self.seed, 2**31))  # a stream no sample uses
            foreground = [
                [
                    foreground_points(r, c, _FOREGROUND_POINTS_PER_SLICE, rng)
                    if r.volume.labelled[c]
                    else np.zeros((0, 3))
                    for c in range(len(self.class_names))
                ]
                for r in train_regions
            ]
        _warn_empty_classes(train_regions, foreground, self.class_names)
        self.train_dataset = RandomPatchDataset(
            train_regions,
            self.augment.window,
            self.patches_per_epoch,
            self.seed,
            foreground_fraction=self.foreground_fraction,
            foreground=foreground,
            reject_constant=self.reject_constant,
        )
        self.val_dataset = TileDataset(val_regions, self.patch_size)

    def state_dict(self) -> dict[str, Any]:
        """What prediction needs to treat new data like the training data; saved in checkpoints.

        Lightning stores it under ``checkpoint["EMDataModule"]``.
        """
        volume = self.train_dataset.regions[0].volume if self.train_dataset else None
        return {
            "class_names": list(self.class_names),
            "patch_size": self.patch_size,
            "voxel_size_nm": volume.voxel_size_nm if volume else None,
            # The first training volume's; prediction normalises new data the same way.
            "normalization": volume.normalization if volume else None,
        }

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
        sampler.already_seen = self._seen_this_epoch
        return self._loader(self.train_dataset, sampler, _CollateWithAugmentParams(self.augment))

    def _seen_this_epoch(self) -> int:
        """Patches of this rank already trained in the epoch that starts iterating: nonzero only
        when resuming from a mid-epoch checkpoint (Lightning's loops are restored by then)."""
        # No trainer (the data module used on its own) or not Lightning's: nothing to resume.
        loop = getattr(self.trainer, "fit_loop", None)
        if loop is None or not loop.restarting:
            return 0
        return int(loop.epoch_loop.batch_progress.current.completed) * self.batch_size

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


def _check_some_labels(regions: Sequence[Any], class_names: Sequence[str]) -> None:
    """Refuse before training when no training volume has labels for any class.

    Otherwise every loss term is masked out: the run trains an epoch on nothing and then fails
    on the missing validation metric.
    """
    if any(any(region.volume.labelled) for region in regions):
        return
    paths = sorted({region.volume.path for region in regions})
    raise VolumeError(
        f"{', '.join(paths)}: no labels for any class {list(class_names)} (expected "
        f"labels/<class> arrays, 0/1 masks of raw's shape, e.g. labels/{class_names[-1]}); "
        "write them with `python -m joenet.convert`, or map other names with "
        "+data.volume.label_keys={<class>: <array name>}"
    )


def _warn_empty_classes(
    regions: Sequence[Any],
    foreground: list[list[np.ndarray]] | None,
    class_names: Sequence[str],
) -> None:
    """Say before training when a labelled class has no foreground voxel in the training data:
    the model would learn to predict nothing for it (an empty export, a wrong label key).

    ``foreground`` holds the points already sampled for foreground-centred windows; without
    them (``foreground_fraction=0``) the labels are read until the first foreground voxel.
    """
    for channel, name in enumerate(class_names):
        labelled = [r for r in regions if r.volume.labelled[channel]]
        if foreground is not None:
            empty = all(len(points[channel]) == 0 for points in foreground)
        else:
            empty = not any(has_foreground(r, channel) for r in labelled)
        if labelled and empty:
            where = ", ".join(f"{r.volume.path} z [{r.z_start}, {r.z_stop})" for r in labelled)
            log.warning(
                "labels/%s are all zero in the training data (%s): the model learns to predict "
                "no %s; check the labels or the label key (+data.volume.label_keys)",
                name,
                where,
                name,
            )
