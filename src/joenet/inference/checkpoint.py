"""Load a training checkpoint for prediction: the network plus what it knows about its data."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_DATA_STATE_KEY = "EMDataModule"  # where Lightning saves EMDataModule.state_dict()
_CACHE: dict[tuple[str, str], LoadedModel] = {}


@dataclass(frozen=True)
class LoadedModel:
    """A network in eval mode and the data conventions it was trained with.

    Args:
        net: the ``UNet2d``, in eval mode, on ``device``.
        class_names: one output channel per class, in order.
        voxel_size_nm: (z, y, x) voxel size of the training volume, None when unknown.
        normalization: how raw intensities were mapped to [0, 1] in training, as
            ``joenet.data.volume.normalize`` takes it (``dtype_range`` or ``fixed`` min/max).
        receptive_field: theoretical receptive field of the network in pixels.
        divisor: input height and width must be multiples of this.
        device: where ``net`` lives.
    """

    net: nn.Module
    class_names: list[str]
    voxel_size_nm: list[float] | None
    normalization: dict[str, Any]
    receptive_field: int
    divisor: int
    device: torch.device


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(ckpt_path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network of a joenet checkpoint and read its ``EMDataModule`` state.

    Args:
        ckpt_path: a ``.ckpt`` written by ``python -m joenet.train``.
        device: where to put the network.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        ValueError: the checkpoint uses a normalisation this joenet does not know.
    """
    from joenet.lit_module import SegmentationLitModule  # Lightning import: only when loading

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such checkpoint file (expected a .ckpt of a joenet training run, "
            "e.g. logs/train/runs/<date>_<time>/checkpoints/best.ckpt)"
        )
    device = torch.device(device)
    module = SegmentationLitModule.load_from_checkpoint(
        path, weights_only=True, map_location=device
    )
    net = module.net.eval()
    data_state = torch.load(path, weights_only=True, map_location="cpu").get(_DATA_STATE_KEY)
    if data_state is None:
        warnings.warn(
            f"{path}: no '{_DATA_STATE_KEY}' state in the checkpoint; assuming the model's "
            "class names, dtype-range normalisation (uint8 / 255) and an unknown voxel size",
            stacklevel=2,
        )
        data_state = {}
    normalization = dict(data_state.get("normalization") or {"kind": "dtype_range"})
    if normalization.get("kind") not in ("dtype_range", "fixed"):
        raise ValueError(
            f"{path}: normalization {normalization} is not supported by this joenet "
            "(expected kind 'dtype_range' or 'fixed'); predict with the joenet that trained it"
        )
    voxel_size = data_state.get("voxel_size_nm")
    return LoadedModel(
        net=net,
        class_names=list(data_state.get("class_names") or module.hparams.class_names),
        voxel_size_nm=[float(v) for v in voxel_size] if voxel_size else None,
        normalization=normalization,
        receptive_field=net.receptive_field(),
        divisor=net.divisor,
        device=device,
    )


def weights_fingerprint(net: nn.Module) -> str:
    """SHA-256 of a network's architecture and every tensor of its state dict.

    Content, not the file: a model retrained into the same checkpoint path (same size, same
    time resolution) gets another fingerprint, the same weights saved elsewhere the same one.
    ``repr`` covers what the state dict does not hold (activations, interpolation modes).
    """
    digest = hashlib.sha256(repr(net).encode())
    for name, tensor in sorted(net.state_dict().items()):
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{value.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def cached_model(ckpt_path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """``load_model`` once per process and checkpoint (a Dask worker: for its first block)."""
    key = (str(Path(ckpt_path).resolve()), str(torch.device(device)))
    if key not in _CACHE:
        _CACHE[key] = load_model(ckpt_path, device)
    return _CACHE[key]
