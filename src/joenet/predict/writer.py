"""The OME-Zarr output of prediction, and the record of which blocks are finished.

Layout (NGFF 0.5 on zarr v3)::

    out.zarr/
      zarr.json            attrs {"ome": {"version": "0.5", "multiscales": [one per class]},
                                  "joenet": {checkpoint, config, version, fingerprint, ...}}
      nuclei, mito         uint8 (z, y, x): probability x 255, or 0/1 with a threshold
      nuclei_instances     uint32 connected components (with instances=true)
      nuclei_s1, ...       scale levels, labels/ NGFF label images (predict/viewer_levels.py)
      .joenet/done         bool per block (grid of blocks), True once the block is written
      .joenet/levels       bool per block, True once its class arrays' scale levels are
                           written with it (local executor; viewer_levels.py)

zarr stores no chunk that equals the fill value, so which chunks exist says nothing about what
was computed: a block counts as finished only once its flag is set, and the flag is set after
all of the block's chunks are written. One flag chunk per block needs no locking, so concurrent
Dask workers can set theirs safely.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

NGFF_VERSION = "0.5"
_RECORD_GROUP = ".joenet"
_LABELS_GROUP = "labels"  # NGFF label images (predict/viewer_levels.py)
_ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray", ".zattrs")


def multiscale_entry(
    name: str, paths: Sequence[str], voxel_size_nm: Sequence[float] | None
) -> dict:
    """An NGFF multiscale entry whose level ``k`` (``paths[k]``) is halved ``k`` times in y, x.

    Level ``k``'s voxel centres sit at ``(2**k - 1) / 2`` full-resolution voxels from level 0's,
    so every level covers the same physical box.
    """
    unit = {"unit": "nanometer"} if voxel_size_nm else {}
    voxel = [float(v) for v in voxel_size_nm] if voxel_size_nm else [1.0, 1.0, 1.0]
    datasets = []
    for level, path in enumerate(paths):
        factor = 2**level
        scale = [voxel[0], voxel[1] * factor, voxel[2] * factor]
        transforms: list[dict] = [{"type": "scale", "scale": scale}]
        if level:
            shift = [0.0, voxel[1] * (factor - 1) / 2, voxel[2] * (factor - 1) / 2]
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": path, "coordinateTransformations": transforms})
    return {
        "name": name,
        "axes": [{"name": axis, "type": "space", **unit} for axis in "zyx"],
        "datasets": datasets,
    }


def ngff_multiscales(names: Sequence[str], voxel_size_nm: Sequence[float] | None) -> list[dict]:
    """One multiscale entry per array, each with a single full-resolution dataset."""
    return [multiscale_entry(name, [name], voxel_size_nm) for name in names]


class OutputError(ValueError):
    """An output path that prediction refuses, to keep what is there; the message says why."""


def _is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def _zarr_root(path: Path) -> Path:
    """The outermost zarr group or array holding ``path`` (``path`` itself when none does)."""
    root = path
    for parent in path.parents:
        if not any((parent / name).is_file() for name in _ZARR_METADATA):
            break
        root = parent
    return root


def _earlier_prediction(path: str) -> dict[str, Any] | None:
    """The ``joenet`` attributes of the prediction at ``path``; None if it is not one."""
    try:
        group = zarr.open_group(path, mode="r")
    except Exception:  # zarr raises several types for "not a group"
        return None
    meta = dict(group.attrs.get("joenet") or {})
    return meta if "fingerprint" in meta else None


def check_output(output: str | os.PathLike, input: str | os.PathLike) -> dict[str, Any] | None:
    """Refuse an output that would write into, or delete, anything prediction did not make.

    Allowed: a path that does not exist, an empty directory, or an earlier joenet prediction
    (recognised by the fingerprint in its metadata), which is resumed or, with ``overwrite``,
    replaced. Refused, with or without ``overwrite``: the input itself, a path inside the input's
    zarr hierarchy or one that contains it, an existing file, and a directory holding anything
    else (the user's files, another tool's zarr).

    Returns:
        The earlier prediction's ``joenet`` attributes, or None when the output is new.

    Raises:
        OutputError: the output is one of the refused cases.
    """
    if _is_url(output) or _is_url(input):
        same = str(output).rstrip("/") == str(input).rstrip("/")
        nested = any(f"{a}/".startswith(f"{b}/") for a, b in ((output, input), (input, output)))
        if same or nested:
            raise OutputError(
                f"output {output} overlaps the input {input}; choose an output outside the input"
            )
        if _is_url(output):
            return _earlier_prediction(str(output))
    out, source = Path(os.path.realpath(output)), Path(os.path.realpath(input))
    hierarchy = _zarr_root(source)  # the whole group, when the input is an array inside it
    if out == hierarchy or hierarchy in out.parents:
        raise OutputError(
            f"output {output} is the input {input} or lies inside its zarr hierarchy "
            f"{hierarchy}; prediction never writes into its input: choose an output outside it"
        )
    if out in hierarchy.parents:
        raise OutputError(
            f"output {output} contains the input {input}; prediction never writes over its "
            "input: choose an output outside it"
        )
    if not out.exists() and not out.is_symlink():
        return None
    if not out.is_dir():
        raise OutputError(f"output {output} exists and is not a directory; choose a new path")
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return None  # an empty directory: nothing to lose
    earlier = _earlier_prediction(str(out))
    if earlier is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputError(
            f"output {output} exists and is not a joenet prediction (it holds {shown}); "
            "prediction writes only to a new path or its own earlier output: choose a new path"
        )
    return earlier


def _remove_prediction(path: str, earlier: Mapping[str, Any]) -> None:
    """Delete an earlier prediction, refusing if it holds anything prediction did not write."""
    if _is_url(path):  # an object store prefix: zarr clears the group it made
        zarr.open_group(path, mode="w", zarr_format=3)
        return
    arrays = dict(earlier["fingerprint"]).get("arrays", {})
    ours = {*_ZARR_METADATA, _RECORD_GROUP, *arrays, _LABELS_GROUP}
    levels = re.compile(rf"({'|'.join(map(re.escape, arrays))})_s\d+") if arrays else None

    def written_by_us(name: str) -> bool:  # the arrays, their scale levels, the label images
        return name in ours or bool(levels and levels.fullmatch(name))

    foreign = sorted(entry.name for entry in Path(path).iterdir() if not written_by_us(entry.name))
    if foreign:
        raise OutputError(
            f"output {path} is an earlier joenet prediction but also holds {foreign}, which "
            "prediction did not write; move them out, or choose a new path"
        )
    shutil.rmtree(path)


def _describe_changes(previous: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    def short(value: Any) -> str:
        text = "(none)" if value is None else str(value)
        return text if len(text) <= 40 else text[:37] + "..."

    keys = sorted(set(previous) | set(current))
    return "; ".join(
        f"{key}: {short(previous.get(key))} -> {short(current.get(key))}"
        for key in keys
        if previous.get(key) != current.get(key)
    )


def open_output(
    path: str | Path,
    arrays: Mapping[str, str],
    shape: Sequence[int],
    chunks: Sequence[int],
    class_names: Sequence[str],
    voxel_size_nm: Sequence[float] | None,
    attrs: Mapping[str, Any],
    earlier: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> zarr.Group:
    """Create the output group, or reopen it to resume when it was made with the same settings.

    The group's metadata, joenet's fingerprint included, is written in one piece before any
    array, so every group at ``path`` that holds arrays is recognisably joenet's.

    Args:
        path: the output zarr group (a local or shared file system path), already accepted by
            :func:`check_output`.
        arrays: array name -> dtype (``uint8`` per class, ``uint32`` per instance array).
        shape: (z, y, x) of every array, the input's.
        chunks: (z, y, x) chunks of every array, the input's.
        class_names: classes that get an NGFF multiscale entry.
        voxel_size_nm: (z, y, x) voxel size, carried into the NGFF scale.
        attrs: joenet metadata; its ``fingerprint`` decides whether an existing output can resume.
        earlier: what :func:`check_output` returned: the prediction already at ``path``.
        overwrite: replace that earlier prediction instead of resuming it.

    Raises:
        OutputError: the path holds a prediction made with other settings (and ``overwrite`` is
            off), or one that holds files prediction did not write (with ``overwrite``).
    """
    path = str(path)
    if earlier is not None and overwrite:
        _remove_prediction(path, earlier)
        earlier = None
    if earlier is not None:
        previous = dict(earlier.get("fingerprint") or {})
        if previous != attrs["fingerprint"]:
            changes = _describe_changes(previous, attrs["fingerprint"])
            raise OutputError(
                f"{path} holds a prediction made with other settings ({changes}); "
                "choose another output, or add overwrite=true to discard that prediction and "
                "start over"
            )
        group = zarr.open_group(path, mode="r+")
    else:
        group = zarr.create_group(
            path,
            zarr_format=3,
            attributes={
                "ome": {
                    "version": NGFF_VERSION,
                    "multiscales": ngff_multiscales(class_names, voxel_size_nm),
                },
                "joenet": dict(attrs),
            },
        )
    for name, dtype in arrays.items():
        if name not in group:  # all of them, unless a kill came between group and arrays
            group.create_array(
                name,
                shape=tuple(shape),
                chunks=tuple(chunks),
                dtype=dtype,
                fill_value=0,
                dimension_names=("z", "y", "x"),
                attributes={"joenet": {"checkpoint": attrs["checkpoint"], "array": name}},
            )
    return group


LEVELS_FLAGS = "levels"  # blocks whose class arrays' viewer levels are written (viewer_levels.py)


class CompletionRecord:
    """Which blocks of an output are finished: ``<output>/.joenet/done``, one bool per block
    (and ``<output>/.joenet/levels``: which have their viewer levels).

    Each flag is its own chunk, hence its own file, and zarr's local store writes a file
    atomically (temporary file, then rename): workers that finish blocks at the same time never
    touch the same file, and a kill leaves a flag either set or unset.

    Args:
        output: the output zarr group.
    """

    def __init__(self, output: str | Path) -> None:
        self.path = f"{output}/{_RECORD_GROUP}"

    def create(self, grid_shape: Sequence[int], flags: str = "done") -> None:
        """Create the flags of a ``grid_shape`` grid of blocks, unless they exist."""
        group = zarr.open_group(self.path, mode="a")
        if flags not in group:
            shape = tuple(grid_shape)
            group.create_array(
                flags, shape=shape, chunks=(1,) * len(shape), dtype=bool, fill_value=False
            )

    def grid_shape(self) -> tuple[int, ...]:
        """The shape of the grid of blocks the record was created for."""
        return tuple(zarr.open_array(f"{self.path}/done", mode="r").shape)

    def done(self, flags: str = "done") -> set[tuple[int, ...]]:
        """Grid indices of the finished blocks (``flags="levels"``: of those with levels; none
        where those flags were never created, as in outputs of earlier versions)."""
        group = zarr.open_group(self.path, mode="r")
        if flags not in group:
            return set()
        values = zarr.open_array(f"{self.path}/{flags}", mode="r")[...]
        return {tuple(int(i) for i in index) for index in np.argwhere(values)}

    def mark_done(self, index: tuple[int, ...], flags: str = "done") -> None:
        """Record a block as finished; call only after all its chunks are written."""
        zarr.open_array(f"{self.path}/{flags}", mode="r+")[index] = True

    def attrs(self) -> dict[str, Any]:
        """Notes of the record itself (e.g. which z ranges have instance labels)."""
        return dict(zarr.open_group(self.path, mode="r").attrs)

    def update_attrs(self, values: Mapping[str, Any]) -> None:
        """Add notes; only the process that runs the prediction writes them."""
        zarr.open_group(self.path, mode="r+").attrs.update(values)
