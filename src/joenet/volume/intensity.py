"""Raw intensities to [0, 1]: the normalisations joenet applies, and the checks on a volume's range.

Train, predict and evaluate all fit a normalisation here, on a sample of one plane per chunk
from 32 chunks spread over the volume (``intensity_sample``), so a volume of any size is checked
in a few reads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from joenet.volume.layout import VolumeError

log = logging.getLogger(__name__)
DTYPE_RANGE = {np.dtype("uint8"): 255.0, np.dtype("uint16"): 65535.0}
_PERCENTILE_CHUNKS = 32  # chunk planes sampled to estimate percentiles: enough, and cheap on S3
# Bit depths that detectors and converters store in uint16 (or as integral floats): data that
# fits a smaller one is scaled by it, so 12-bit data in uint16 is not squeezed into [0, 0.06].
_BIT_DEPTHS = (8, 10, 12, 14, 16)
_FLOAT_SLACK = 0.01  # overshoot of [0, 1] (interpolation) that clipping may absorb
_LOW_CONTRAST = 1 / 4  # uint8 data spanning less of 0..255 than this gets a warning


def normalize(image: np.ndarray, normalization: Mapping[str, Any]) -> np.ndarray:
    """Intensities as float32 in [0, 1], clipped.

    Args:
        image: uint8, uint16 or float (``dtype_range``), any integer or float (``fixed``).
        normalization: ``{"kind": "dtype_range"}`` (uint8 / 255, uint16 / 65535, floats as is;
            with ``"bit_depth": b``, integers and integral floats / (2**b - 1), as
            :func:`fit_normalization` resolves it) or ``{"kind": "fixed", "min": a, "max": b}``.
            A ``percentile`` dict must first be resolved to ``fixed`` by ``ZarrVolume`` (its
            ``normalization`` attribute).
    """
    kind = normalization.get("kind")
    if kind == "dtype_range" and normalization.get("bit_depth"):
        scale = np.float32(2 ** int(normalization["bit_depth"]) - 1)
        return np.clip(image.astype(np.float32) / scale, 0.0, 1.0)
    if kind == "dtype_range":
        if image.dtype.kind == "f":
            return np.clip(image, 0.0, 1.0).astype(np.float32)
        if image.dtype not in DTYPE_RANGE:
            raise ValueError(f"unsupported dtype {image.dtype} (expected uint8, uint16 or float)")
        return image.astype(np.float32) / np.float32(DTYPE_RANGE[image.dtype])
    if kind == "fixed" and "min" in normalization and "max" in normalization:
        low, high = float(normalization["min"]), float(normalization["max"])
        scaled = (image.astype(np.float32) - np.float32(low)) / np.float32(high - low)
        return np.clip(scaled, 0.0, 1.0)
    raise ValueError(
        f"normalization {dict(normalization)} not usable (expected kind 'dtype_range' or "
        "'fixed' with min and max; 'percentile' is resolved to 'fixed' by ZarrVolume)"
    )


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Intensities as float32 in [0, 1]: uint8 / 255, uint16 / 65535, floats clipped."""
    return normalize(image, {"kind": "dtype_range"})


