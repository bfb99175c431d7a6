"""What a finished training run reached: printed at its end, written to ``summary.json``.

``BestMetrics`` follows the run's monitor through training (and across a resume, as callback
state in the checkpoint); ``summarize_run`` then prints the best validation metrics per class
and the epoch they came from, where ``best.ckpt`` and ``last.ckpt`` are, how long it took, and
the next commands, and gives TensorBoard's HParams view the run's hyperparameters with them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from joenet.callbacks import last_checkpoint_path
from joenet.metrics import LOGGED_METRICS
from joenet.model.cost import count_gflops, count_parameters

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"


class BestMetrics(L.Callback):
    """The validation metrics of the best validation so far by ``monitor``, and when it was.

    Args:
        monitor: the logged metric that decides (the run's ``monitor``, as for ``best.ckpt``).
        mode: ``max`` or ``min``.
    """

    def __init__(self, monitor: str = "val/dice", mode: str = "max") -> None:
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.metrics: dict[str, float] = {}
        self.epoch: int | None = None
        self.step: int | None = None
        self.validations = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.validations += 1
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (
            value > self.best if self.mode == "max" else value < self.best
        )
        if better:
            self.best, self.epoch, self.step = value, trainer.current_epoch, trainer.global_step
            self.metrics = {
                name: float(metric)
                for name, metric in trainer.callback_metrics.items()
                if name.startswith("val/")
            }

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("best", "metrics", "epoch", "step", "validations")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            setattr(self, key, value)


def _stop_reason(trainer: L.Trainer) -> str:
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch > 0:
            return (
                f"early stopping ({callback.monitor} did not improve for "
                f"{callback.patience} validations)"
            )
        budget = getattr(callback, "_duration", None) if isinstance(callback, Timer) else None
        if budget is not None and callback.time_elapsed() >= budget:
            return f"the time budget (trainer.max_time, {budget:.0f} s)"
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return f"max_steps={trainer.max_steps}"
    return f"max_epochs={trainer.max_epochs}"


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's hyperparameters for TensorBoard's HParams view, flattened with ``/``."""
    chosen = {
        "model": {k: v for k, v in cfg.model.items() if not str(k).startswith("_")},
        "data": {k: cfg.data.get(k) for k in ("patch_size", "batch_size", "foreground_fraction")},
        "augment": cfg.data.get("augment"),
        "trainer": {k: cfg.trainer.get(k) for k in ("accumulate_grad_batches", "max_epochs")},
        "seed": cfg.get("seed"),
    }
    container = OmegaConf.to_container(OmegaConf.create(chosen), resolve=True)
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(f"{prefix}/{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node if isinstance(node, int | float | str | bool) else str(node)

    walk("", container)
    return flat


def _table(metrics: Mapping[str, float], class_names: list[str]) -> list[str]:
    lines = [f"  {'class':<10}" + "".join(f"{name:>11}" for name in LOGGED_METRICS)]
    for name in class_names:
        values = [metrics.get(f"val/{metric}_{name}") for metric in LOGGED_METRICS]
        if all(v is None for v in values):
            lines.append(f"  {name:<10}   (no labels)")
            continue
        lines.append(
            f"  {name:<10}" + "".join(f"{'-':>11}" if v is None else f"{v:>11.4f}" for v in values)
        )
    return lines


def summarize_run(
    trainer: L.Trainer, model: L.LightningModule, cfg: DictConfig, best: BestMetrics, seconds: float
) -> dict[str, Any]:
    """Write ``summary.json`` into the run directory, print the summary, log the HParams.

    Only the global rank 0 writes and prints; every rank returns the summary.
    """
    output_dir = Path(cfg.paths.output_dir)
    best_path = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    last_path = last_checkpoint_path(trainer)
    class_names = list(cfg.model.class_names)
    patch = int(cfg.data.patch_size)
    world = trainer.world_size
    batches = trainer.fit_loop.epoch_loop.batch_progress.total.completed
    patches = int(batches * int(cfg.data.batch_size) * world)
    net = model.net  # type: ignore[attr-defined]
    summary = {
        "monitor": best.monitor,
        "best": best.best,
        "best_epoch": best.epoch,
        "best_step": best.step,
        "best_metrics": best.metrics,
        # In patches: a time budget or a preemption may end a run inside an epoch.
        "epochs": round(patches / int(cfg.data.patches_per_epoch), 2),
        "steps": trainer.global_step,
        "validations": best.validations,
        "patches": patches,
        "wall_seconds": round(seconds, 1),
        "patches_per_second": round(patches / seconds, 3) if seconds > 0 else None,
        "parameters": count_parameters(net),
        "gflops_per_patch": round(count_gflops(_cpu_copy(net), False, (1, 1, patch, patch)), 3),
        "patch_size": patch,
        "stopped_by": _stop_reason(trainer),
        "best_ckpt": best_path,
        "last_ckpt": str(last_path) if last_path.is_file() else None,
    }
    if not trainer.is_global_zero:
        return summary
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    hp_metrics = {f"best/{name}": value for name, value in best.metrics.items()}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and hp_metrics:
            logger.log_hyperparams(_hparams(cfg), metrics=hp_metrics)
            logger.finalize("success")
    print("\n".join(_summary_lines(summary, cfg, class_names)), flush=True)
    return summary


def _cpu_copy(net: Any) -> Any:
    import copy

    original = getattr(net, "_orig_mod", net)  # a compiled network's eager module
    return copy.deepcopy(original).cpu().float()


def _summary_lines(
    summary: Mapping[str, Any], cfg: DictConfig, class_names: list[str]
) -> list[str]:
    minutes, seconds = divmod(int(summary["wall_seconds"]), 60)
    lines = [
        "",
        f"joenet: training finished after {minutes} min {seconds:02d} s, stopped by "
        f"{summary['stopped_by']}: {summary['epochs']:g} epochs, {summary['steps']} steps, "
        f"{summary['patches']:,} patches ({summary['patches_per_second']} patches/s)",
    ]
    if summary["best"] is None:
        lines.append(f"  no validation logged {summary['monitor']}: no best metrics")
    else:
        lines.append(
            f"best {summary['monitor']} {summary['best']:.4f} at epoch {summary['best_epoch']} "
            f"(step {summary['best_step']}):"
        )
        lines += _table(summary["best_metrics"], class_names)
    best_ckpt = summary["best_ckpt"] or "(none written)"
    lines += [
        f"checkpoints: best {best_ckpt}",
        f"             last {summary['last_ckpt'] or '(none written)'}",
        "next:",
        # The folder of this run's siblings (runs/ or the multirun), so TensorBoard compares them.
        f"  tensorboard --logdir {Path(cfg.paths.output_dir).parent}",
    ]
    volume = cfg.data.get("path") or "<volume.zarr>"
    output = Path(cfg.paths.output_dir) / "prediction.zarr"
    if summary["best_ckpt"]:
        lines.append(
            f"  python -m joenet.predict ckpt_path={summary['best_ckpt']} input={volume} "
            f"output={output}"
        )
    return lines
