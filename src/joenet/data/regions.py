"""Where training and validation read: Z-split regions, a spatial holdout, crops, fg points."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from joenet.volume import VolumeError, ZarrVolume, check_z_range


@dataclass(frozen=True)
class Box:
    """A half-open YX rectangle ``[y_start, y_stop) x [x_start, x_stop)``."""

    y_start: int
    y_stop: int
    x_start: int
    x_stop: int

    def overlaps(self, y: int, x: int, size: int) -> bool:
        """Whether the ``size`` x ``size`` window with top-left corner (y, x) touches the box."""
        return (
            y < self.y_stop
            and y + size > self.y_start
            and x < self.x_stop
            and x + size > self.x_start
        )


@dataclass(frozen=True)
class Region:
    """Slices ``[z_start, z_stop)`` of a volume, within a YX box, optionally minus a holdout box.

    ``box`` None means whole slices. Training windows never touch ``exclude`` (the spatial
    holdout); validation tiles cover ``box``.
    """

    volume: ZarrVolume
    z_start: int
    z_stop: int
    box: Box | None = None
    exclude: Box | None = None

    @property
    def num_slices(self) -> int:
        return self.z_stop - self.z_start

    @property
    def bounds(self) -> Box:
        _, height, width = self.volume.shape
        return self.box or Box(0, height, 0, width)


def start_rectangles(region: Region, window: int) -> list[tuple[int, int, int, int]]:
    """Inclusive ranges ``(y_lo, y_hi, x_lo, x_hi)`` of window corners allowed in ``region``.

    The corners of windows inside the bounds form one rectangle; a holdout removes the corners of
    windows that would touch it, leaving at most four rectangles. Drawing from these exactly
    (rather than rejecting) guarantees that no training window ever reads the holdout.
    """
    b = region.bounds
    y_lo, y_hi, x_lo, x_hi = b.y_start, b.y_stop - window, b.x_start, b.x_stop - window
    if y_hi < y_lo or x_hi < x_lo:
        return []
    if region.exclude is None:
        return [(y_lo, y_hi, x_lo, x_hi)]
    e = region.exclude
    # Corners whose window touches the holdout: y in [e.y_start - window + 1, e.y_stop - 1].
    fy_lo, fy_hi = max(y_lo, e.y_start - window + 1), min(y_hi, e.y_stop - 1)
    fx_lo, fx_hi = max(x_lo, e.x_start - window + 1), min(x_hi, e.x_stop - 1)
    if fy_lo > fy_hi or fx_lo > fx_hi:
        return [(y_lo, y_hi, x_lo, x_hi)]
    pieces = [
        (y_lo, fy_lo - 1, x_lo, x_hi),  # above the forbidden corners
        (fy_hi + 1, y_hi, x_lo, x_hi),  # below
        (fy_lo, fy_hi, x_lo, fx_lo - 1),  # left, beside them
        (fy_lo, fy_hi, fx_hi + 1, x_hi),  # right
    ]
    return [p for p in pieces if p[0] <= p[1] and p[2] <= p[3]]


def rectangle_areas(rectangles: list[tuple[int, int, int, int]]) -> np.ndarray:
    return np.array([(r[1] - r[0] + 1) * (r[3] - r[2] + 1) for r in rectangles], dtype=np.float64)


def _foreground_by_slice(region: Region, channel: int) -> Iterator[tuple[int, np.ndarray]]:
    """Per slice of ``region``: z and the (y, x) mask of annotated class-``channel`` voxels."""
    b = region.bounds
    for z in range(region.z_start, region.z_stop):
        _, target, valid = region.volume.read(
            z, b.y_start, b.x_start, (b.y_stop - b.y_start, b.x_stop - b.x_start)
        )
        yield z, target[channel] & valid[0]


def foreground_points(
    region: Region, channel: int, max_per_slice: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``max_per_slice`` random foreground voxels of class ``channel`` per slice, (N, 3) zyx.

    Read once at set-up, slice by slice, as nnU-Net precomputes class locations: afterwards a
    foreground-centred window costs no more than a random one.
    """
    b = region.bounds
    points = []
    for z, mask in _foreground_by_slice(region, channel):
        ys, xs = np.nonzero(mask)
        if len(ys) > max_per_slice:
            keep = rng.choice(len(ys), max_per_slice, replace=False)
            ys, xs = ys[keep], xs[keep]
        points.append(np.stack([np.full_like(ys, z), ys + b.y_start, xs + b.x_start], axis=1))
    return np.concatenate(points).astype(np.int64) if points else np.zeros((0, 3), np.int64)


