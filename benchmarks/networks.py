"""The networks the speed benchmarks measure: the default config's or the seed's.

``default`` is the network ``python -m joenet.train`` builds (``conf/model/unet2d.yaml``'s
``net``: 16-32-64-128-256, InstanceNorm, no input norm at the time of writing), read from the
config so that a benchmark follows the default when it changes; ``seed`` is ``UNet2d()``'s own
defaults, the seed's literal 32-64-128-256 with BatchNorm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from joenet.config import config_dir
from joenet.model import UNet2d

NETWORKS = ("default", "seed")


def net_kwargs(kind: str) -> dict[str, Any]:
    """``UNet2d`` keyword arguments of ``kind`` (``default`` or ``seed``)."""
    if kind == "seed":
        return {}
    if kind != "default":
        raise ValueError(f"--net must be one of {', '.join(NETWORKS)}, got {kind!r}")
    net = OmegaConf.load(config_dir() / "model" / "unet2d.yaml").net
    return OmegaConf.to_container(net, resolve=True)  # type: ignore[return-value]


def inference_ready(kind: str, seed: int = 0) -> UNet2d:
    """The network in eval mode, its BatchNorms (if any) with running statistics other than
    the initial 0 / 1, as a trained network's are, so that folding them is not a no-op."""
    torch.manual_seed(seed)
    net = UNet2d(**net_kwargs(kind)).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(4, 1, 128, 128))
    return net.eval()


def write_random_checkpoint(path: Path, net: dict[str, Any]) -> None:
    """A joenet checkpoint of ``UNet2d(**net)`` with random weights, loadable by prediction:
    what ``EMDataModule.state_dict()`` saves in a real one (classes, patch, voxel size, norm)."""
    import lightning

    from joenet.lit_module import SegmentationLitModule

    torch.manual_seed(0)
    module = SegmentationLitModule(net=net)
    data_state = {
        "class_names": ["nuclei", "mito"],
        "patch_size": 256,
        "voxel_size_nm": [8, 8, 8],
        "normalization": {"kind": "dtype_range"},
    }
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "EMDataModule": data_state,
    }
    torch.save(checkpoint, path)
