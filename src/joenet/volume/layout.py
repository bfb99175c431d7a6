"""What train, predict, evaluate and convert share about a volume on disk: opening it, its Z range.

A volume is a zarr group holding ``raw`` (z, y, x) or an OME-Zarr multiscale image, and
``labels/<class>`` 0/1 masks; a prediction is a group with one (z, y, x) array per class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zarr


class VolumeError(ValueError):
    """A volume that cannot be used as given; the message names the file and what was expected."""


def open_zarr(
    path: str | os.PathLike | Any,
    what: str = "a zarr group",
    group: bool = True,
    storage_options: dict | None = None,
) -> zarr.Group | zarr.Array:
    """Open ``path`` read-only, or raise one ``VolumeError`` line saying what is wrong.

    Args:
        path: a folder, an fsspec URL (``s3://``, ``http://``) or a zarr store object.
        what: what the caller expected there, for the message (``"the truth volume"``).
        group: only a group will do; False accepts an array too.
        storage_options: fsspec options for URLs.
    """
    where = str(path)
    is_path = isinstance(path, (str, os.PathLike))
    if is_path and "://" not in where and not Path(where).exists():
        raise VolumeError(f"{where}: no such file or directory (expected {what})")
    options = {"storage_options": storage_options} if storage_options else {}
    target = where if is_path else path
    try:  # zarr and fsspec raise several types for "not zarr"
        if group:
            return zarr.open_group(target, mode="r", **options)
        return zarr.open(target, mode="r", **options)
    except Exception as err:
        kind = "a zarr group" if group else "a zarr group or array"
        expected = "" if what == kind else f"; expected {what}"
        raise VolumeError(f"{where}: not {kind} ({err}){expected}") from None


def check_z_range(
    z_range: Sequence[int] | None, depth: int, where: str, key: str
) -> tuple[int, int]:
    """``z_range`` as ``(start, stop)``, all of ``depth`` when None; else a ``VolumeError``.

    Args:
        z_range: half-open ``[start, stop)`` of slices.
        depth: the volume's number of slices.
        where: the volume, for the message.
        key: the config key that gave ``z_range`` (``data.train_z``, ``z_range``).
    """
    if z_range is None:
        return 0, depth
    values = list(z_range)
    if len(values) != 2 or not 0 <= int(values[0]) < int(values[1]) <= depth:
        raise VolumeError(
            f"{where}: {key}={values} must be [start, stop) with 0 <= start < stop <= {depth} "
            f"(the volume has {depth} slices)"
        )
    return int(values[0]), int(values[1])


def volume_attrs(
    name: str,
    source: Any,
    voxel_size_nm: Sequence[float] | None,
    labels_available: Sequence[str],
    **extra: Any,
) -> dict[str, Any]:
    """The attributes of a volume group that joenet writes (converter, synthetic generator).

    Args:
        name: the volume's name.
        source: where its arrays came from (a description, or paths by array).
        voxel_size_nm: (z, y, x) in nm, None when unknown.
        labels_available: the classes with a ``labels/<class>`` array.
        extra: what the writer adds about itself (``converter``, ``generator``).
    """
    return {
        "name": name,
        "source": source,
        "voxel_size_nm": None if voxel_size_nm is None else list(voxel_size_nm),
        "axes": "zyx",  # as the real groups in shared/data store it
        "labels_available": list(labels_available),
        **extra,
    }