def intensity_sample(
    array: zarr.Array,
    where: str,
    leading: int = 0,
    count: int = _PERCENTILE_CHUNKS,
    what: str = "raw",
) -> np.ndarray:
    """One plane of each of ``count`` chunks spread evenly over the chunk grid, flattened.

    Cheap on a volume of any size (``count`` chunk reads) and it sees every part of it, which is
    what a range check or a percentile estimate needs. NaN or Inf is a ``VolumeError``.
    """
    shape, chunks = array.shape[leading:], array.chunks[leading:]
    grid = [-(-n // c) for n, c in zip(shape, chunks, strict=True)]
    picks = np.unique(np.linspace(0, np.prod(grid) - 1, count).round())
    planes = []
    for flat in picks.astype(np.int64):
        cz, cy, cx = np.unravel_index(flat, grid)
        z = min(cz * chunks[0] + chunks[0] // 2, shape[0] - 1)
        window = (
            z,
            slice(cy * chunks[1], (cy + 1) * chunks[1]),
            slice(cx * chunks[2], (cx + 1) * chunks[2]),
        )
        try:
            plane = np.asarray(array[(0,) * leading + window])
        except Exception as err:  # codecs raise their own types (zstd, blosc, JSON, OSError)
            raise VolumeError(
                f"{where}: cannot read slice z={z}, y {window[1].start}:{window[1].stop}, x "
                f"{window[2].start}:{window[2].stop} ({type(err).__name__}: {err}); a chunk is "
                "corrupt or missing: copy or convert the volume again"
            ) from None
        planes.append(check_finite(plane, where, window, what).ravel())
    return np.concatenate(planes)


def check_finite(image: np.ndarray, where: str, window: tuple, what: str = "raw") -> np.ndarray:
    """``image`` itself; a float image with NaN or Inf is a ``VolumeError`` naming the window."""
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        z, rows, cols = window
        raise VolumeError(
            f"{where}: NaN or Inf in {what} slice z={z}, "
            f"y={rows.start}:{rows.stop}, x={cols.start}:{cols.stop} (expected finite values)"
        )
    return image


def _bit_depth(high: float) -> int:
    return next((bits for bits in _BIT_DEPTHS if high < 2**bits), _BIT_DEPTHS[-1])


def fit_normalization(
    sample: np.ndarray, normalization: Mapping[str, Any], where: str, fix: str
) -> dict[str, Any]:
    """The normalisation that maps the data's actual range to [0, 1], checked on a sample.

    ``dtype_range`` assumes uint8 0..255, uint16 0..65535 and floats in [0, 1]. Data that
    does not fit is either read correctly, with a log line saying how, or refused:

    - uint16 (or integral floats) whose values fit a smaller bit depth (8, 10, 12, 14): scaled
      by that depth (``bit_depth``), e.g. 12-bit data / 4095 instead of / 65535;
    - floats outside [0, 1] that are not integral (z-scored, mean-subtracted, ...): refused,
      since no scale can be guessed; ``fix`` says what the user can set instead;
    - uint8 spanning less than a quarter of 0..255: kept, with a low-contrast warning.

    ``fixed`` is kept as it is, with a warning when most of the data falls outside it or uses
    a small part of it (data of another bit depth than the normalisation was made for).

    Args:
        sample: intensities from the data (:func:`intensity_sample`), in its own dtype.
        normalization: the normalisation asked for (a ``bit_depth`` in it is resolved anew).
        where: the array that messages name.
        fix: what to do instead, for the refusal (e.g. the config key to set).

    Raises:
        VolumeError: floats outside [0, 1] that no bit depth explains.
    """
    kind = normalization.get("kind")
    if sample.size == 0:
        return dict(normalization)
    low, high = float(sample.min()), float(sample.max())
    if kind == "fixed":
        _check_fixed(sample, float(normalization["min"]), float(normalization["max"]), where)
        return dict(normalization)
    if kind != "dtype_range":
        return dict(normalization)
    plain = {"kind": "dtype_range"}
    if sample.dtype.kind == "f":
        if low >= -_FLOAT_SLACK and high <= 1 + _FLOAT_SLACK:
            return plain
        integral = low >= 0 and high < 2**16 and bool(np.all(sample == np.round(sample)))
        if not integral:
            raise VolumeError(
                f"{where}: float raw values span [{low:.4g}, {high:.4g}], but float raw is read "
                f"as intensities in [0, 1] and would be clipped; {fix}"
            )
        bits = _bit_depth(high)
        log.info(
            "%s: float raw holds whole numbers %g..%g: read as %d-bit intensities (/ %d), "
            "not clipped to [0, 1]",
            where,
            low,
            high,
            bits,
            2**bits - 1,
        )
        return {**plain, "bit_depth": bits}
    if sample.dtype == np.uint16:
        bits = _bit_depth(high)
        if bits < 16:
            log.info(
                "%s: uint16 raw holds values up to %d, a %d-bit range: read as / %d "
                "(the full uint16 range / 65535 would give at most %.3f)",
                where,
                int(high),
                bits,
                2**bits - 1,
                high / 65535,
            )
            return {**plain, "bit_depth": bits}
        return plain
    if sample.dtype == np.uint8 and high - low < _LOW_CONTRAST * 255:
        log.warning(
            "%s: uint8 raw spans only %d..%d of 0..255 (low contrast); normalization "
            "{kind: percentile} stretches it to [0, 1]",
            where,
            int(low),
            int(high),
        )
    return plain


def _check_fixed(sample: np.ndarray, low: float, high: float, where: str) -> None:
    outside = float(np.mean((sample < low) | (sample > high)))
    span = (float(sample.max()) - float(sample.min())) / (high - low)
    if outside > 0.25:
        log.warning(
            "%s: %.0f%% of the sampled intensities lie outside the normalisation range "
            "[%g, %g] and are clipped; was it made for other data?",
            where,
            100 * outside,
            low,
            high,
        )
    elif span < 0.1:
        log.warning(
            "%s: the sampled intensities span %.1f%% of the normalisation range [%g, %g]; "
            "was it made for data of another bit depth?",
            where,
            100 * span,
            low,
            high,
        )
