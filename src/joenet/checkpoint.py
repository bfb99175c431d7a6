"""joenet's checkpoints: written atomically in training, read once (safely) everywhere else.

``read_checkpoint`` is the one place a checkpoint file is opened outside Lightning's resume
(``weights_only=True``, errors that name the file); ``load_model`` rebuilds the network and its
data conventions for prediction and export. Neither imports Lightning (~5 s of every prediction
CLI's start): the network is built from the checkpoint's hyperparameters directly. The trainer's
checkpoint plugin lives in :mod:`joenet.checkpoint_io` (``joenet.checkpoint.AtomicCheckpointIO``
still names it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from joenet.model import DEFAULT_CLASS_NAMES, UNet2d, build_network

_CACHE: dict[tuple[str, str], LoadedModel] = {}
# Lightning stores a data module's state_dict under its class's qualified name
# (``EMDataModule.__qualname__``, tested): spelled out so that loading needs no Lightning.
DATA_STATE_KEY = "EMDataModule"


def __getattr__(name: str) -> Any:
    # Configs written before joenet.checkpoint_io existed name the plugin here.
    if name == "AtomicCheckpointIO":
        from joenet.checkpoint_io import AtomicCheckpointIO

        return AtomicCheckpointIO
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_checkpoint(
    path: str | os.PathLike, key: str = "ckpt_path", plain_state_dict: bool = False
) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, loaded with ``weights_only=True`` onto the CPU.

    Args:
        path: a ``.ckpt`` written by ``python -m joenet.train``.
        key: the config key that named it, for the error message.
        plain_state_dict: also accept a bare ``torch.save(state_dict)`` (returned wrapped as
            ``{"state_dict": ...}``), as ``init_from=`` does.

    Raises:
        FileNotFoundError: no file there.
        ValueError: a file that is not a joenet training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}={path}: no such checkpoint file (expected a .ckpt of a joenet training run, "
            "e.g. logs/train/runs/<date>_<time>/checkpoints/best.ckpt)"
        )
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        # torch's message is a paragraph; its own reason reads "Unsupported global: ..."
        # (an object weights_only refuses: a crafted file) or "Unsupported operand ..." (not
        # a pickle at all).
        found = re.search(r"Unsupported[^\n]*", str(err))
        reason = found.group(0).strip() if found else ""
        if reason.startswith("Unsupported global"):
            raise ValueError(
                f"{key}={path}: refused to load, it holds objects beyond tensors and plain "
                f"values ({reason[:160]}); joenet checkpoints never do, so this file was not "
                "written by joenet.train"
            ) from None
        raise ValueError(
            f"{key}={path}: not a readable checkpoint (unpickling failed: "
            f"{reason[:80] or 'bad data'}); expected a .ckpt written by joenet.train, complete"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # zip/pickle readers' errors
        raise ValueError(
            f"{key}={path}: not a readable checkpoint ({type(err).__name__}: "
            f"{str(err).strip()[:120]}); expected a .ckpt written by joenet.train, complete"
        ) from None
    if plain_state_dict and isinstance(checkpoint, dict) and "state_dict" not in checkpoint:
        checkpoint = {"state_dict": checkpoint}
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{key}={path}: not a joenet training checkpoint (no 'state_dict'; a bare "
            "torch.save(state_dict) has no config to rebuild the network from)"
        )
    return checkpoint


@dataclass(frozen=True)
class LoadedModel:
    """A network in eval mode and the data conventions it was trained with.

    Args:
        net: the ``UNet2d``, in eval mode, on ``device``.
        class_names: one output channel per class, in order.
        voxel_size_nm: (z, y, x) voxel size of the training volume, None when unknown.
        normalization: how raw intensities were mapped to [0, 1] in training, as
            ``joenet.volume.normalize`` takes it (``dtype_range`` or ``fixed`` min/max).
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
    """Rebuild the network of a joenet checkpoint and read its data module's state.

    The file is read once: the network is built from its hyperparameters (the plain values
    ``SegmentationLitModule`` saved) and given the network's part of its ``state_dict`` (the
    EMA weights, when training averaged them).

    Args:
        ckpt_path: a ``.ckpt`` written by ``python -m joenet.train``.
        device: where to put the network.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        ValueError: not a joenet checkpoint, weights that do not fit its own network, or a
            normalisation this joenet does not know.
    """
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path)
    device = torch.device(device)
    hparams = checkpoint.get("hyper_parameters", {})
    class_names = list(hparams.get("class_names") or DEFAULT_CLASS_NAMES)
    net_options = dict(hparams.get("net") or {})
    net = build_network(class_names, net_options)
    load_network_weights(net, checkpoint, f"ckpt_path={path}", net_options)
    net = net.to(device).eval()
    data_state = checkpoint.get(DATA_STATE_KEY)
    if data_state is None:
        warnings.warn(
            f"{path}: no '{DATA_STATE_KEY}' state in the checkpoint; assuming the model's "
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
        class_names=list(data_state.get("class_names") or class_names),
        voxel_size_nm=[float(v) for v in voxel_size] if voxel_size else None,
        normalization=normalization,
        receptive_field=net.receptive_field(),
        divisor=net.divisor,
        device=device,
    )


