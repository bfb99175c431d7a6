"""``predict_volume``: a checkpoint and a zarr volume in, an OME-Zarr of class predictions out."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from joenet.checkpoint import cached_model, resolve_device
from joenet.predict import checks
from joenet.predict.compiled_cache import resolve_cache_dir
from joenet.predict.executor import run_dask, run_local
from joenet.predict.fast_path import (
    check_compile,
    check_switch,
    resolve_channels_last,
    resolve_compile,
)
from joenet.predict.input_image import InputImage, open_input
from joenet.predict.output_identity import output_attrs, output_fingerprint
from joenet.predict.tiling import (
    autocast_dtype,
    check_tiling,
    per_sample_norm,
    precision_name,
    tile_margin,
    tile_step,
)
from joenet.predict.viewer_levels import (
    prepare_block_levels,
    update_viewer_levels,
    write_block_levels,
)
from joenet.predict.work_units import Block, BlockJob, count_tiles, make_blocks
from joenet.predict.worker import compiled_is_cached
from joenet.predict.writer import LEVELS_FLAGS, CompletionRecord, check_output, open_output
from joenet.volume import check_z_range
from joenet.volume.components import label_instances
from joenet.volume.output_lock import exclusive_output

log = logging.getLogger(__name__)
_INSTANCES_RECORD = "instances_z_ranges"  # z ranges whose instance labels are complete


def _absolute(path: str | os.PathLike) -> str:
    return str(path) if "://" in str(path) else str(Path(path).resolve())


def _hashable(mapping: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (key, tuple(value) if isinstance(value, list) else value)
        for key, value in sorted(mapping.items())
    )


def _pending_blocks(
    output: str | os.PathLike,
    image: InputImage,
    planes: tuple[str, ...],
    block_size: int,
    tile: int,
    z_range: tuple[int, int],
) -> tuple[CompletionRecord, list[Block], list[Block]]:
    """The output's completion record, all blocks of ``z_range`` and those not yet done."""
    blocks, grid = make_blocks(image.shape, image.chunks, planes, block_size, tile, z_range)
    record = CompletionRecord(output)
    record.create(grid)
    done = record.done()
    pending = [block for block in blocks if block.index not in done]
    log.info(
        "%d blocks, %d already done, %d to predict",
        len(blocks),
        len(blocks) - len(pending),
        len(pending),
    )
    return record, blocks, pending


def _label_instances(group: Any, record: CompletionRecord, job: BlockJob, changed: bool) -> None:
    """Connected components of each class's mask into ``<class>_instances``, once per z range
    (again when blocks were predicted since)."""
    z_range = list(job.z_range)
    labelled = record.attrs().get(_INSTANCES_RECORD, [])
    if not changed and z_range in labelled:
        return
    cut = 1 if job.threshold is not None else 128  # probability >= 0.5 on the x 255 scale
    for name in job.class_names:
        count = label_instances(group[name], group[f"{name}_instances"], cut, job.z_range)
        log.info("%s: %d instances", name, count)
    record.update_attrs({_INSTANCES_RECORD: [*labelled, z_range]})


def _block_levels_writer(
    group: Any, record: CompletionRecord, job: BlockJob
) -> Callable[[Block, np.ndarray], None] | None:
    """What the local executor runs after writing a block: its class arrays' viewer levels from
    the values in memory, overlapped with the next block (instead of re-reading every array
    after the run), and the block's ``levels`` flag. None: the volume has no levels."""
    targets = prepare_block_levels(group, job.class_names)
    if targets is None:
        return None
    record.create(record.grid_shape(), LEVELS_FLAGS)  # only now: a finished output stays as is
    shape, labels = group[job.class_names[0]].shape, job.threshold is not None

    def write(block: Block, values: np.ndarray) -> None:
        if write_block_levels(targets, shape, labels, block.region, values):
            record.mark_done(block.index, LEVELS_FLAGS)

    return write


