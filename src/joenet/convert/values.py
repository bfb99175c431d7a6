"""How input values become joenet's: raw intensities to uint8/uint16/float32, labels to 0/1 masks.

Each converter maps one slab of its source at a time and describes what it did for the output's
attributes and the log.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from joenet.convert.readers import Source

LabelMode = Literal["auto", "binary", "instances", "threshold"]


class ConvertError(ValueError):
    """A conversion that cannot run as asked; the message says which input or option and why."""


class RawConverter:
    """Raw slabs as stored: uint8/uint16 kept, floats as float32, or mapped to uint8 by ``rescale``.

    Args:
        source: the raw input.
        rescale: (low, high) mapped to 0..255, ``"percentile"`` for its 0.5 and 99.5 percentiles
            (estimated on up to 9 evenly spaced slices), or None.
    """

    def __init__(self, source: Source, rescale: tuple[float, float] | str | None):
        self.source, self.range = source, None
        self.dtype: np.dtype
        dtype = source.dtype.newbyteorder("=")  # big-endian TIFF/HDF5 data is still uint16
        if rescale is not None:
            self.range = _percentiles(source) if rescale == "percentile" else tuple(rescale)
            if not self.range[1] > self.range[0]:
                raise ConvertError(f"{source.path}: rescale range {self.range} is empty")
            self.dtype = np.dtype(np.uint8)
        elif dtype in (np.uint8, np.uint16):
            self.dtype = dtype
        elif dtype.kind == "f":
            self.dtype = np.dtype(np.float32)
            low, high = _sample_range(source)
            if low < 0 or high > 1:
                raise ConvertError(
                    f"{source.path}: raw is {dtype} with values in [{low:g}, {high:g}], but "
                    "joenet clips float images to [0, 1]; pass --rescale (percentiles) or "
                    "--rescale LOW HIGH to store it as uint8"
                )
        else:
            raise ConvertError(
                f"{source.path}: raw dtype {dtype} is not one joenet reads (uint8, uint16, "
                "float); pass --rescale LOW HIGH to store it as uint8"
            )

    def __call__(self, slab: np.ndarray) -> np.ndarray:
        if self.range is None:
            return slab.astype(self.dtype, copy=False)
        low, high = self.range
        scaled = (slab.astype(np.float32) - low) * np.float32(255.0 / (high - low))
        return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)

    def describe(self) -> str:
        """What was done, for the log and the ``converter`` attribute."""
        if self.range is not None:
            low, high = self.range
            return f"{self.source.dtype} [{low:g}, {high:g}] -> uint8"
        if self.dtype == self.source.dtype:
            return f"{self.dtype} kept"
        return f"{self.source.dtype} -> {self.dtype}"


class LabelConverter:
    """Label slabs as 0/1 uint8 masks; in auto and instances mode it records which values it saw.

    Args:
        key: output array, for messages.
        source: the label input.
        mode: see ``convert``.
        threshold: the threshold of ``threshold`` mode.
    """

    def __init__(self, key: str, source: Source, mode: str, threshold: float | None):
        self.key, self.source, self.mode, self.threshold = key, source, mode, threshold
        self.has_one = self.has_255 = self.has_other = False
        self.max_id, self.foreground, self.total = 0, 0, 0
        if mode == "instances" and source.dtype.kind not in "iub":
            raise ConvertError(
                f"{source.path}: instance ids must be integers, got {source.dtype}; use "
                "--label-mode threshold --label-threshold T or binary"
            )

    def __call__(self, slab: np.ndarray) -> np.ndarray:
        if self.mode == "threshold":
            mask = slab > self.threshold
        else:
            if self.mode != "binary":
                self._inspect(slab)
            mask = slab != 0
        self.foreground += int(np.count_nonzero(mask))
        self.total += mask.size
        return mask.astype(np.uint8)

    def instances(self, slab: np.ndarray) -> np.ndarray:
        """The slab's instance ids as uint32 (``--keep-instances``)."""
        if self.max_id > np.iinfo(np.uint32).max:
            raise ConvertError(f"{self.source.path}: instance id {self.max_id} exceeds uint32")
        return slab.astype(np.uint32)

    def _inspect(self, slab: np.ndarray) -> None:
        if slab.dtype.kind == "f" and not np.isin(slab, (0, 1)).all():
            raise ConvertError(
                f"{self.source.path}: float labels with values other than 0 and 1 (a "
                "probability map?); use --label-mode threshold --label-threshold 0.5"
            )
        values = slab[slab != 0]
        if values.size == 0:
            return
        if values.min() < 0:
            raise ConvertError(
                f"{self.source.path}: negative label value {values.min()}; if it marks "
                "unlabelled voxels, use --label-mode threshold --label-threshold 0"
            )
        self.has_one |= bool((values == 1).any())
        self.has_255 |= bool((values == 255).any())
        self.has_other |= bool(((values != 1) & (values != 255)).any())
        self.max_id = max(self.max_id, int(values.max()))

    def describe(self) -> str:
        """What was done, for the log and the ``converter`` attribute."""
        if self.mode == "threshold":
            what = f"value > {self.threshold:g} -> 1"
        elif self.mode == "binary":
            what = "nonzero -> 1"
        elif not (self.has_one or self.has_255 or self.has_other):
            what = "all 0 (empty mask)"
        elif not (self.has_255 or self.has_other):
            what = "0/1 mask kept"
        elif not (self.has_one or self.has_other):
            what = "0/255 mask -> 0/1"
        else:
            what = f"instance ids (max {self.max_id}) -> 0/1 foreground"
        share = 100 * self.foreground / max(self.total, 1)
        return f"{what} ({self.mode}), {share:.2f} % foreground"


def _sample(source: Source, count: int = 9) -> np.ndarray:
    """Pixels of up to ``count`` evenly spaced slices, each thinned to about 512 x 512."""
    stride = max(1, int(np.sqrt(source.shape[1] * source.shape[2] / 512**2)))
    zs = np.unique(np.linspace(0, source.shape[0] - 1, count).round().astype(int))
    return np.concatenate([source.read(z, z + 1)[0, ::stride, ::stride].ravel() for z in zs])


def _sample_range(source: Source) -> tuple[float, float]:
    values = _sample(source)
    return float(np.nanmin(values)), float(np.nanmax(values))


def _percentiles(source: Source) -> tuple[float, float]:
    low, high = np.nanpercentile(_sample(source).astype(np.float64), (0.5, 99.5))
    return float(low), float(high)
