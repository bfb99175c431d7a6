"""What viewers need beside the full-resolution arrays: scale levels and NGFF label images.

Added to the prediction's group (OME-NGFF 0.5, validated by ``ome-zarr-models`` in the tests)::

    <class>_s1, <class>_s2, ...        each class array halved in y and x per level, listed as
                                       the levels of its multiscale entry (z is kept: serial
                                       sections are often much thicker than a pixel)
    labels/                            {"ome": {"labels": [...]}}
    labels/<class>_instances/0, 1, ... with instances=true: the instance ids as an NGFF label
                                       image (``image-label`` metadata), so napari shows a
                                       labels layer
    labels/<class>/0, 1, ...           with a threshold: the 0/1 mask as a label image

Probabilities are averaged 2 x 2 per level; labels take every second pixel (an average of ids
means nothing). Levels stop once the largest side is at most ``MIN_SIDE``.

When: the local executor writes each block's levels of the class arrays from the block in memory,
in its writer thread while the next block is predicted (``write_block_levels``; a block
whose y/x box starts on a multiple of 2^levels, as 2048 px blocks do, holds all the 2 x 2 groups
of its levels, so the bytes equal a pass over the whole array), and flags the block in the
completion record. After the run, ``update_viewer_levels`` computes from the written arrays only
what is not flagged (every block of the z range, or none): Dask runs, outputs of earlier
versions and blocks cut by ``z_range``. Label images and instance levels always come after the
run: instances are labelled over the whole volume first.

Why the label images are copies: scripts and ``joenet.evaluate`` read ``<output>/<class>`` and
``<output>/<class>_instances`` (the documented layout), while NGFF puts label images in
``labels/<name>/`` groups, and zarr has no links between arrays. Label arrays are runs of one id,
so the copies compress to little (docs/viewing.md gives the measured size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import zarr

from joenet.predict.work_units import Block, BlockJob
from joenet.predict.writer import LEVELS_FLAGS, CompletionRecord, multiscale_entry
from joenet.volume.components import chunk_boxes

MIN_SIDE = 256
_LEVELS_RECORD = "viewer_levels_z_ranges"  # z ranges whose levels and label images are done
_BOX = 2048  # y/x side of the full-resolution box read at a time: bounds memory


def level_count(shape: Sequence[int], min_side: int = MIN_SIDE) -> int:
    """Levels below full resolution: halvings until the largest y/x side is <= ``min_side``."""
    return max(0, math.ceil(math.log2(max(shape[1], shape[2]) / min_side)))


def level_shape(shape: Sequence[int], level: int) -> tuple[int, int, int]:
    factor = 2**level
    return (shape[0], math.ceil(shape[1] / factor), math.ceil(shape[2] / factor))


def halve(block: np.ndarray, labels: bool) -> np.ndarray:
    """One level down in y and x: every second pixel for labels, 2 x 2 means otherwise."""
    if labels:
        return block[:, ::2, ::2]
    pad = [(0, 0), (0, block.shape[1] % 2), (0, block.shape[2] % 2)]
    even = np.pad(block, pad, mode="edge") if pad[1][1] or pad[2][1] else block
    if even.dtype == np.uint8:  # probabilities: integer sums, ~12x faster than float means
        sums = even[:, ::2, ::2].astype(np.uint16) + even[:, 1::2, ::2]
        sums += even[:, ::2, 1::2]
        sums += even[:, 1::2, 1::2]
        quarter, rest = sums >> 2, sums & 3
        # np.rint(sums / 4): halves (rest 2) round to the even neighbour, as the float path
        up = (rest == 3) | ((rest == 2) & (quarter & 1 == 1))
        return (quarter + up).astype(np.uint8)
    z, y, x = even.shape
    means = even.astype(np.float32).reshape(z, y // 2, 2, x // 2, 2).mean(axis=(2, 4))
    return np.rint(means).astype(block.dtype)


def _write_box_levels(
    data: np.ndarray, targets: Sequence[zarr.Array], labels: bool, box: tuple[slice, ...]
) -> None:
    """``targets[k]`` over ``box`` at level ``k + 1``, from ``data``: the full resolution there."""
    for level, target in enumerate(targets, start=1):
        data = halve(data, labels)
        factor = 2**level
        y0, x0 = box[1].start // factor, box[2].start // factor
        target[box[0], y0 : y0 + data.shape[1], x0 : x0 + data.shape[2]] = data


def write_levels(
    source: zarr.Array, targets: Sequence[zarr.Array], labels: bool, z_range: tuple[int, int]
) -> None:
    """Fill ``targets[k]`` with ``source`` at level ``k + 1``, over ``z_range``, box by box.

    ``targets`` may start with a full-resolution copy (level 0) when its shape is the source's.
    """
    if not targets:
        return
    copy = targets[0].shape == source.shape
    levels = len(targets) - copy
    step = max(_BOX, source.chunks[1], source.chunks[2]) // 2**levels * 2**levels or 2**levels
    for box in chunk_boxes(source.shape, (source.chunks[0], step, step), z_range):
        data = np.asarray(source[box])
        if copy:
            targets[0][box] = data
        _write_box_levels(data, targets[copy:], labels, box)


def _array(group: zarr.Group, path: str, like: zarr.Array, shape: tuple[int, ...]) -> zarr.Array:
    if path in group:
        existing = group[path]
        assert isinstance(existing, zarr.Array)  # only this module writes these paths
        return existing
    chunks = tuple(min(c, s) for c, s in zip(like.chunks, shape, strict=True))
    return group.create_array(
        path,
        shape=shape,
        chunks=chunks,
        dtype=like.dtype,
        fill_value=0,
        dimension_names=("z", "y", "x"),
    )


def _level_arrays(group: zarr.Group, name: str, levels: int) -> list[zarr.Array]:
    """``name``'s level arrays ``<name>_s1`` .. ``<name>_s<levels>``, created when missing."""
    source = group[name]
    assert isinstance(source, zarr.Array)
    return [
        _array(group, f"{name}_s{k}", source, level_shape(source.shape, k))
        for k in range(1, levels + 1)
    ]