def predict_volume(
    ckpt_path: str | os.PathLike,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    tile: int = 256,
    overlap: int = 64,
    blending: Literal["gaussian", "constant"] = "gaussian",
    batch_size: int | None = None,
    precision: str = "auto",
    tta: bool = False,
    planes: str | Sequence[str] = "xy",
    threshold: float | None = None,
    instances: bool = False,
    device: str = "auto",
    executor: Literal["local", "dask"] = "local",
    n_workers: int = 2,
    scheduler_address: str | None = None,
    z_range: Sequence[int] | None = None,
    block_size: int = 2048,
    overwrite: bool = False,
    check_free_space: bool = True,
    fold_batchnorms: bool = True,
    channels_last: bool | str = "auto",
    compile: bool | str = "auto",
    compile_cache: bool | str | os.PathLike | None = "auto",
    viewer_levels: bool = True,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Predict every class of a checkpoint over a zarr volume, block by block, resumably.

    Running it again with the same arguments after a kill finishes the missing blocks only and
    gives the same bytes as an uninterrupted run. One process writes an output at a time: a
    second one started into it refuses at once (``<output>.lock``, see
    :mod:`joenet.volume.output_lock`).

    Args:
        ckpt_path: a checkpoint of ``python -m joenet.train``.
        input: a zarr group holding ``raw``, or a (z, y, x) zarr array.
        output: the OME-Zarr group to write (one uint8 array per class at the top level).
        tile: tile side in px, a multiple of 16.
        overlap: px shared by neighbouring tiles, a multiple of 16, less than ``tile``.
        blending: weights of overlapping tiles, ``gaussian`` or ``constant``.
        batch_size: tiles per forward pass; None: 8 on a GPU, 1 on a CPU (faster there).
        precision: ``auto`` (bf16 on CUDA GPUs with bf16 and on CPUs with AMX, fp32
            otherwise: ``tiling.autocast_dtype``), ``32``, ``bf16`` or ``16``.
        tta: average the 8 flips/rotations of every tile, in probability.
        planes: ``xy``, or ``xy,xz,yz`` to average the 2D model over the three orientations.
        threshold: None writes probability x 255; a float writes 0/1 masks (probability >= it).
        instances: also write ``<class>_instances`` (uint32 connected components of the mask at
            ``threshold``, 0.5 when None; 6-connected in 3D, ids consistent over the volume).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        executor: ``local`` (this process) or ``dask`` (one task per block).
        n_workers: worker processes of the Dask ``LocalCluster``.
        scheduler_address: use this running Dask cluster instead of a ``LocalCluster``.
        z_range: [start, stop) slices to predict; the others keep the fill value 0.
        block_size: y/x side of a block in px (rounded up to whole chunks).
        overwrite: replace an earlier joenet prediction at ``output`` instead of resuming it.
            Nothing else is ever replaced: an output that is the input, lies inside it or
            contains it, or an existing path that is not a joenet prediction, is refused with
            or without it (an empty directory is used as a new output).
        fold_batchnorms: fold each BatchNorm that directly follows a conv into it (the same
            function up to float rounding: logits within 1e-5, levels at most 1 apart; not part
            of the resume fingerprint).
        channels_last: run the network in channels_last memory format (1.13x per tile on a CPU
            for BatchNorm networks, 0.91x for InstanceNorm ones eager, 1.08x compiled);
            ``auto``: channels_last except for per-sample-norm networks run eager on a CPU.
        compile: compile the network with freezing (1.5-1.7x per tile on a CPU); ``auto``: on
            a CPU from 1,000 tiles, from 100 when it is in ``compile_cache`` (float rounding
            only, not part of the resume fingerprint; ``predict/fast_path.py``).
        compile_cache: where CPU fp32 and bf16 prediction keeps networks compiled ahead of time
            (``predict/compiled_cache.py``): ``auto`` (``$JOENET_CACHE_DIR``, else
            ``~/.cache/joenet``), a directory, or false (``torch.compile`` in each run).
        viewer_levels: also write scale levels of every array (``<class>_s1``, ...) and the
            label arrays as NGFF label images under ``labels/`` (``predict/viewer_levels.py``),
            so napari and neuroglancer open the output smoothly.
        check_free_space: refuse before predicting when the output's disk has less free space
            than the blocks left to write take uncompressed.
        progress: show a progress bar.
        config: the resolved config to store in the output's attributes.

    Returns:
        The output path.
    """
    checks.check_options(tile, overlap, executor, threshold, block_size)
    plane_names = checks.parse_planes(planes)
    torch_device = resolve_device(device)
    compute_dtype = autocast_dtype(precision, torch_device)  # validates it before any work
    compile = check_compile(compile)
    check_switch(channels_last, "channels_last")
    cache_dir = resolve_cache_dir(compile_cache)
    image = open_input(input)
    check_output(output, input)  # before anything is written, the lock file included
    with exclusive_output(output, "joenet.predict"):
        earlier = check_output(output, input)  # again: another run may have written meanwhile
        model = cached_model(ckpt_path, torch_device)
        voxel_size = image.voxel_size_nm
        checks.check_voxel_size(voxel_size, model.voxel_size_nm, str(input))
        normalization = checks.input_normalization(image, model.normalization)
        depth = image.shape[0]
        z_range = check_z_range(z_range, depth, str(input), "z_range")
        grid = tile_step(model.divisor)
        check_tiling(tile, overlap, grid)  # a 6-level network places tiles on 32 px, not 16
        checks.check_overlap(overlap, model.receptive_field, grid, per_sample_norm(model.net))
        # channels_last=auto depends on whether the network runs compiled, decided below
        eager_layout = resolve_channels_last(channels_last, model.net, torch_device)
        compiled_layout = resolve_channels_last(
            channels_last, model.net, torch_device, compiled=True
        )
        job = BlockJob(
            ckpt_path=str(Path(ckpt_path).resolve()),
            input_path=_absolute(input),  # workers may run elsewhere: no relative paths
            output_path=_absolute(output),
            class_names=tuple(model.class_names),
            tile=tile,
            overlap=overlap,
            margin=tile_margin(overlap, model.receptive_field),
            blending=blending,
            batch_size=batch_size,
            # resolved here: Dask workers on other CPUs must not each pick their own (a resumed
            # output mixing bf16 and fp32 blocks), and the fingerprint records this one
            precision=precision_name(compute_dtype),
            tta=bool(tta),
            planes=plane_names,
            threshold=None if threshold is None else float(threshold),
            device=device,  # resolved by the process that predicts (a GPU worker: its GPU)
            z_range=z_range,
            normalization=_hashable(normalization),
            fold_batchnorms=bool(fold_batchnorms),
            channels_last=compiled_layout,  # the compiled form's: what the cache is keyed on
            compile_cache=None if cache_dir is None else str(cache_dir),
            grid=grid,
            precision_by_auto=str(precision) == "auto",
        )
        arrays = {name: "uint8" for name in job.class_names}
        if instances:
            arrays |= {f"{name}_instances": "uint32" for name in job.class_names}
        fingerprint = output_fingerprint(
            job, model.net, image, normalization, compute_dtype, arrays, block_size
        )
        attrs = output_attrs(job, input, config, voxel_size, fingerprint)
        group = open_output(
            output,
            arrays,
            image.shape,
            image.chunks,
            job.class_names,
            voxel_size,
            attrs,
            earlier,
            overwrite=overwrite,
        )
        record, blocks, pending = _pending_blocks(
            output, image, plane_names, block_size, tile, z_range
        )
        if check_free_space:
            checks.check_free_space(str(output), pending, arrays)
        tiles = count_tiles(job, image.shape, pending)
        compiled = resolve_compile(compile, torch_device, tiles)
        if not compiled and resolve_compile(compile, torch_device, tiles, cached=True):
            # looked up (a prepared copy of the network hashed) only where the cache decides
            compiled = compiled_is_cached(job, torch_device)
        job = dataclasses.replace(
            job, compile=compiled, channels_last=compiled_layout if compiled else eager_layout
        )
        log.info("%d tiles to predict, %s", tiles, "compiled" if job.compile else "eager")
        if executor == "dask":
            run_dask(job, pending, len(blocks), n_workers, scheduler_address, progress)
        else:
            block_levels = None
            if viewer_levels and pending:
                block_levels = _block_levels_writer(group, record, job)
            run_local(job, pending, len(blocks), progress, block_levels)
        if instances:
            _label_instances(group, record, job, bool(pending))
        if viewer_levels:
            update_viewer_levels(group, record, job, blocks, bool(pending), instances, voxel_size)
    return Path(output)
