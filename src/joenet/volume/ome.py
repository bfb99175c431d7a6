"""OME-Zarr multiscale metadata (NGFF 0.4 on zarr v2, 0.5 on zarr v3) and physical placement.

Only what reading EM training data needs: the axes (ending in z, y, x), each level's voxel size
and translation (in nanometres when the axes say their unit) and nearest-voxel mapping between
two images of one physical space, e.g. a raw scale level and a small label crop. Written here
rather than taken from ``ome-zarr``, which pulls in dask and scikit-image for a few dict reads.

Positions follow NGFF: voxel ``i`` of a level has its centre at ``i * scale + translation``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

# UDUNITS names the spec allows, plus the abbreviations files use in practice.
UNITS_NM = {
    "angstrom": 0.1,
    "nanometer": 1.0,
    "nm": 1.0,
    "micrometer": 1e3,
    "micron": 1e3,
    "um": 1e3,
    "µm": 1e3,
    "millimeter": 1e6,
    "picometer": 1e-3,
}
SPATIAL_AXES = ("z", "y", "x")
_EPS = 1e-6  # absorbs float noise in translations such as 4.0000001 nm


class MetadataError(ValueError):
    """OME-Zarr metadata that cannot be used; the message names the group and the key."""


@dataclass(frozen=True)
class ScaleLevel:
    """One array of a multiscale image: its path in the group and its (z, y, x) placement.

    ``scale`` and ``translation`` are in nanometres when ``Multiscale.in_nm``, else in the
    file's own (unknown) unit.
    """

    path: str
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]


@dataclass(frozen=True)
class Multiscale:
    """The first ``multiscales`` entry of a group: axis names and levels, finest first."""

    axes: tuple[str, ...]
    in_nm: bool
    levels: tuple[ScaleLevel, ...]

    def level(self, path: str) -> ScaleLevel | None:
        return next((level for level in self.levels if level.path == path), None)


@dataclass(frozen=True)
class ImageRef:
    """A (z, y, x) array resolved from a key: its path, leading size-1 axes and placement."""

    path: str
    leading: int
    level: ScaleLevel | None
    in_nm: bool = False


def read_multiscale(attrs: Mapping[str, Any], where: str) -> Multiscale | None:
    """Parse ``attrs["ome"]["multiscales"]`` (0.5) or ``attrs["multiscales"]`` (0.4).

    Returns:
        None when the attributes hold no multiscale metadata (a plain zarr group).
    """
    ome = attrs.get("ome")
    entries = (ome or {}).get("multiscales") if isinstance(ome, Mapping) else None
    entries = entries or attrs.get("multiscales")
    if not entries:
        return None
    meta = entries[0]
    axes = [a if isinstance(a, str) else a.get("name") for a in meta.get("axes", [])]
    if tuple(axes[-3:]) != SPATIAL_AXES:
        raise MetadataError(
            f"{where}: multiscales axes {axes} must end in z, y, x (2D images are not supported)"
        )
    units = [None if isinstance(a, str) else a.get("unit") for a in meta.get("axes", [])][-3:]
    unknown = [u for u in units if u is not None and u not in UNITS_NM]
    if unknown:
        raise MetadataError(f"{where}: unit {unknown[0]!r} not supported ({sorted(UNITS_NM)})")
    in_nm = all(u is not None for u in units)
    to_nm = np.array([UNITS_NM[u] if in_nm else 1.0 for u in units])  # type: ignore[index]
    outer_scale, outer_shift = _transforms(meta.get("coordinateTransformations"), len(axes), where)
    levels = []
    for dataset in meta.get("datasets", []):
        scale, shift = _transforms(dataset.get("coordinateTransformations"), len(axes), where)
        # The multiscale-level transform applies after the dataset's own one (spec order).
        scale, shift = scale * outer_scale, shift * outer_scale + outer_shift
        levels.append(
            ScaleLevel(
                path=str(dataset["path"]),
                scale=tuple(float(v) for v in scale[-3:] * to_nm),  # type: ignore[arg-type]
                translation=tuple(float(v) for v in shift[-3:] * to_nm),  # type: ignore[arg-type]
            )
        )
    if not levels:
        raise MetadataError(f"{where}: multiscales lists no datasets")
    return Multiscale(axes=tuple(axes), in_nm=in_nm, levels=tuple(levels))


def _transforms(
    transforms: Sequence[Mapping[str, Any]] | None, ndim: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    scale, shift = np.ones(ndim), np.zeros(ndim)
    for transform in transforms or []:
        kind = transform.get("type")
        if kind == "identity":
            continue
        if kind not in ("scale", "translation") or kind not in transform:
            raise MetadataError(
                f"{where}: coordinateTransformations {dict(transform)} not supported "
                "(expected inline 'scale' and 'translation' lists)"
            )
        values = np.asarray(transform[kind], dtype=np.float64)
        if values.shape != (ndim,):
            raise MetadataError(f"{where}: {kind} {values.tolist()} needs {ndim} values")
        if kind == "scale":
            scale, shift = scale * values, shift * values
        else:
            shift = shift + values
    return scale, shift


def relative_mismatch(scale: Sequence[float], target: Sequence[float]) -> float:
    """Largest relative difference between two (z, y, x) voxel sizes."""
    return max(abs(s / t - 1.0) for s, t in zip(scale, target, strict=True))


def select_level(
    multiscale: Multiscale,
    where: str,
    scale_level: int | None = None,
    voxel_size_nm: Sequence[float] | None = None,
    tolerance: float | None = 0.1,
) -> ScaleLevel:
    """The level at index ``scale_level``, or the one closest to ``voxel_size_nm``, else s0.

    Raises:
        MetadataError: index out of range, or no level within ``tolerance`` of the voxel size.
    """
    levels = multiscale.levels
    if scale_level is not None:
        if not 0 <= scale_level < len(levels):
            raise MetadataError(
                f"{where}: scale_level={scale_level} out of range (levels "
                f"{[level.path for level in levels]})"
            )
        return levels[scale_level]
    if voxel_size_nm is None:
        return levels[0]
    if not multiscale.in_nm:
        raise MetadataError(
            f"{where}: axes have no 'unit', so voxel_size_nm cannot pick a level; "
            "use scale_level or raw_key=<group>/<level path>"
        )
    best = min(levels, key=lambda level: relative_mismatch(level.scale, voxel_size_nm))
    if tolerance is not None and relative_mismatch(best.scale, voxel_size_nm) > tolerance:
        raise MetadataError(
            f"{where}: no level within {tolerance:.0%} of voxel_size_nm={list(voxel_size_nm)} "
            f"(levels: {', '.join(f'{lv.path} {list(lv.scale)}' for lv in levels)})"
        )
    return best


def to_index(index: np.ndarray, source: ScaleLevel, target: ScaleLevel, axis: int) -> np.ndarray:
    """Voxel indices of ``target`` whose voxels contain the centres of ``source``'s ``index``."""
    centre = index * source.scale[axis] + source.translation[axis]
    return np.floor((centre - target.translation[axis]) / target.scale[axis] + 0.5 + _EPS).astype(
        np.int64
    )


