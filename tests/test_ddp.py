"""Two CPU processes (gloo): ranks draw different patches and validation metrics are synced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_ddp(data_dir: Path, tmp_path: Path) -> None:
    run_dir, records = tmp_path / "run", tmp_path / "records"
    overrides = [
        *(o for o in tiny_overrides(data_dir, run_dir) if not o.startswith("trainer=")),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "+callbacks.record._target_=tests.helpers.RecordSamples",
        f"+callbacks.record.out_dir={records}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "joenet.train", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # 8 patches per epoch over 2 epochs, split between the ranks without duplicates.
    seen = [{tuple(p) for p in r["positions"]} for r in ranks]
    assert len(ranks[0]["positions"]) == len(ranks[1]["positions"]) == 8
    assert not seen[0] & seen[1], "both ranks trained on the same patches"

    # Each rank validates its own half of the tiles, yet both log the same metrics: computed from
    # confusion counts summed over the ranks (torchmetrics' sync), not from each rank's half.
    val_seen = [{tuple(p) for p in r["val_positions"]} for r in ranks]
    assert not val_seen[0] & val_seen[1]
    assert len(val_seen[0] | val_seen[1]) == 4 * 3 * 3  # every tile of the 4 val slices
    for key in ("val/dice_mito", "val/iou_nuclei", "val/precision", "val/loss"):
        assert ranks[0]["metrics"][key] == pytest.approx(ranks[1]["metrics"][key], abs=1e-6)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
