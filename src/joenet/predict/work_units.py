"""Blocks of the output volume: the unit of work, of resuming and of distribution.

A block is one output chunk along z (several for ``planes`` beyond ``xy``, which need depth) by a
set of output chunks in y and x, so every block writes whole chunks only (zarr v3 writes a chunk
as one file: a partial write would be a read-modify-write, racy between workers). Each block is
read with the halo its tiles need, reflected at the volume border, predicted plane by plane and
written as uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import zarr

from joenet.predict.input_image import InputImage
from joenet.predict.tiling import STEP, AxisTiles, PlanePredictor, plan_axis

Range = tuple[int, int]
# plane -> (axis across the planes, first in-plane axis, second in-plane axis), as (z, y, x) = 0..2
PLANE_AXES = {"xy": (0, 1, 2), "xz": (1, 0, 2), "yz": (2, 0, 1)}


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs to predict a block: plain values, cheap to send to Dask."""

    ckpt_path: str
    input_path: str
    output_path: str
    class_names: tuple[str, ...]
    tile: int
    overlap: int
    margin: int
    blending: str
    batch_size: int | None
    precision: str
    tta: bool
    planes: tuple[str, ...]
    threshold: float | None
    device: str
    z_range: Range
    normalization: tuple[tuple[str, object], ...]  # the checkpoint's, as sorted items (hashable)
    fold_batchnorms: bool = True  # BatchNorms after convs folded into them (model/fold.py)
    channels_last: bool = True  # the network in channels_last memory format (fast_path.py)
    compile: bool = False  # compiled with freezing, resolved from "auto" by the client
    compile_cache: str | None = None  # compiled_cache.py's directory; None: torch.compile
    grid: int = STEP  # tile origins are multiples of this: tiling.tile_step of the network
    precision_by_auto: bool = False  # precision resolved from "auto" where the run started


@dataclass(frozen=True)
class Block:
    """A chunk-aligned box of the output: ``region`` is [start, stop) per (z, y, x) axis."""

    index: tuple[int, int, int]  # position in the grid of blocks
    region: tuple[Range, Range, Range]


@dataclass(frozen=True)
class PlaneInput:
    """Planes read for one orientation of a block, with their tile layouts."""

    plane: str
    images: np.ndarray  # (S, A, B) float32
    tiles_a: AxisTiles
    tiles_b: AxisTiles
    region: tuple[Range, Range, Range]  # the block region, clipped to z_range


def make_blocks(
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    planes: tuple[str, ...],
    block_size: int,
    tile: int,
    z_range: Range,
) -> tuple[list[Block], tuple[int, int, int]]:
    """Blocks that intersect ``z_range``, in z, y, x order, and the shape of the grid of blocks.

    Args:
        shape: (z, y, x) of the volume.
        chunks: (z, y, x) output chunks.
        planes: orientations predicted; beyond ``xy`` blocks get about ``tile`` px of depth.
        block_size: y/x side of a block in px, rounded up to whole chunks (fewer halos than
            small blocks, memory that does not grow with the volume).
        tile: tile side in px.
        z_range: [start, stop) slices to predict.
    """
    side = block_size if planes == ("xy",) else tile  # orthogonal planes: cube-shaped blocks
    depth = chunks[0] if planes == ("xy",) else side
    per_block = [
        max(1, math.ceil(extent / chunk))
        for extent, chunk in zip((depth, side, side), chunks, strict=True)
    ]
    steps = [n * chunk for n, chunk in zip(per_block, chunks, strict=True)]
    blocks = []
    for iz, z0 in enumerate(range(0, shape[0], steps[0])):
        z1 = min(z0 + steps[0], shape[0])
        if z1 <= z_range[0] or z0 >= z_range[1]:
            continue
        for iy, y0 in enumerate(range(0, shape[1], steps[1])):
            for ix, x0 in enumerate(range(0, shape[2], steps[2])):
                region = (
                    (z0, z1),
                    (y0, min(y0 + steps[1], shape[1])),
                    (x0, min(x0 + steps[2], shape[2])),
                )
                blocks.append(Block((iz, iy, ix), region))
    grid = tuple(math.ceil(size / step) for size, step in zip(shape, steps, strict=True))
    return blocks, grid  # type: ignore[return-value]


