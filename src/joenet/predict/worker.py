"""What a process that predicts blocks holds: the job's network, made once, and the block task.

A ``BlockJob`` is plain values, sent to every Dask worker (or used in this process); each process
turns it into its own tile predictor here: the checkpoint's network in its inference form
(BatchNorms folded, its memory format, bf16 weights when compiled for bf16, compiled or loaded
from the compiled cache), made once per process and settings. ``job.device`` and the CPU's bf16
units are looked at here, in the process that predicts, not where the run started.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import zarr
from torch import Tensor

from joenet.checkpoint import cached_model, resolve_device
from joenet.config import cpu_has_bf16_matrix_units
from joenet.predict import work_units as block_ops
from joenet.predict.compiled_cache import package_path
from joenet.predict.fast_path import compiled_weights_dtype, inference_form, prepared_network
from joenet.predict.input_image import open_input
from joenet.predict.tiling import PlanePredictor, autocast_dtype
from joenet.predict.work_units import Block, BlockJob
from joenet.predict.writer import CompletionRecord

log = logging.getLogger(__name__)


def check_cpu_bf16(dtype: torch.dtype | None, device: torch.device, chosen_by_auto: bool) -> None:
    """Refuse bf16 on a CPU that only emulates it when ``precision=auto`` chose it elsewhere.

    The run's precision is resolved once, where it starts (every block in one precision), so on a
    cluster an AMX machine's ``auto`` (bf16) reaches workers whose CPUs have no bf16 units, where
    it runs ~400x slower than fp32: those refuse at once. A ``bf16`` asked for by name only warns.
    """
    if dtype != torch.bfloat16 or device.type != "cpu" or cpu_has_bf16_matrix_units():
        return
    host = socket.gethostname()
    slow = f"the CPU of {host} has no bf16 matrix units (AMX): bf16 runs ~400x slower than fp32"
    if chosen_by_auto:
        raise RuntimeError(
            f"precision=auto chose bf16 where the run started (a CPU with AMX), but {slow}: "
            "start it with precision=32 (and overwrite=true: this output was begun in bf16), "
            "or predict on AMX CPUs or GPUs"
        )
    log.warning("precision=bf16: %s (precision=32 runs fp32)", slow)


@cache
def _prepared(
    ckpt_path: str,
    device: torch.device,
    fold: bool,
    channels_last: bool,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """A checkpoint's network as prediction runs it (``fast_path.prepared_network``), made once
    per process: the compiled cache's key and the network compiled or run both come from it
    (a copy costs ~0.2 s, twice per run before)."""
    return prepared_network(
        cached_model(ckpt_path, device).net, fold=fold, channels_last=channels_last, dtype=dtype
    )


@cache
def _network(
    ckpt_path: str,
    device: torch.device,
    fold: bool,
    channels_last: bool,
    compile: bool,
    input_shape: tuple[int, int, int, int],
    compile_cache: str | None,
    weights_dtype: torch.dtype | None = None,
) -> Callable[[Tensor], Tensor]:
    """The inference form of a checkpoint's network, made (and compiled) once per process."""
    return inference_form(
        _prepared(ckpt_path, device, fold, channels_last, weights_dtype),
        channels_last=channels_last,
        compile=compile,
        input_shape=input_shape,
        compile_cache=None if compile_cache is None else Path(compile_cache),
    )


def tile_batch(batch_size: int | None, device: torch.device) -> int:
    """Tiles per forward pass: ``batch_size``, else 8 on a GPU and 1 on a CPU.

    CPUs predict a 256 px tile faster alone than in a batch of 8 (0.22-0.25 s against
    0.38-0.48 s per tile on 2 AVX2 cores: activations stay in cache); GPUs want batches.
    """
    return batch_size or (8 if device.type == "cuda" else 1)


def compile_cache_for(job: BlockJob, device: torch.device) -> str | None:
    """The compiled cache ``job`` may use on ``device``: CPUs in fp32 or bf16. An ahead-of-time
    package is a plain graph, blind to autocast: bf16 is compiled as a bf16 network
    (``fast_path.compiled_weights_dtype``), fp16 (and GPUs, unmeasured) compile in-process."""
    dtype = autocast_dtype(job.precision, device)
    cached_dtype = dtype is None or dtype == torch.bfloat16
    return job.compile_cache if device.type == "cpu" and cached_dtype else None


def weights_dtype_for(
    job: BlockJob, device: torch.device, compiled: bool | None = None
) -> torch.dtype | None:
    """The dtype ``job``'s network runs its weights in on ``device`` (``compiled``, default
    ``job.compile``): bf16 when compiled for bf16, else as trained (eager bf16/fp16 run under
    autocast)."""
    if not (job.compile if compiled is None else compiled):
        return None
    return compiled_weights_dtype(autocast_dtype(job.precision, device))


def compiled_is_cached(job: BlockJob, device: torch.device) -> bool:
    """Whether the network ``job`` runs on ``device`` is compiled in its cache already."""
    cache = compile_cache_for(job, device)
    if cache is None:
        return False
    dtype = weights_dtype_for(job, device, compiled=True)
    ready = _prepared(job.ckpt_path, device, job.fold_batchnorms, job.channels_last, dtype)
    shape = (tile_batch(job.batch_size, device), 1, job.tile, job.tile)
    return package_path(ready, shape, job.channels_last, Path(cache)).exists()


@cache
def make_predictor(job: BlockJob) -> PlanePredictor:
    """The tile predictor that ``job`` asks for, made once per process and settings.

    ``job.device`` is resolved here, in the process that predicts: with ``auto``, a Dask worker
    on a GPU node uses its GPU even when the client that submitted the job has none.
    """
    device = resolve_device(job.device)
    check_cpu_bf16(autocast_dtype(job.precision, device), device, job.precision_by_auto)
    batch_size = tile_batch(job.batch_size, device)
    shape = (batch_size, 1, job.tile, job.tile)
    cache = compile_cache_for(job, device)
    net = _network(
        job.ckpt_path,
        device,
        job.fold_batchnorms,
        job.channels_last,
        job.compile,
        shape,
        cache,
        weights_dtype_for(job, device),
    )
    return PlanePredictor(
        net,
        device,
        batch_size=batch_size,
        precision=job.precision,
        tta=job.tta,
        blending=job.blending,  # type: ignore[arg-type]
    )


def process_block(job: BlockJob, block: Block) -> tuple[int, int, int]:
    """Read, predict, write and record one block in this process (a Dask task)."""
    image = open_input(job.input_path)
    inputs = block_ops.read_block(job, image, block)
    values = block_ops.compute_block(job, make_predictor(job), inputs)
    block_ops.write_block(zarr.open_group(job.output_path, mode="r+"), job, block, values)
    if block_ops.is_whole(job, block):  # a partly predicted block is predicted again by a later run
        CompletionRecord(job.output_path).mark_done(block.index)
    return block.index
