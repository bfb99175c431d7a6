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
from joenet.config import call_target, config_dir, register_resolvers

register_resolvers()
log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> Path:
    """Run the config's ``_target_`` (``predict_volume``) with its keys; the output path."""
    output = call_target(cfg, config=OmegaConf.to_container(cfg, resolve=True))
    log.info("predictions written to %s", output)
    return output


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
@exit_on_error
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    predict(cfg)


if __name__ == "__main__":
    main()
