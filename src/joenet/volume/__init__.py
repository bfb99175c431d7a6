"""The on-disk volume layout shared by train, predict, evaluate and convert.

``layout`` (opening a volume, Z ranges, the error type), ``intensity`` (normalisation to
[0, 1] and range checks), ``ome`` (OME-Zarr multiscale metadata), ``zarr_volume`` (windows of
raw and labels for training), ``components`` (connected components, chunk by chunk) and
``atomic`` (writing a folder all at once).
"""

from joenet.volume.intensity import (
    check_finite,
    fit_normalization,
    intensity_sample,
    normalize,
    to_unit_range,
)
from joenet.volume.layout import VolumeError, check_z_range, open_zarr
from joenet.volume.zarr_volume import ZarrVolume

__all__ = [
    "VolumeError",
    "ZarrVolume",
    "check_finite",
    "check_z_range",
    "fit_normalization",
    "intensity_sample",
    "normalize",
    "open_zarr",
    "to_unit_range",
]