def load_network_weights(
    net: UNet2d, checkpoint: dict[str, Any], source: str, configured: dict[str, Any]
) -> None:
    """Give ``net`` the network's part (``net.*``) of a training checkpoint's state dict.

    Args:
        net: the network to load into.
        checkpoint: the checkpoint as :func:`read_checkpoint` returns it.
        source: the config key and file, for the error (``ckpt_path=...``).
        configured: the ``model.net`` options ``net`` was built with, for the error.

    Raises:
        ValueError: one line naming the file and both network configs, instead of torch's
            list of every mismatching tensor.
    """
    state = checkpoint["state_dict"]
    weights = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        detail = str(err).splitlines()[1:3] or [str(err)]
        raise ValueError(
            f"{source}: its weights do not fit model.net={configured} "
            f"(trained with net={checkpoint.get('hyper_parameters', {}).get('net')}): "
            + " ".join(line.strip() for line in detail)
        ) from None


# model.net options whose default changed, with the value checkpoints of earlier versions have
# (also where their hyperparameters predate the option).
EARLIER_DEFAULTS: dict[str, Any] = {"norm": "batch"}  # InstanceNorm became the default config's


def resumed_network_options(
    ckpt_path: str | Path, class_names: list[str], configured: dict[str, Any]
) -> dict[str, Any]:
    """The ``model.net`` options to resume ``ckpt_path`` with.

    The configured ones, unless the checkpoint's weights do not fit them and do fit them with
    the checkpoint's values of the options whose default changed since (:data:`EARLIER_DEFAULTS`):
    a run written before a default changed resumes as it was trained. Any other difference is
    the user's and stays, for training's load to report in one line if it does not fit.
    """
    checkpoint = read_checkpoint(ckpt_path)
    trained = dict(checkpoint.get("hyper_parameters", {}).get("net") or {})
    changed = {
        key: trained.get(key, earlier)
        for key, earlier in EARLIER_DEFAULTS.items()
        if configured.get(key) != trained.get(key, earlier)
    }
    source = f"ckpt_path={ckpt_path}"
    options = configured | changed
    if not changed or _fits(checkpoint, class_names, configured, source):
        return configured
    if not _fits(checkpoint, class_names, options, source):
        return configured
    logging.getLogger(__name__).warning(
        "%s: resuming the network it was trained with, %s (the config says %s)",
        source,
        ", ".join(f"model.net.{key}={value}" for key, value in changed.items()),
        ", ".join(f"{key}={configured.get(key)}" for key in changed),
    )
    return options


def _fits(checkpoint: dict[str, Any], class_names: list[str], options: dict, source: str) -> bool:
    try:
        load_network_weights(build_network(class_names, options), checkpoint, source, options)
    except ValueError:
        return False
    return True


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
