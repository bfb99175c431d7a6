"""What ``predict_volume`` checks before writing: options, overlap, voxel size, input range."""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from joenet.predict.input_image import InputImage
from joenet.predict.tiling import STEP, check_tiling
from joenet.predict.work_units import PLANE_AXES, Block
from joenet.volume import VolumeError, fit_normalization

log = logging.getLogger("joenet.predict.pipeline")  # the log lines users know
_VOXEL_TOLERANCE = 0.10
_FLOAT_FIX = (
    "the checkpoint reads float input as intensities in [0, 1] (dtype_range, as its training "
    "data): rescale the input to [0, 1] as that data was, or store it as uint8 / uint16"
)


def parse_planes(planes: str | Sequence[str]) -> tuple[str, ...]:
    """``"xy"``, ``"xy,xz,yz"`` or a list of plane names, as a tuple in that order."""
    names = planes.split(",") if isinstance(planes, str) else list(planes)
    names = [name.strip() for name in names]
    unknown = [name for name in names if name not in PLANE_AXES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"planes must name distinct planes out of {list(PLANE_AXES)}, got {planes!r}: "
            "use xy, or [xy,xz,yz] to average over the three orientations"
        )
    return tuple(names)


def check_options(
    tile: int, overlap: int, executor: str, threshold: float | None, block_size: int
) -> None:
    check_tiling(tile, overlap)
    if executor not in ("local", "dask"):
        raise ValueError(f"executor must be 'local' or 'dask', got {executor!r}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] or null, got {threshold}")
    if block_size < tile:
        raise ValueError(f"block_size ({block_size}) must be at least tile ({tile})")


def check_overlap(
    overlap: int, receptive_field: int, step: int = STEP, per_sample_norm: bool = False
) -> None:
    """Warn when tiles see too little context; say what the overlap buys.

    ``per_sample_norm``: the network normalises each input by its own statistics (InstanceNorm,
    GroupNorm), so each tile is normalised alone and no overlap makes tiles exactly whole slices.
    """
    if per_sample_norm:
        log.info(
            "the model normalises per sample (InstanceNorm/GroupNorm): each tile is normalised by "
            "its own statistics, so tiled and whole-slice predictions differ slightly whatever "
            "the overlap (docs/benchmarks.md, tiling_seams)"
        )
    if overlap < receptive_field // 2:
        warnings.warn(
            f"overlap={overlap} px is less than half the model's receptive field "
            f"({receptive_field} px): tiles use pixels with little context and seams may show; "
            f"use overlap >= {_round_up(_round_up(receptive_field, 2) // 2, step)}",
            stacklevel=3,
        )
    elif overlap < receptive_field and not per_sample_norm:
        log.info(
            "overlap=%d px: tiles keep %d px of context at their seams; overlap >= %d px makes "
            "tiled and whole-slice predictions equal",
            overlap,
            overlap // 2,
            _round_up(receptive_field, step),
        )


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def input_normalization(image: InputImage, normalization: Mapping[str, Any]) -> dict:
    """The checkpoint's normalisation, fitted to this input's actual intensity range.

    ``dtype_range`` means "the data's bit range maps to [0, 1]": it is resolved anew for the
    input (12-bit data in uint16 / 4095, whatever depth the training data had); ``fixed`` (and
    resolved percentiles) is applied as trained, with a warning when the input does not fit it.
    """
    try:  # one voxel: does the training normalisation apply to this dtype?
        image.read(((0, 1), (0, 1), (0, 1)), normalization)
    except ValueError as err:
        raise VolumeError(f"{image.where}: {err}") from None
    asked = {key: value for key, value in normalization.items() if key != "bit_depth"}
    return fit_normalization(image.sample(), asked, image.where, _FLOAT_FIX)


def check_voxel_size(
    input_voxel: Sequence[float] | None, train_voxel: Sequence[float] | None, input_path: str
) -> None:
    if not input_voxel or not train_voxel:
        log.info("voxel size of the input or of the training data unknown: not compared")
        return
    ratios = [abs(a - b) / b for a, b in zip(input_voxel, train_voxel, strict=True)]
    if max(ratios) > _VOXEL_TOLERANCE:
        message = (
            f"{input_path}: voxel size {list(input_voxel)} nm differs from the training data's "
            f"{list(train_voxel)} nm by more than {_VOXEL_TOLERANCE:.0%}; the model sees objects "
            "at another scale than it learned, resample the input for reliable predictions"
        )
        log.warning(message)
        warnings.warn(message, stacklevel=3)


def check_free_space(output: str, pending: Sequence[Block], arrays: Mapping[str, str]) -> None:
    """Refuse before predicting when the output's disk cannot hold what is left to write.

    The bound is the uncompressed size (zstd usually writes less, masks and instance ids far
    less), so a run that passes never fills the disk; ``check_free_space=false`` skips it.
    """
    if "://" in output or not pending:
        return
    voxels = sum(
        (z1 - z0) * (y1 - y0) * (x1 - x0)
        for (z0, z1), (y0, y1), (x0, x1) in (block.region for block in pending)
    )
    per_voxel = sum(np.dtype(dtype).itemsize for dtype in arrays.values())
    needed, free = voxels * per_voxel, shutil.disk_usage(output).free
    if free < needed:
        raise ValueError(
            f"output {output}: {_gb(free)} free on its disk, but the {len(pending)} blocks left "
            f"to write take up to {_gb(needed)} uncompressed ({voxels:,} voxels x {per_voxel} "
            f"bytes: {', '.join(f'{n} {d}' for n, d in arrays.items())}); free space or choose "
            "another disk, or pass check_free_space=false if it will compress to fit"
        )


def _gb(size: int) -> str:
    return f"{size / 1e9:.3g} GB"
