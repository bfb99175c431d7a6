"""Test helpers: the tiny training config, and callbacks that subprocess runs import by name.

The callbacks are given as ``+callbacks.x._target_=tests.helpers.X``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from joenet.config import config_dir, cpu_has_bf16_matrix_units, register_resolvers

TINY_SHAPE = (12, 96, 96)
# What prediction's precision=auto picks in a subprocess (the CLI) on this CPU; in-process
# prediction is pinned to fp32 by tests/conftest.py, so a test comparing the two asks for this.
CLI_PRECISION = "bf16" if cpu_has_bf16_matrix_units() else "32"


def tiny_overrides(data_dir: Path, output_dir: Path) -> list[str]:
    """Overrides that make a full training run take seconds on a CPU."""
    return [
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={output_dir}",
        f"data.synthetic.shape=[{','.join(map(str, TINY_SHAPE))}]",
        "data.train_z=[0,8]",
        "data.val_z=[8,12]",
        "data.patch_size=32",
        "data.batch_size=4",
        "data.patches_per_epoch=8",
        "data.num_workers=0",
        "model.net.channels=[4,8,16,32]",
        "trainer=cpu",
        "trainer.accumulate_grad_batches=1",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
    ]


def compose_train(overrides: list[str]) -> DictConfig:
    """Compose ``conf/train.yaml`` in-process, as ``python -m joenet.train`` would."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def train_tiny_checkpoint(data_dir: Path, run_dir: Path) -> Path:
    """Train the tiny config for one epoch (no logger or image callback: seconds); last.ckpt."""
    from joenet.train import train

    quiet = ["~logger", "~callbacks.validation_images", "~callbacks.lr_monitor"]
    train(compose_train([*tiny_overrides(data_dir, run_dir), "trainer.max_epochs=1", *quiet]))
    return run_dir / "checkpoints" / "last.ckpt"


class RecordSamples(L.Callback):
    """Write, per rank, the training sample positions seen and the final logged metrics."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.positions: list[list[int]] = []
        self.val_positions: list[list[int]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self.positions += batch["position"].tolist()

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self.val_positions += batch["position"].tolist()

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "positions": self.positions,
            "val_positions": self.val_positions,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "lr": float(pl_module.hparams.lr),
            "checkpoint_dir": str(trainer.checkpoint_callback.dirpath),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class SignalAtStep(L.Callback):
    """Send this process ``signum`` (a real signal) at the start of a global step, once."""

    def __init__(self, step: int, marker: str, signum: int):
        self.step, self.marker, self.signum = step, Path(marker), signum

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            import os

            self.marker.write_text(str(self.signum))
            os.kill(os.getpid(), self.signum)


class KillAtStep(L.Callback):
    """SIGKILL this process at the start of a global step, once (a marker file remembers it)."""

    def __init__(self, step: int, marker: str):
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            import os
            import signal

            self.marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


class CaptureStartState(L.Callback):
    """Keep copies of the weights and optimizer state as training (re)starts: ``.captured``."""

    def __init__(self) -> None:
        self.captured: dict = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.captured = {
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "global_step": trainer.global_step,
        }


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    """Every tensor of nested dicts ``a`` and ``b`` equal, the keys too."""
    import torch

    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{what}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}.{key}"
        else:
            assert a[key] == b[key], f"{what}.{key}"
