"""Test-only Lightning callbacks, importable by subprocess runs (``+callbacks.x._target_=...``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


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
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


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
