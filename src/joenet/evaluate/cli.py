"""``python -m joenet.evaluate prediction=... truth=...``: the Hydra command."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from joenet.cli import exit_on_error
from joenet.config import config_dir, register_resolvers
from joenet.evaluate.report import evaluate, format_table

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
@exit_on_error
def main(cfg: DictConfig) -> None:
    """Hydra entry point: evaluate, write the report into the run directory, print a table."""
    out_dir = cfg.out_dir or cfg.paths.output_dir
    z_range = list(cfg.z_range) if cfg.z_range is not None else None
    slices = list(cfg.slices) if cfg.slices is not None else None
    config = OmegaConf.to_container(cfg, resolve=True)
    results = evaluate(cfg.prediction, cfg.truth, out_dir, z_range, cfg.threshold, slices,
                       cfg.iou_match, cfg.instances, config)  # fmt: skip
    print(format_table(results))
    print(f"report: {Path(out_dir) / 'metrics.json'}")
