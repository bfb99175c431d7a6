"""The input of prediction: a zarr group (its ``raw``) or a zarr array, and its voxel size.

``raw`` may be a plain (z, y, x) array or an OME-Zarr multiscale image (NGFF 0.4/0.5), of which
the full-resolution level is predicted; leading axes of size 1 (e.g. c or t) are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from joenet.volume import VolumeError, intensity_sample, normalize, open_zarr
from joenet.volume.ome import MetadataError, read_multiscale, resolve_image


@dataclass(frozen=True)
class InputImage:
    """A (z, y, x) view of the input array.

    Args:
        array: the zarr array, possibly with leading axes of size 1.
        leading: how many leading axes to drop.
        voxel_size_nm: (z, y, x) voxel size, None when the input does not record one.
        where: the path that errors name.
    """

    array: zarr.Array
    leading: int
    voxel_size_nm: list[float] | None
    where: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[self.leading :])  # type: ignore[return-value]

    @property
    def chunks(self) -> tuple[int, int, int]:
        return tuple(self.array.chunks[self.leading :])  # type: ignore[return-value]

    def sample(self) -> np.ndarray:
        """Intensities of one plane of 32 chunks spread over the volume, in the input's dtype."""
        return intensity_sample(self.array, self.where, self.leading)

    def read(self, window: tuple[tuple[int, int], ...], normalization: Mapping) -> np.ndarray:
        """[start, stop) per axis as float32 in [0, 1], reflected beyond the volume border."""
        inside = tuple(
            slice(max(start, 0), min(stop, size))
            for (start, stop), size in zip(window, self.shape, strict=True)
        )
        image = normalize(np.asarray(self.array[(0,) * self.leading + inside]), normalization)
        pad = [
            (cut.start - start, stop - cut.stop)
            for (start, stop), cut in zip(window, inside, strict=True)
        ]
        if any(before or after for before, after in pad):
            # numpy reflects repeatedly when a pad exceeds the axis; one pixel has no reflection
            single = any(image.shape[axis] == 1 for axis, p in enumerate(pad) if any(p))
            image = np.pad(image, pad, mode="edge" if single else "reflect")
        return image


def _voxel_size(attrs: Mapping[str, Any]) -> list[float] | None:
    if attrs.get("voxel_size_nm"):
        return [float(v) for v in attrs["voxel_size_nm"]]
    return None


def open_input(path: str | Path, raw_key: str = "raw") -> InputImage:
    """Open the image to predict and find its voxel size.

    Args:
        path: a zarr group holding ``raw_key`` (an array or a multiscale image), an OME-Zarr
            multiscale group itself, or a zarr array.
        raw_key: the image inside a group.

    Returns:
        The image; its voxel size is the group attribute ``voxel_size_nm``, else the OME
        multiscales scale (in nm), else, for an array input, its own or its parent group's
        ``voxel_size_nm``.

    Raises:
        VolumeError: no zarr there, no ``raw`` in the group, not 3D, or an unsupported dtype.
    """
    where = str(path)
    node = open_zarr(where, "a zarr group or array", group=False)
    if isinstance(node, zarr.Group):
        try:
            is_image = read_multiscale(node.attrs, where) is not None
        except MetadataError as err:
            raise VolumeError(str(err)) from None
        key = raw_key if raw_key in node else ""
        if not key and not is_image:
            raise VolumeError(
                f"{where}: the group has no '{raw_key}' array (expected raw (z, y, x)); it has "
                f"{sorted(node.keys())}. Pass the group that holds raw, or the array itself"
            )
        try:
            ref = resolve_image(node, key, f"{where}/{key}".rstrip("/"))
        except MetadataError as err:
            raise VolumeError(str(err)) from None
        array = node[ref.path]
        ome_scale = list(ref.level.scale) if ref.level is not None and ref.in_nm else None
        voxel = _voxel_size(node.attrs) or ome_scale or _voxel_size(array.attrs)
        image = InputImage(array, ref.leading, voxel, f"{where}/{ref.path}")
    else:
        leading = node.ndim - 3
        if leading < 0 or any(n != 1 for n in node.shape[:leading]):
            raise VolumeError(f"{where}: expected a (z, y, x) array, got shape {node.shape}")
        voxel = _voxel_size(node.attrs)
        parent = Path(where).parent
        if voxel is None and "://" not in where and (parent / "zarr.json").is_file():
            voxel = _voxel_size(zarr.open_group(str(parent), mode="r").attrs)
        image = InputImage(node, leading, voxel, where)
    if image.array.dtype.kind not in "uif":
        raise VolumeError(f"{where}: unsupported dtype {image.array.dtype} (expected numbers)")
    return image