def has_foreground(region: Region, channel: int) -> bool:
    """Whether class ``channel`` has an annotated foreground voxel in ``region``.

    Reads slice by slice and stops at the first hit: one slice for ordinary labels, the whole
    region only when it is empty (and then the warning is worth the read).
    """
    return any(mask.any() for _, mask in _foreground_by_slice(region, channel))


def _z_range(volume: ZarrVolume, z_range: Sequence[int], key: str) -> tuple[int, int]:
    return check_z_range(z_range, volume.shape[0], volume.path, key)


def _holdout_box(volume: ZarrVolume, holdout: Mapping, key: str, patch_size: int) -> Box:
    _, height, width = volume.shape
    try:
        box = Box(
            int(holdout["y"][0]), int(holdout["y"][1]), int(holdout["x"][0]), int(holdout["x"][1])
        )
    except (KeyError, IndexError, TypeError):
        raise VolumeError(
            f"{volume.path}: {key}.holdout must be {{y: [start, stop], x: [start, stop]}}, "
            f"got {holdout}"
        ) from None
    if not (0 <= box.y_start < box.y_stop <= height and 0 <= box.x_start < box.x_stop <= width):
        raise VolumeError(f"{volume.path}: {key}.holdout {holdout} is outside {height}x{width}")
    if min(box.y_stop - box.y_start, box.x_stop - box.x_start) < patch_size:
        raise VolumeError(
            f"{volume.path}: {key}.holdout {holdout} is smaller than data.patch_size={patch_size}"
        )
    return box


def volume_regions(
    volume: ZarrVolume, spec: Mapping[str, Any], key: str, window: int, patch_size: int
) -> tuple[Region, Region | None]:
    """The training region and the validation region (or None) of one volume's spec."""
    _, height, width = volume.shape
    if window > min(height, width):
        raise VolumeError(
            f"{volume.path}: slices are {height}x{width} px but training reads {window}x{window} "
            f"windows (data.patch_size={patch_size} plus room for rotation/elastic): lower "
            "data.patch_size or disable data.augment.rotate"
        )
    train_z = _z_range(volume, spec["train_z"], f"{key}.train_z")
    val_z = None if spec.get("val_z") is None else _z_range(volume, spec["val_z"], f"{key}.val_z")
    if spec.get("holdout") is None:
        if val_z is None:
            return Region(volume, *train_z), None
        if train_z[0] < val_z[1] and val_z[0] < train_z[1]:
            raise VolumeError(
                f"{volume.path}: {key}.train_z {list(train_z)} and {key}.val_z {list(val_z)} "
                "overlap; validation slices must be held out (or use a spatial holdout)"
            )
        return Region(volume, *train_z), Region(volume, *val_z)
    box = _holdout_box(volume, spec["holdout"], key, patch_size)
    train = Region(volume, *train_z, exclude=box)
    if not start_rectangles(train, window):
        raise VolumeError(
            f"{volume.path}: no {window} px training window fits beside {key}.holdout "
            f"{spec['holdout']}"
        )
    return train, Region(volume, *(val_z or train_z), box=box)


def _around(start: int, stop: int, size: int, limit: int) -> tuple[int, int]:
    """``[start, stop)`` widened symmetrically to at least ``size``, kept inside ``[0, limit)``."""
    grow = max(0, size - (stop - start))
    start = max(0, min(start - grow // 2, limit - max(size, stop - start)))
    return start, min(limit, start + max(size, stop - start))


def crop_regions(
    volume: ZarrVolume, spec: Mapping[str, Any], key: str, window: int, patch_size: int
) -> tuple[list[Region], list[Region]]:
    """Regions around the annotated crops of a volume (CellMap style), split by the Z ranges.

    Only crops carry labels, so windows are drawn around them (widened to the window size, so
    a window always overlaps its crop) instead of over whole slices that are mostly unannotated.
    """
    _, height, width = volume.shape
    train_z = _z_range(volume, spec["train_z"], f"{key}.train_z")
    val_z = None if spec.get("val_z") is None else _z_range(volume, spec["val_z"], f"{key}.val_z")
    split: dict[str, tuple[list[Region], tuple[int, int] | None, int]] = {
        "train": ([], train_z, window),
        "val": ([], val_z, patch_size),
    }
    for z0, z1, y0, y1, x0, x1 in volume.annotated_boxes():
        for regions, z_range, size in split.values():
            if z_range is None or max(z0, z_range[0]) >= min(z1, z_range[1]):
                continue
            box = Box(*_around(y0, y1, size, height), *_around(x0, x1, size, width))
            regions.append(Region(volume, max(z0, z_range[0]), min(z1, z_range[1]), box=box))
    if not split["train"][0]:
        raise VolumeError(f"{volume.path}: no annotated crop intersects {key}.train_z {train_z}")
    return split["train"][0], split["val"][0]
