"""``python -m joenet.export ckpt_path=... format=torchscript|onnx|bioimageio output=...``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from joenet.cli import exit_on_error
from joenet.config import call_target, config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
@exit_on_error
def main(cfg: DictConfig) -> None:
    """Hydra entry point: export, check the export against the checkpoint, say where it is."""
    result = call_target(cfg)
    print(f"wrote {result}")
