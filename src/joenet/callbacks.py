"""Lightning callbacks of joenet."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, Timer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import default_collate

from joenet.cli import Preempted


class ValidationImageLogger(L.Callback):
    """Log ``input | ground truth | prediction`` panels of fixed validation patches to TensorBoard.

    One image per class (tag ``val/images_<class>``), one row per patch, logged after each
    validation. The patches are spread evenly over the validation tiles and stay the same for the
    whole run, so the panels show how the predictions of the same places evolve.

    Args:
        num_patches: rows per panel.
    """

    def __init__(self, num_patches: int = 4):
        self.num_patches = num_patches

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        dataset = getattr(trainer.datamodule, "val_dataset", None)
        if not loggers or dataset is None or trainer.sanity_checking:
            return
        count = min(self.num_patches, len(dataset))
        indices = torch.linspace(0, len(dataset) - 1, count).long().tolist()
        batch = default_collate([dataset[i] for i in indices])
        with torch.no_grad():
            probs = pl_module(batch["image"].to(pl_module.device)).sigmoid().float().cpu()
        for channel, name in enumerate(pl_module.hparams.class_names):
            panel = _panel(batch["image"], batch["target"][:, channel], probs[:, channel])
            for logger in loggers:
                logger.experiment.add_image(f"val/images_{name}", panel, trainer.global_step)


def _panel(image: Tensor, target: Tensor, probs: Tensor, gap: int = 2) -> Tensor:
    """(1, rows * (S + gap), 3 * S + 2 * gap) grey image: input | truth | prediction per row."""
    rows = []
    for img, tgt, prb in zip(image[:, 0], target, probs, strict=True):
        spacer = torch.ones(img.shape[0], gap)
        rows.append(torch.cat([img, spacer, tgt, spacer, prb], dim=1))
        rows.append(torch.ones(gap, rows[-1].shape[1]))
    return torch.cat(rows[:-1], dim=0).clamp(0, 1)[None]


class ValidateAtTimeBudget(L.Callback):
    """When ``trainer.max_time`` runs out, validate and checkpoint before stopping, mid-epoch too.

    Lightning's ``Timer`` stops a run at the end of a step; the epoch's validation (and so
    ``best.ckpt`` and ``last.ckpt``) then runs only if the epoch is a validation epoch, so a
    budget that ends inside epoch 4 of ``check_val_every_n_epoch=3``, or inside the first epoch,
    lost everything since the last validation. This makes the stopping step a validation step.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Run right after the Timer in each step, so that a stop it decides is seen here.
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None and self in trainer.callbacks:
            trainer.callbacks.remove(self)
            trainer.callbacks.insert(trainer.callbacks.index(timer) + 1, self)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None or timer._duration is None:
            return
        out_of_time = timer.time_elapsed() >= timer._duration
        if trainer.should_stop or trainer.strategy.broadcast(out_of_time):
            trainer.should_stop = True
            # Lightning validates on a mid-epoch stop, but only in a validation epoch.
            trainer.check_val_every_n_epoch = 1


def warm_ema(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """EMA update whose decay grows as ``(1 + n) / (10 + n)`` up to ``decay`` (n: updates so far).

    A fixed decay of 0.995 would keep ~99 % of the random initial weights after 1 step and ~60 %
    after 100: the average would lag the first minutes of a short CPU run. The warm-up (as in
    timm's ModelEmaV2 and YOLO's ModelEMA) lets it follow early on and smooth later.
    """

    def update(
        averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor
    ) -> torch.Tensor:
        rate = torch.clamp((1 + num_averaged) / (10 + num_averaged), max=decay)
        return averaged + (current - averaged) * (1 - rate).to(averaged.dtype)

    return update


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights (Lightning's ``EMAWeightAveraging``).

    Validation, ``best.ckpt``/``last.ckpt`` (their ``state_dict``) and so prediction use the
    averaged weights; a checkpoint also keeps the raw ones (``current_model_state``) and the
    average's state, so a resumed run continues both exactly. BatchNorm statistics are averaged
    with the weights (``use_buffers``).

    Args:
        decay: the EMA decay after its warm-up (see :func:`warm_ema`).
    """

    def __init__(self, decay: float = 0.995) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in (0, 1), got {decay}")
        super().__init__(decay=decay)
        self._kwargs["avg_fn"] = warm_ema(decay)  # replaces the fixed-decay update

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            # joenet's configure_model only sets the memory format and compiles: no sharding.
            warnings.filterwarnings("ignore", message=".*overrides the configure_model.*")
            super().setup(trainer, pl_module, stage)


class CheckpointOnPreemption(L.Callback):
    """On SIGTERM or SIGUSR1, finish the running step, write ``last.ckpt`` and stop training.

    SIGTERM is what SLURM (``scancel``, preemption, the end of ``--time``), Kubernetes and most
    schedulers send before killing; SLURM sends SIGUSR1 ahead of it when asked
    (``#SBATCH --signal=USR1@90``). Lightning only records SIGTERM and stops at the end of the
    epoch, too late on a cluster; here the step that is running completes, ``last.ckpt`` is
    written (atomically, by the trainer's checkpoint plugin) where the ``last`` ModelCheckpoint
    keeps it, and ``joenet.train`` exits with 128 + the signal number after saying how to
    resume (:class:`joenet.cli.Preempted`). Under SLURM with Lightning's auto-requeue, SIGUSR1
    stays Lightning's (it saves and requeues the job itself).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.checkpoint: str | None = None
        self._previous: Any = None

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signum

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        if _slurm_requeues(trainer):
            return  # Lightning registers its SIGUSR1 handler later, unless one is there already
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            self._previous = signal.signal(signal.SIGUSR1, self._record)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        import signal

        if trainer.received_sigterm and self.received is None:
            self.received = int(signal.SIGTERM)
        # save_checkpoint is collective under DDP: every rank saves and stops at the same step,
        # the first step after any rank was signalled (one small all-reduce per step).
        signalled = self.received is not None
        if self.checkpoint is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(signalled, all=False):
            return
        self.checkpoint = str(last_checkpoint_path(trainer))
        trainer.save_checkpoint(self.checkpoint)
        # Stop now: ending the epoch would validate and checkpoint again, marking an epoch done
        # that was not. Lightning passes the exception through its teardown.
        raise Preempted(self.received or int(signal.SIGTERM), self.checkpoint)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, err: BaseException
    ) -> None:
        self.on_fit_end(trainer, pl_module)


def _slurm_requeues(trainer: L.Trainer) -> bool:
    """Lightning's SLURM auto-requeue is on: SIGUSR1 saves and requeues the job."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    # Where Lightning's own signal connector looks (no public accessor in Lightning 2.6).
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where this run keeps ``last.ckpt``: the monitor-free ModelCheckpoint's directory."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor is None and callback.dirpath:
            return Path(callback.dirpath) / f"{callback.filename or 'last'}.ckpt"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
