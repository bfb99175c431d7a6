"""The OME-Zarr output of prediction, and the record of which blocks are finished.

Layout (NGFF 0.5 on zarr v3)::

    out.zarr/
      zarr.json            attrs {"ome": {"version": "0.5", "multiscales": [one per class]},
                                  "joenet": {checkpoint, config, version, fingerprint, ...}}
      nuclei, mito         uint8 (z, y, x): probability x 255, or 0/1 with a threshold
      nuclei_instances     uint32 connected components (with instances=true)
      .joenet/done         bool per block (grid of blocks), True once the block is written

zarr stores no chunk that equals the fill value, so which chunks exist says nothing about what
was computed: a block counts as finished only once its flag is set, and the flag is set after
all of the block's chunks are written. One flag chunk per block needs no locking, so concurrent
Dask workers can set theirs safely.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

NGFF_VERSION = "0.5"
_RECORD_GROUP = ".joenet"


def ngff_multiscales(names: Sequence[str], voxel_size_nm: Sequence[float] | None) -> list[dict]:
    """One multiscale entry per array, each with a single full-resolution dataset."""
    unit = {"unit": "nanometer"} if voxel_size_nm else {}
    scale = [float(v) for v in voxel_size_nm] if voxel_size_nm else [1.0, 1.0, 1.0]
    axes = [{"name": axis, "type": "space", **unit} for axis in "zyx"]
    return [
        {
            "name": name,
            "axes": axes,
            "datasets": [
                {"path": name, "coordinateTransformations": [{"type": "scale", "scale": scale}]}
            ],
        }
        for name in names
    ]


def open_output(
    path: str | Path,
    arrays: Mapping[str, str],
    shape: Sequence[int],
    chunks: Sequence[int],
    class_names: Sequence[str],
    voxel_size_nm: Sequence[float] | None,
    attrs: Mapping[str, Any],
    overwrite: bool = False,
) -> zarr.Group:
    """Create the output group, or reopen it to resume when it was made with the same settings.

    Args:
        path: the output zarr group (a local or shared file system path).
        arrays: array name -> dtype (``uint8`` per class, ``uint32`` per instance array).
        shape: (z, y, x) of every array, the input's.
        chunks: (z, y, x) chunks of every array, the input's.
        class_names: classes that get an NGFF multiscale entry.
        voxel_size_nm: (z, y, x) voxel size, carried into the NGFF scale.
        attrs: joenet metadata; its ``fingerprint`` decides whether an existing output can resume.
        overwrite: delete an existing output first.

    Raises:
        ValueError: the path holds an output made with other settings (and ``overwrite`` is off).
    """
    path = Path(path)
    if overwrite and path.exists():
        shutil.rmtree(path)
    if (path / "zarr.json").is_file():
        group = zarr.open_group(str(path), mode="r+")
        previous = dict(group.attrs.get("joenet", {})).get("fingerprint")
        if previous != attrs["fingerprint"]:
            changed = sorted(
                key
                for key in set(previous or {}) | set(attrs["fingerprint"])
                if (previous or {}).get(key) != attrs["fingerprint"].get(key)
            )
            raise ValueError(
                f"{path} holds a prediction made with other settings (differing: {changed}); "
                "pass overwrite=true to replace it, or choose another output"
            )
        return group
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, dtype in arrays.items():
        group.create_array(
            name,
            shape=tuple(shape),
            chunks=tuple(chunks),
            dtype=dtype,
            fill_value=0,
            dimension_names=("z", "y", "x"),
            attributes={"joenet": {"checkpoint": attrs["checkpoint"], "array": name}},
        )
    group.attrs.update(
        {
            "ome": {
                "version": NGFF_VERSION,
                "multiscales": ngff_multiscales(class_names, voxel_size_nm),
            },
            "joenet": dict(attrs),
        }
    )
    return group


class CompletionRecord:
    """Which blocks of an output are finished: ``<output>/.joenet/done``, one bool per block.

    Each flag is its own chunk, hence its own file, and zarr's local store writes a file
    atomically (temporary file, then rename): workers that finish blocks at the same time never
    touch the same file, and a kill leaves a flag either set or unset.

    Args:
        output: the output zarr group.
    """

    def __init__(self, output: str | Path) -> None:
        self.path = f"{output}/{_RECORD_GROUP}"

    def create(self, grid_shape: Sequence[int]) -> None:
        """Create the flags of a ``grid_shape`` grid of blocks, unless they exist."""
        group = zarr.open_group(self.path, mode="a")
        if "done" not in group:
            shape = tuple(grid_shape)
            group.create_array("done", shape=shape, chunks=(1,) * len(shape), dtype=bool,
                               fill_value=False)  # fmt: skip

    def done(self) -> set[tuple[int, ...]]:
        """Grid indices of the finished blocks."""
        flags = zarr.open_array(f"{self.path}/done", mode="r")[...]
        return {tuple(int(i) for i in index) for index in np.argwhere(flags)}

    def mark_done(self, index: tuple[int, ...]) -> None:
        """Record a block as finished; call only after all its chunks are written."""
        zarr.open_array(f"{self.path}/done", mode="r+")[index] = True

    def attrs(self) -> dict[str, Any]:
        """Notes of the record itself (e.g. which z ranges have instance labels)."""
        return dict(zarr.open_group(self.path, mode="r").attrs)

    def update_attrs(self, values: Mapping[str, Any]) -> None:
        """Add notes; only the process that runs the prediction writes them."""
        zarr.open_group(self.path, mode="r+").attrs.update(values)
