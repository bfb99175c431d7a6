"""Training patches drawn as a pure function of (seed, epoch, index), and a fixed validation tiling.

Samples are dicts of tensors: ``image`` (1, S, S) float32, ``target`` (C, S, S) float32 0/1,
``valid`` (1, S, S) float32 (pixels that count), ``labelled`` (C,) bool, ``seed`` () int64 (the
sample's augmentation seed) and ``position`` (4,) int64 (volume index, z, y, x of the top-left
corner). Training windows are larger than the patch so the on-device augmentation can rotate
without empty corners (see ``joenet.data.augment``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from joenet.data.volume import ZarrVolume


@dataclass(frozen=True)
class Region:
    """The half-open slice range ``[z_start, z_stop)`` of one volume."""

    volume: ZarrVolume
    z_start: int
    z_stop: int

    @property
    def num_slices(self) -> int:
        return self.z_stop - self.z_start


def _sample(volume_index: int, volume: ZarrVolume, z: int, y: int, x: int, size: int) -> dict:
    image, target, valid = volume.read(z, y, x, size)
    return {
        "image": torch.from_numpy(image),
        "target": torch.from_numpy(target).float(),
        "valid": torch.from_numpy(valid).float(),
        "labelled": torch.tensor(volume.labelled, dtype=torch.bool),
        "position": torch.tensor([volume_index, z, y, x], dtype=torch.int64),
    }


class RandomPatchDataset(Dataset):
    """Random training windows; sample ``epoch * patches_per_epoch + index`` is reproducible.

    Position and augmentation seed come from ``np.random.default_rng((seed, epoch, index))``, so
    a run, its resume and every DDP rank or worker agree on what sample ``index`` of ``epoch`` is,
    whatever the batch size, worker count or start method.

    Args:
        regions: slice ranges to draw from, each chosen in proportion to its number of slices.
        window: side of the square window read per sample.
        patches_per_epoch: samples per epoch (over all ranks).
        seed: the run's seed.
    """

    def __init__(self, regions: Sequence[Region], window: int, patches_per_epoch: int, seed: int):
        self.regions = list(regions)
        self.window = window
        self.patches_per_epoch = patches_per_epoch
        self.seed = seed
        slices = np.array([r.num_slices for r in self.regions], dtype=np.float64)
        self._region_probs = slices / slices.sum()

    def __len__(self) -> int:
        return self.patches_per_epoch

    def __getitem__(self, sample_id: int) -> dict:
        epoch, index = divmod(int(sample_id), self.patches_per_epoch)
        rng = np.random.default_rng((self.seed, epoch, index))
        region_index = int(rng.choice(len(self.regions), p=self._region_probs))
        region = self.regions[region_index]
        _, height, width = region.volume.shape
        z = int(rng.integers(region.z_start, region.z_stop))
        y = int(rng.integers(0, height - self.window + 1))
        x = int(rng.integers(0, width - self.window + 1))
        sample = _sample(region_index, region.volume, z, y, x, self.window)
        sample["seed"] = torch.tensor(int(rng.integers(2**62)), dtype=torch.int64)
        return sample


def _tile_starts(length: int, tile: int) -> list[tuple[int, int]]:
    """Tile starts covering ``[0, length)`` and, per tile, the first row it alone contributes."""
    starts = list(range(0, length - tile + 1, tile))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # a last tile flush with the edge overlaps its neighbour
    return [
        (s, max(0, (previous + tile) - s))
        for s, previous in zip(starts, [-tile, *starts[:-1]], strict=True)
    ]


class TileDataset(Dataset):
    """Every slice of the regions cut into a fixed grid of ``size`` tiles (deterministic).

    Tiles flush with the far edge overlap their neighbour; the overlap is marked invalid in the
    later tile, so each pixel of the regions is counted exactly once in loss and metrics.
    """

    def __init__(self, regions: Sequence[Region], size: int):
        self.regions = list(regions)
        self.size = size
        self.tiles: list[tuple[int, int, int, int, int, int]] = []
        for region_index, region in enumerate(self.regions):
            _, height, width = region.volume.shape
            for z in range(region.z_start, region.z_stop):
                for y, skip_y in _tile_starts(height, size):
                    for x, skip_x in _tile_starts(width, size):
                        self.tiles.append((region_index, z, y, x, skip_y, skip_x))

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict:
        region_index, z, y, x, skip_y, skip_x = self.tiles[index]
        sample = _sample(region_index, self.regions[region_index].volume, z, y, x, self.size)
        sample["valid"][:, :skip_y] = 0
        sample["valid"][:, :, :skip_x] = 0
        sample["seed"] = torch.tensor(0, dtype=torch.int64)
        return sample


class ShardSampler(Sampler[int]):
    """This rank's share of an epoch's ids: ``epoch * size + i``, ``i = rank, rank + world, ...``.

    Unlike ``DistributedSampler`` it never pads with duplicates, so validation counts every tile
    exactly once over all ranks. ``set_epoch`` (called by Lightning each epoch) moves training to
    the next epoch's ids; validation samplers keep ``offset_by_epoch=False``.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, offset_by_epoch: bool = True):
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.offset_by_epoch = offset_by_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.size if self.offset_by_epoch else 0
        return iter(range(offset + self.rank, offset + self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
