"""Connected components: of a mask in memory, and of a zarr mask chunk by chunk (one labelling).

Why not ``scipy.ndimage.label`` on the whole volume: the volume need not fit in memory. Why not
dask-image's ``ndmeasure.label``: it runs the same three passes, but needs dask arrays and another
dependency; these few lines keep memory at one chunk plus one label-id array, and work after
either executor. The passes (as dask-image's):

1. label each chunk on its own (3D, 6-connectivity: faces), offset so that ids are unique;
2. collect the id pairs that touch across every chunk face and merge them as a graph;
3. rewrite every chunk with the merged, consecutive ids (1..N in order of first chunk).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import zarr
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

ChunkBox = tuple[slice, slice, slice]


def chunk_boxes(
    shape: Sequence[int], chunks: Sequence[int], z_range: tuple[int, int]
) -> Iterator[ChunkBox]:
    """Boxes of ``chunks`` tiling ``shape`` over the whole z chunks that hold ``z_range``."""
    z_first = z_range[0] // chunks[0] * chunks[0]
    starts = [
        range(z_first, z_range[1], chunks[0]),
        range(0, shape[1], chunks[1]),
        range(0, shape[2], chunks[2]),
    ]
    for corner in itertools.product(*starts):
        z, y, x = (slice(c, min(c + n, s)) for c, n, s in zip(corner, chunks, shape, strict=True))
        yield z, y, x


def label_components(mask: np.ndarray, connectivity: int = 1) -> tuple[np.ndarray, int]:
    """3D connected components of a boolean mask.

    Args:
        mask: (z, y, x) mask; nonzero is foreground.
        connectivity: 1 joins face neighbours (6-connected), 2 adds edges (18), 3 corners (26).

    Returns:
        ``(labels, count)``: int32 labels 1..count, 0 for background.
    """
    if mask.ndim != 3:
        raise ValueError(f"expected a (z, y, x) mask, got shape {mask.shape}")
    structure = ndimage.generate_binary_structure(3, connectivity)
    labels, count = ndimage.label(mask > 0, structure=structure, output=np.int32)
    return labels, int(count)


def label_instances(
    mask_source: zarr.Array, labels: zarr.Array, cut: int, z_range: tuple[int, int]
) -> int:
    """Label the components of ``mask_source >= cut`` into ``labels``.

    Args:
        mask_source: uint8 (z, y, x): probabilities x 255 or 0/1 masks.
        labels: uint32 (z, y, x) output, same shape and chunks.
        cut: a voxel is foreground when its value is at least this (128: probability >= 0.5).
        z_range: [start, stop) slices to label; voxels outside it count as background.

    Returns:
        The number of components.
    """
    boxes = list(chunk_boxes(labels.shape, labels.chunks, z_range))
    offset = 0
    for box in boxes:  # pass 1: provisional ids, unique over the volume
        mask = np.asarray(mask_source[box]) >= cut
        outside = [z < z_range[0] or z >= z_range[1] for z in range(box[0].start, box[0].stop)]
        mask[np.asarray(outside)] = False
        chunk_labels, count = label_components(mask)  # faces: as across chunk faces below
        chunk_labels = chunk_labels.astype(np.uint32)
        chunk_labels[chunk_labels > 0] += np.uint32(offset)
        labels[box] = chunk_labels
        offset += count
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for box in boxes:  # pass 2: ids touching across the far face of each chunk, per axis
        for axis in range(3):
            stop = box[axis].stop
            if stop >= (z_range[1] if axis == 0 else labels.shape[axis]):
                continue
            here, there = list(box), list(box)
            here[axis], there[axis] = slice(stop - 1, stop), slice(stop, stop + 1)
            a, b = np.asarray(labels[tuple(here)]), np.asarray(labels[tuple(there)])
            touching = (a > 0) & (b > 0)
            pairs.append(np.unique(np.stack([a[touching], b[touching]], axis=1), axis=0))
    edges = np.concatenate(pairs)
    graph = sparse.coo_matrix(
        (np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(offset + 1, offset + 1)
    )
    # Components are numbered in order of their lowest node, so background (node 0) stays 0
    # and the ids come out consecutive.
    count, merged = connected_components(graph, directed=False)
    mapping = merged.astype(np.uint32)
    if not np.array_equal(mapping, np.arange(offset + 1)):
        for box in boxes:  # pass 3: final ids
            labels[box] = mapping[np.asarray(labels[box])]
    return count - 1
