"""Train the U-Net: ``python -m joenet.train [experiment=strided_down] [key=value ...]``."""

from __future__ import annotations

import signal

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from joenet.cli import Preempted, exit_on_error
from joenet.config import config_dir, register_resolvers
from joenet.lit_module import SegmentationLitModule
from joenet.run_info import write_run_info

register_resolvers()


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate each entry of a config group such as ``callbacks``, skipping null ones."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model that ``cfg`` describes and return the final logged metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: SegmentationLitModule = instantiate(cfg.model)
    if cfg.get("init_from"):
        model.init_weights_from(cfg.init_from)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=_instantiate_all(cfg.get("logger")),
    )
    write_run_info(cfg.paths.output_dir, cfg)
    try:
        # weights_only: a resumed checkpoint can hold only tensors and plain values, never code.
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except SIGTERMException:  # SIGTERM outside a training step (validation): a bare SystemExit
        raise Preempted(signal.SIGTERM, None) from None
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@exit_on_error
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric") or "")


if __name__ == "__main__":
    main()
