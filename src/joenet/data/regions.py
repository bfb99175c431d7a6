"""Where training windows may start: region bounds, a spatial holdout, foreground points."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from joenet.volume import ZarrVolume


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


def foreground_points(
    region: Region, channel: int, max_per_slice: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``max_per_slice`` random foreground voxels of class ``channel`` per slice, (N, 3) zyx.

    Read once at set-up, slice by slice, as nnU-Net precomputes class locations: afterwards a
    foreground-centred window costs no more than a random one.
    """
    b = region.bounds
    points = []
    for z in range(region.z_start, region.z_stop):
        _, target, valid = region.volume.read(
            z, b.y_start, b.x_start, (b.y_stop - b.y_start, b.x_stop - b.x_start)
        )
        ys, xs = np.nonzero(target[channel] & valid[0])
        if len(ys) > max_per_slice:
            keep = rng.choice(len(ys), max_per_slice, replace=False)
            ys, xs = ys[keep], xs[keep]
        points.append(np.stack([np.full_like(ys, z), ys + b.y_start, xs + b.x_start], axis=1))
    return np.concatenate(points).astype(np.int64) if points else np.zeros((0, 3), np.int64)
