"""Training patches drawn as a pure function of (seed, epoch, index), and a fixed validation tiling.

Samples are dicts of tensors: ``image`` (1, S, S) float32, ``target`` (C, S, S) float32 0/1,
``valid`` (1, S, S) float32 (pixels that count), ``labelled`` (C,) bool, ``seed`` () int64 (the
sample's augmentation seed) and ``position`` (4,) int64 (region index, z, y, x of the top-left
corner). Training windows are larger than the patch so the on-device augmentation can rotate
without empty corners (see ``joenet.data.augment``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from joenet.data.regions import Region, rectangle_areas, start_rectangles
from joenet.volume import ZarrVolume

# A window whose intensities span less than this is unimaged (padding, resin, a blank frame).
_CONSTANT_RANGE = 1.0 / 255


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

    Everything random about a sample (region, position, augmentation seed) comes from
    ``np.random.default_rng((seed, epoch, index))``, so a run, its resume and every DDP rank or
    worker agree on what sample ``index`` of ``epoch`` is, whatever the batch size, worker count or
    start method.

    Args:
        regions: where to draw from, each region chosen in proportion to its number of slices.
        window: side of the square window read per sample.
        patches_per_epoch: samples per epoch (over all ranks).
        seed: the run's seed.
        foreground_fraction: share of windows centred on a foreground voxel of a class (picked
            uniformly among the classes with foreground), as nnU-Net's oversampling.
        foreground: per region, per class, (N, 3) zyx foreground voxels (``foreground_points``);
            needed when ``foreground_fraction > 0``.
        reject_constant: redraw windows whose intensities are constant (unimaged regions), up to
            ``max_attempts`` draws; the last draw is kept.
        max_attempts: draws per sample for ``reject_constant``.
    """

    def __init__(
        self,
        regions: Sequence[Region],
        window: int,
        patches_per_epoch: int,
        seed: int,
        foreground_fraction: float = 0.0,
        foreground: Sequence[Sequence[np.ndarray]] | None = None,
        reject_constant: bool = True,
        max_attempts: int = 20,
    ):
        self.regions = list(regions)
        self.window = window
        self.patches_per_epoch = patches_per_epoch
        self.seed = seed
        self.foreground_fraction = foreground_fraction
        self.reject_constant = reject_constant
        self.max_attempts = max_attempts
        slices = np.array([r.num_slices for r in self.regions], dtype=np.float64)
        self._region_probs = slices / slices.sum()
        self._rectangles = [start_rectangles(r, window) for r in self.regions]
        self._rectangle_probs = []
        for region, rectangles in zip(self.regions, self._rectangles, strict=True):
            if not rectangles:
                raise ValueError(f"{region.volume.path}: no {window} px window fits in {region}")
            areas = rectangle_areas(rectangles)
            self._rectangle_probs.append(areas / areas.sum())
        # Only classes that have foreground voxels can be oversampled.
        self._foreground = [
            [points for points in per_class if len(points)] for per_class in (foreground or [])
        ]
        if foreground_fraction > 0 and len(self._foreground) != len(self.regions):
            raise ValueError("foreground_fraction > 0 needs foreground points for every region")

    def __len__(self) -> int:
        return self.patches_per_epoch

    def _draw(self, rng: np.random.Generator, region_index: int) -> tuple[int, int, int]:
        region = self.regions[region_index]
        classes = self._foreground[region_index] if self.foreground_fraction > 0 else []
        if classes and rng.random() < self.foreground_fraction:
            points = classes[int(rng.integers(len(classes)))]
            z, cy, cx = (int(v) for v in points[int(rng.integers(len(points)))])
            bounds, half = region.bounds, self.window // 2
            y = min(max(cy - half, bounds.y_start), bounds.y_stop - self.window)
            x = min(max(cx - half, bounds.x_start), bounds.x_stop - self.window)
            if region.exclude is None or not region.exclude.overlaps(y, x, self.window):
                return z, y, x
        z = int(rng.integers(region.z_start, region.z_stop))
        probs = self._rectangle_probs[region_index]
        y_lo, y_hi, x_lo, x_hi = self._rectangles[region_index][rng.choice(len(probs), p=probs)]
        return z, int(rng.integers(y_lo, y_hi + 1)), int(rng.integers(x_lo, x_hi + 1))

    def __getitem__(self, sample_id: int) -> dict:
        epoch, index = divmod(int(sample_id), self.patches_per_epoch)
        rng = np.random.default_rng((self.seed, epoch, index))
        region_index = int(rng.choice(len(self.regions), p=self._region_probs))
        volume = self.regions[region_index].volume
        for _ in range(self.max_attempts if self.reject_constant else 1):
            z, y, x = self._draw(rng, region_index)
            sample = _sample(region_index, volume, z, y, x, self.window)
            image = sample["image"]
            if float(image.max() - image.min()) >= _CONSTANT_RANGE:
                break
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
    """Every slice of the regions (within their YX box) cut into a fixed grid of ``size`` tiles.

    Tiles flush with the far edge overlap their neighbour; the overlap is marked invalid in the
    later tile, so each pixel of the regions is counted exactly once in loss and metrics.
    """

    def __init__(self, regions: Sequence[Region], size: int):
        self.regions = list(regions)
        self.size = size
        self.tiles: list[tuple[int, int, int, int, int, int]] = []
        for region_index, region in enumerate(self.regions):
            b = region.bounds
            for z in range(region.z_start, region.z_stop):
                for y, skip_y in _tile_starts(b.y_stop - b.y_start, size):
                    for x, skip_x in _tile_starts(b.x_stop - b.x_start, size):
                        tile = (region_index, z, y + b.y_start, x + b.x_start, skip_y, skip_x)
                        self.tiles.append(tile)

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
        # Asked at each iteration: ids of this rank already trained in this epoch, so that a run
        # resumed from a mid-epoch checkpoint continues the epoch instead of repeating its start.
        self.already_seen: Callable[[], int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.size if self.offset_by_epoch else 0
        ids = range(offset + self.rank, offset + self.size, self.world_size)
        return iter(ids[self.already_seen() if self.already_seen else 0 :])

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
