"""Predict a zarr volume: ``python -m joenet.predict ckpt_path=... input=... output=...``.

Writes an OME-Zarr (NGFF 0.5) with one uint8 array per class (probability x 255, or 0/1 with
``threshold``), block by block; running the same command again resumes a killed run. Every option
is a key of ``conf/predict.yaml``; the work is done by :func:`joenet.predict.predict_volume`,
usable without Hydra. Running on a Dask cluster, SLURM or several GPUs: see
:mod:`joenet.predict.executor`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from joenet.cli import exit_on_error
from joenet.config import config_dir, register_resolvers
from joenet.predict import predict_volume

register_resolvers()
log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> Path:
    """Run ``predict_volume`` with the values of a composed ``predict`` config."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    options = {key: resolved[key] for key in (
        "tile", "overlap", "blending", "batch_size", "precision", "tta", "planes", "threshold",
        "instances", "device", "executor", "n_workers", "scheduler_address", "z_range",
        "block_size", "overwrite", "progress",
    )}  # fmt: skip
    output = predict_volume(
        resolved["ckpt_path"], resolved["input"], resolved["output"], config=resolved, **options
    )
    log.info("predictions written to %s", output)
    return output


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
@exit_on_error
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    predict(cfg)


if __name__ == "__main__":
    main()
