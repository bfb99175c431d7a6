"""What an exported model carries besides its weights, so that a consumer without joenet
prepares the input and reads the output as joenet does."""

from __future__ import annotations

from typing import Any

import joenet
from joenet.checkpoint import LoadedModel, weights_fingerprint


def halo(receptive_field: int, divisor: int) -> int:
    """Pixels of context to add on each side of a tile: half the receptive field, rounded up
    to the network's divisor (so that a tile plus its halo stays a valid input size)."""
    half = -(-receptive_field // 2)
    return -(-half // divisor) * divisor


def export_metadata(model: LoadedModel, ckpt_path: str, tile: int) -> dict[str, Any]:
    """The ``joenet`` metadata of an export (also the bioimage.io package's ``config``)."""
    return {
        "joenet_version": joenet.__version__,
        "checkpoint": str(ckpt_path),
        "weights_sha256": weights_fingerprint(model.net),
        "class_names": list(model.class_names),
        "input": "raw (batch, 1, height, width) float32 in [0, 1], height and width multiples "
        f"of {model.divisor}",
        "output": "logits (batch, classes, height, width): apply a sigmoid for probabilities",
        "normalization": dict(model.normalization),
        "voxel_size_nm": model.voxel_size_nm,
        "divisor": model.divisor,
        "receptive_field": model.receptive_field,
        "tile": tile,
        "halo": halo(model.receptive_field, model.divisor),
    }