def read_block(job: BlockJob, image: InputImage, block: Block) -> list[PlaneInput]:
    """Read a block's planes with their halos, once per orientation."""
    (z0, z1), y_range, x_range = block.region
    region = ((max(z0, job.z_range[0]), min(z1, job.z_range[1])), y_range, x_range)
    inputs = []
    for plane in job.planes:
        across, a, b = PLANE_AXES[plane]
        tiles = [
            plan_axis(*region[axis], image.shape[axis], job.tile, job.overlap, job.margin, job.grid)
            for axis in (a, b)
        ]
        window: list[Range] = [region[0], region[1], region[2]]
        window[a] = (tiles[0].start, tiles[0].stop)
        window[b] = (tiles[1].start, tiles[1].stop)
        planes = image.read(tuple(window), dict(job.normalization))  # (z, y, x)
        planes = np.ascontiguousarray(np.moveaxis(planes, (across, a, b), (0, 1, 2)))
        inputs.append(PlaneInput(plane, planes, tiles[0], tiles[1], region))
    return inputs


def count_tiles(job: BlockJob, shape: tuple[int, ...], blocks: list[Block]) -> int:
    """Forward passes of one tile that predicting ``blocks`` takes (TTA's 8 views included)."""
    total = 0
    for block in blocks:
        (z0, z1), y_range, x_range = block.region
        region = ((max(z0, job.z_range[0]), min(z1, job.z_range[1])), y_range, x_range)
        for plane in job.planes:
            across, a, b = PLANE_AXES[plane]
            per_plane = 1
            for axis in (a, b):
                tiles = plan_axis(
                    *region[axis], shape[axis], job.tile, job.overlap, job.margin, job.grid
                )
                per_plane *= len(tiles.origins)
            total += per_plane * max(0, region[across][1] - region[across][0])
    return total * (8 if job.tta else 1)


def compute_block(job: BlockJob, predictor: PlanePredictor, inputs: list[PlaneInput]) -> np.ndarray:
    """Predict a block: ``(C, z, y, x)`` uint8 over the whole block (0 outside ``z_range``)."""
    region = inputs[0].region
    shape = tuple(stop - start for start, stop in region)
    probs = np.zeros((len(job.class_names), *shape), dtype=np.float32)
    for item in inputs:
        across, a, b = PLANE_AXES[item.plane]
        planes = predictor.predict(item.images, item.tiles_a, item.tiles_b, region[a], region[b])
        planes = np.moveaxis(planes, 1, 0)  # (C, S, A, B)
        probs += np.moveaxis(planes, (1, 2, 3), (1 + across, 1 + a, 1 + b))
    probs /= len(inputs)  # orthogonal planes are averaged in probability
    if job.threshold is not None:
        values = (probs >= job.threshold).astype(np.uint8)
    else:
        values = np.rint(np.clip(probs, 0.0, 1.0) * 255).astype(np.uint8)
    return values


def is_whole(job: BlockJob, block: Block) -> bool:
    """Whether ``z_range`` covers the block, so that finishing it finishes the block."""
    (z0, z1), _, _ = block.region
    return job.z_range[0] <= z0 and z1 <= job.z_range[1]


def write_block(group: zarr.Group, job: BlockJob, block: Block, values: np.ndarray) -> None:
    """Write a block's whole chunks, one array per class.

    Slices of the block outside ``z_range`` (chunks deeper than one slice) keep what they hold:
    no other block shares these chunks, so reading them back first is safe.
    """
    (z0, z1), (y0, y1), (x0, x1) = block.region
    inner = slice(max(z0, job.z_range[0]) - z0, min(z1, job.z_range[1]) - z0)
    box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    for channel, name in enumerate(job.class_names):
        if is_whole(job, block):
            out = values[channel]
        else:
            out = np.asarray(group[name][box])
            out[inner] = values[channel]
        group[name][box] = out
