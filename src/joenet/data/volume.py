"""Read patches from an EM volume stored as a zarr group (``raw`` plus ``labels/<class>``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

_RANGE = {np.dtype("uint8"): 255.0, np.dtype("uint16"): 65535.0}


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Intensities as float32 in [0, 1]: uint8 / 255, uint16 / 65535, floats clipped."""
    if image.dtype.kind == "f":
        return np.clip(image, 0.0, 1.0).astype(np.float32)
    if image.dtype not in _RANGE:
        raise ValueError(f"unsupported dtype {image.dtype} (expected uint8, uint16 or float)")
    return image.astype(np.float32) / _RANGE[image.dtype]


class VolumeError(ValueError):
    """A volume that cannot be used as given; the message names the file and what was expected."""


class ZarrVolume:
    """One EM volume: ``raw`` (z, y, x) and optional 0/1 masks ``labels/<class>``.

    Arrays are opened lazily (also after pickling into a DataLoader worker, so workers that use the
    ``spawn`` start method reopen the store instead of receiving a copy of the data). A volume
    whose arrays fit in ``cache_bytes`` is loaded into memory once per process, as the seed's
    dataset does; a larger one is read patch by patch from its chunks.

    An optional ``labels/mask`` array marks annotated pixels (0 = not annotated): such pixels are
    excluded from loss and metrics through the ``valid`` map that ``read`` returns.

    Args:
        path: the zarr group.
        class_names: output channels; a class without ``labels/<class>`` is reported unlabelled.
        raw_key: path of the image array inside the group.
        cache_bytes: load the arrays into memory when raw plus labels take at most this much.
    """

    def __init__(
        self,
        path: str | Path,
        class_names: Sequence[str] = ("nuclei", "mito"),
        raw_key: str = "raw",
        cache_bytes: int = 2**30,
    ):
        self.path = str(path)
        self.class_names = list(class_names)
        self.raw_key = raw_key
        self.cache_bytes = cache_bytes
        raw, labels, _ = self._open()
        self.shape: tuple[int, int, int] = tuple(raw.shape)  # type: ignore[assignment]
        voxel_size = zarr.open_group(self.path, mode="r").attrs.get("voxel_size_nm")
        self.voxel_size_nm: list[float] | None = list(voxel_size) if voxel_size else None
        self.dtype = raw.dtype
        self.labelled = tuple(label is not None for label in labels)
        self._arrays: tuple | None = None

    def _open(self) -> tuple[zarr.Array, list[zarr.Array | None], zarr.Array | None]:
        if not Path(self.path).exists() and "://" not in self.path:
            raise VolumeError(f"{self.path}: no such file or directory (expected a zarr group)")
        try:
            group = zarr.open_group(self.path, mode="r")
        except Exception as err:  # zarr raises several types for "not a group"
            raise VolumeError(f"{self.path}: not a zarr group ({err})") from None
        if self.raw_key not in group:
            raise VolumeError(f"{self.path}: no '{self.raw_key}' array (expected raw (z, y, x))")
        raw = group[self.raw_key]
        if raw.ndim != 3:
            raise VolumeError(
                f"{self.path}/{self.raw_key}: expected 3 axes (z, y, x), got {raw.shape}"
            )
        if raw.dtype not in _RANGE and raw.dtype.kind != "f":
            raise VolumeError(
                f"{self.path}/{self.raw_key}: unsupported dtype {raw.dtype} "
                "(expected uint8, uint16 or float)"
            )
        labels: list[zarr.Array | None] = []
        for key in [f"labels/{name}" for name in self.class_names] + ["labels/mask"]:
            label = group.get(key)
            if label is not None and label.shape != raw.shape:
                raise VolumeError(
                    f"{self.path}/{key}: shape {label.shape} differs from raw {raw.shape}"
                )
            labels.append(label)
        return raw, labels[:-1], labels[-1]

    def __getstate__(self) -> dict:
        # Workers reopen the store; a cached copy is not worth pickling into each of them.
        return {**self.__dict__, "_arrays": None}

    def _load(self) -> tuple:
        if self._arrays is None:
            raw, labels, mask = self._open()
            arrays = [raw, *labels, mask]
            if sum(a.nbytes for a in arrays if a is not None) <= self.cache_bytes:
                raw, labels, mask = (
                    raw[...],
                    [None if label is None else label[...] for label in labels],
                    None if mask is None else mask[...],
                )
            self._arrays = (raw, labels, mask)
        return self._arrays

    def read(
        self, z: int, y: int, x: int, size: int | tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window of slice ``z`` whose top-left corner is (y, x), ``size`` = side or (h, w).

        Returns:
            image (1, h, w) float32 in [0, 1], target (C, h, w) uint8 (zeros for unlabelled
            classes: callers mask them with ``labelled``) and valid (1, h, w) uint8 (0 where
            ``labels/mask`` says the pixel is not annotated).
        """
        height, width = (size, size) if isinstance(size, int) else size
        raw, labels, mask = self._load()
        window = (z, slice(y, y + height), slice(x, x + width))
        image = to_unit_range(np.asarray(raw[window]))
        target = np.zeros((len(labels), height, width), dtype=np.uint8)
        for channel, label in enumerate(labels):
            if label is not None:
                target[channel] = label[window]
        if mask is None:
            valid = np.ones((1, height, width), dtype=np.uint8)
        else:
            valid = (np.asarray(mask[window]) != 0).astype(np.uint8)[None]
        return image[None], target, valid
