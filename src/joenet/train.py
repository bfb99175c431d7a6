"""Train the U-Net: ``python -m joenet.train [experiment=strided_down] [key=value ...]``."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from joenet.checkpoint import resumed_network_options
from joenet.cli import Preempted, exit_on_error
from joenet.config import config_dir, register_resolvers
from joenet.hydra_ddp import ddp_scope_per_job, use_job_command_for_ddp_ranks
from joenet.lit_module import SegmentationLitModule
from joenet.model import DEFAULT_CLASS_NAMES
from joenet.run_info import write_run_info
from joenet.run_summary import BestMetrics, summarize_run

register_resolvers()


class _NoAdvertising(logging.Filter):
    """Drop Lightning's tip to install its cloud logger: not ours to print to every user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertising())
use_job_command_for_ddp_ranks()


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate each entry of a config group such as ``callbacks``, skipping null ones."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


def keep_resumed_network(cfg: DictConfig) -> None:
    """With ``ckpt_path=<file>``, keep the checkpoint's values of network options whose default
    changed since it was written (see :func:`~joenet.checkpoint.resumed_network_options`), so
    that an old run resumes whatever the defaults have become.
    """
    # "last"/"hpc" are Lightning's names for a run's own checkpoints, resumed with its own config.
    if not cfg.get("ckpt_path") or not Path(str(cfg.ckpt_path)).is_file() or "net" not in cfg.model:
        return
    configured = OmegaConf.to_container(cfg.model.net, resolve=True)
    assert isinstance(configured, dict)
    options = resumed_network_options(
        cfg.ckpt_path, list(cfg.model.get("class_names") or DEFAULT_CLASS_NAMES), configured
    )
    with open_dict(cfg):
        cfg.model.net = options


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model that ``cfg`` describes; print and write its summary (``summary.json``).

    Returns:
        The final logged metrics, and ``best/<name>`` for the validation metrics of the best
        validation by ``cfg.monitor`` (what a sweeper optimises).
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    keep_resumed_network(cfg)
    model: SegmentationLitModule = instantiate(cfg.model)
    if cfg.get("init_from"):
        model.init_weights_from(cfg.init_from)
    best = BestMetrics(cfg.get("monitor") or "val/dice", cfg.get("monitor_mode") or "max")
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*_instantiate_all(cfg.get("callbacks")), best],
        logger=_instantiate_all(cfg.get("logger")),
    )
    write_run_info(cfg.paths.output_dir, cfg)
    started = time.monotonic()
    with ddp_scope_per_job():
        try:
            # weights_only: a resumed checkpoint holds only tensors and plain values, never code.
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
            )
        except SIGTERMException:  # SIGTERM outside a training step (validation): a SystemExit
            raise Preempted(signal.SIGTERM, None) from None
        try:
            summarize_run(trainer, model, cfg, best, time.monotonic() - started)
        except Exception as err:  # the checkpoints are written: a summary must not fail the run
            logging.getLogger(__name__).warning("no run summary: %s: %s", type(err).__name__, err)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    return metrics | {f"best/{name}": value for name, value in best.metrics.items()}


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@exit_on_error
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the best ``cfg.optimized_metric`` for sweepers."""
    metrics = train(cfg)
    name = cfg.get("optimized_metric") or ""
    return metrics.get(f"best/{name}", metrics.get(name))


if __name__ == "__main__":
    main()