def box_in(
    target: ScaleLevel, target_shape: Sequence[int], source: ScaleLevel
) -> tuple[int, int, int, int, int, int]:
    """The half-open (z0, z1, y0, y1, x0, x1) box of ``source`` voxels that fall in ``target``.

    The inverse of ``to_index``: source voxel ``i`` is in the box exactly when
    ``0 <= to_index(i) < target_shape`` on every axis. Not clipped to the source's shape.
    """
    box: list[int] = []
    for axis, size in enumerate(target_shape):
        start = target.translation[axis] - 0.5 * target.scale[axis] - source.translation[axis]
        stop = start + size * target.scale[axis]
        box += [math.ceil(v / source.scale[axis] - _EPS) for v in (start, stop)]
    return tuple(box)  # type: ignore[return-value]


def resolve_image(
    group: zarr.Group,
    key: str,
    where: str,
    scale_level: int | None = None,
    voxel_size_nm: Sequence[float] | None = None,
    like: ScaleLevel | None = None,
) -> ImageRef:
    """``key`` as an array: a plain array, a level of its multiscale parent, or a level of it.

    Args:
        group: the root group.
        key: array or multiscale group path in ``group`` (``""``: the root).
        where: the name errors give (the file and key).
        scale_level, voxel_size_nm: pick the level of a multiscale group (see ``select_level``).
        like: pick the level closest to this one's voxel size, without tolerance (labels).
    """
    node = group[key] if key else group
    level: ScaleLevel | None
    if isinstance(node, zarr.Group):
        multiscale = read_multiscale(node.attrs, where)
        if multiscale is None:
            raise MetadataError(f"{where}: a group without OME-Zarr multiscales (expected array)")
        if like is not None:
            level = select_level(multiscale, where, voxel_size_nm=like.scale, tolerance=None)
        else:
            level = select_level(multiscale, where, scale_level, voxel_size_nm)
        path = f"{key}/{level.path}".lstrip("/")
    else:
        parent, _, name = key.rpartition("/")
        multiscale = read_multiscale(group[parent].attrs if parent else group.attrs, where)
        level = multiscale.level(name) if multiscale else None
        multiscale = multiscale if level else None  # a plain array beside a multiscale image
        if scale_level is not None or voxel_size_nm is not None:
            raise MetadataError(
                f"{where} is an array, so scale_level/voxel_size_nm cannot choose a level: "
                f"drop them or set raw_key to the multiscale group '{parent}'"
            )
        path = key
    ndim = len(multiscale.axes) if multiscale else 3
    shape = group[path].shape
    if len(shape) != ndim or any(n != 1 for n in shape[: ndim - 3]):
        raise MetadataError(
            f"{where}: expected array {path} to have 3 axes (z, y, x) after leading axes of "
            f"size 1, got {shape}"
        )
    return ImageRef(path, ndim - 3, level, bool(multiscale and multiscale.in_nm))
