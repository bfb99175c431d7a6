"""What identifies a prediction output: the attributes that say what made it, and the fingerprint
that a rerun must match to resume it rather than mix two models' or two settings' outputs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import joenet
from joenet.checkpoint import weights_fingerprint
from joenet.predict.input_image import InputImage
from joenet.predict.work_units import BlockJob

# Settings that change the values written; the fast path (fold, channels_last, compile) only
# rounds differently and stays out, so an output made one way resumes the other.
_FINGERPRINT_KEYS = ("tile", "overlap", "blending", "tta", "threshold")


def output_attrs(
    job: BlockJob,
    input: str | os.PathLike,
    config: Mapping[str, Any] | None,
    voxel_size: Sequence[float] | None,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    """The output group's ``joenet`` attributes: what made it, and what a rerun must match."""
    return {
        "checkpoint": job.ckpt_path,
        "version": joenet.__version__,
        "input": str(input),
        "config": dict(config or {}),
        "class_names": list(job.class_names),
        "values": "mask 0/1" if job.threshold is not None else "probability x 255",
        "voxel_size_nm": voxel_size,
        "fingerprint": fingerprint,
    }


def output_fingerprint(
    job: BlockJob,
    net: torch.nn.Module,
    image: InputImage,
    normalization: Mapping[str, Any],
    compute_dtype: torch.dtype | None,
    arrays: Mapping[str, str],
    block_size: int,
) -> dict[str, Any]:
    """What must match for a rerun to resume an output.

    ``z_range`` may differ (it picks blocks); ``batch_size`` and the executor change the order
    of work, not the values. The weights count by content: a model retrained into the same path
    must not finish another model's output.
    """
    return {
        "weights": weights_fingerprint(net),
        "input": job.input_path,
        "shape": list(image.shape),
        "chunks": list(image.chunks),
        "normalization": dict(normalization),
        "precision": str(compute_dtype or torch.float32).removeprefix("torch."),
        "arrays": dict(arrays),
        **{key: getattr(job, key) for key in _FINGERPRINT_KEYS},
        "planes": list(job.planes),
        "block_size": block_size,
        "version": joenet.__version__,
    }
