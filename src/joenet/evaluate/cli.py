"""``python -m joenet.evaluate prediction=... truth=...``: the Hydra command."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from joenet.cli import exit_on_error
from joenet.config import call_target, config_dir, register_resolvers
from joenet.evaluate.report import format_table

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
@exit_on_error
def main(cfg: DictConfig) -> None:
    """Hydra entry point: evaluate, write the report into the run directory, print a table."""
    out_dir = cfg.out_dir or cfg.paths.output_dir
    config = OmegaConf.to_container(cfg, resolve=True)
    results = call_target(cfg, out_dir=out_dir, config=config)
    print(format_table(results))
    print(f"report: {Path(out_dir) / 'metrics.json'}")