def prepare_block_levels(
    group: zarr.Group, class_names: Sequence[str]
) -> list[list[zarr.Array]] | None:
    """The class arrays' level arrays, per class, created before blocks are written (opened
    once, not per block); None when the volume is too small to have levels."""
    levels = level_count(group[class_names[0]].shape)
    return [_level_arrays(group, name, levels) for name in class_names] if levels else None


def write_block_levels(
    targets: Sequence[Sequence[zarr.Array]],
    shape: Sequence[int],
    labels: bool,
    region: tuple[tuple[int, int], ...],
    values: np.ndarray,
) -> bool:
    """The class arrays' levels over one written block, from its values in memory.

    Args:
        targets: per class, its level arrays (``prepare_block_levels``).
        shape: the full-resolution arrays' (z, y, x).
        labels: the arrays are masks (every second pixel) rather than probabilities (means).
        region: the block's [start, stop) per (z, y, x).
        values: ``(C, z, y, x)`` what was written over ``region``.

    Returns:
        False, writing nothing, when the block's y/x box does not start on a multiple of
        2^levels and end on one or at the volume's edge: its levels then need its neighbours.
    """
    factor = 2 ** len(targets[0])
    for axis in (1, 2):
        start, stop = region[axis]
        if start % factor or (stop % factor and stop != shape[axis]):
            return False
    box = tuple(slice(start, stop) for start, stop in region)
    for channel, class_targets in enumerate(targets):
        _write_box_levels(values[channel], class_targets, labels, box)
    return True


def write_viewer_levels(
    group: zarr.Group,
    class_names: Sequence[str],
    label_names: Sequence[str],
    voxel_size_nm: Sequence[float] | None,
    z_range: tuple[int, int],
    class_levels: bool = True,
) -> None:
    """Scale levels of every class array, and ``label_names`` as NGFF label images.

    Args:
        group: the prediction's root group (its arrays complete over ``z_range``).
        class_names: the per-class arrays (probabilities, or masks with a threshold).
        label_names: arrays of ``group`` that are labels (masks, instance ids).
        voxel_size_nm: the full-resolution voxel size, or None.
        z_range: the slices to (re)compute.
        class_levels: also compute the class arrays' levels (False: written block by block).
    """
    shape = group[class_names[0]].shape
    levels = level_count(shape)
    entries = []
    for name in class_names:
        source = group[name]
        paths = [name, *(f"{name}_s{k}" for k in range(1, levels + 1))]
        if class_levels:
            write_levels(source, _level_arrays(group, name, levels), name in label_names, z_range)
        entries.append(multiscale_entry(name, paths, voxel_size_nm))
    ome = dict(group.attrs["ome"])
    group.attrs["ome"] = {**ome, "multiscales": entries}
    if not label_names:
        return
    labels = group.require_group("labels")
    for name in label_names:
        source = group[name]
        image = labels.require_group(name)
        paths = [str(k) for k in range(levels + 1)]
        targets = [_array(image, p, source, level_shape(shape, k)) for k, p in enumerate(paths)]
        write_levels(source, targets, True, z_range)
        image.attrs["ome"] = {
            "version": ome["version"],
            "multiscales": [multiscale_entry(name, paths, voxel_size_nm)],
            "image-label": {"version": ome["version"], "source": {"image": "../../"}},
        }
    labels.attrs["ome"] = {"version": ome["version"], "labels": list(label_names)}


def update_viewer_levels(
    group: zarr.Group,
    record: CompletionRecord,
    job: BlockJob,
    blocks: Sequence[Block],
    changed: bool,
    instances: bool,
    voxel_size_nm: Sequence[float] | None,
) -> None:
    """``write_viewer_levels`` once per z range of a prediction (again when blocks changed),
    the class arrays' levels only where ``write_block_levels`` did not write them all."""
    z_range = list(job.z_range)
    done = record.attrs().get(_LEVELS_RECORD, [])
    if not changed and z_range in done:
        return
    labels = list(job.class_names) if job.threshold is not None else []
    labels += [f"{name}_instances" for name in job.class_names] if instances else []
    if not labels and not level_count(group[job.class_names[0]].shape):
        return  # a small volume of probabilities: already all a viewer needs, nothing to note
    by_block = {block.index for block in blocks} <= record.done(LEVELS_FLAGS)
    class_levels = not (blocks and by_block)
    write_viewer_levels(group, job.class_names, labels, voxel_size_nm, job.z_range, class_levels)
    record.update_attrs({_LEVELS_RECORD: [*done, z_range]})
