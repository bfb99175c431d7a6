"""Sweeps: an Optuna search that continues where it stopped, and DDP inside a multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "joenet.train", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _trials(sweep: Path) -> list:
    import optuna

    study = optuna.load_study(study_name="joenet", storage=f"sqlite:///{sweep / 'optuna.db'}")
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow  # subprocesses
def test_optuna_search_runs_trials_and_continues(data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install joenet[sweep]")
    sweep = tmp_path / "sweep"
    tiny = [o for o in tiny_overrides(data_dir, tmp_path) if not o.startswith("paths.output")]
    args = [
        "hparams_search=optuna",
        f"hydra.sweep.dir={sweep}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "trainer.max_epochs=3",
        *tiny,
    ]
    _train([*args, "hydra.sweeper.n_trials=2"], tmp_path)
    first = _trials(sweep)
    assert len(first) == 2
    assert first[0].params["model.lr"] != first[1].params["model.lr"]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2
    for trial, run in zip(first, runs, strict=True):
        summary = json.loads((run / "summary.json").read_text())
        # The objective is the trial's best val/dice (what best.ckpt holds), not its last.
        assert trial.value == pytest.approx(summary["best"])
        config = (run / "config.yaml").read_text()
        assert f"lr: {trial.params['model.lr']}" in config
    # Started again into the same directory, the study goes on: trial 3, its own directory.
    _train([*args, "hydra.sweeper.n_trials=1"], tmp_path)
    trials = _trials(sweep)
    assert len(trials) == 3 and trials[:2] == first
    assert len([p for p in sweep.iterdir() if p.is_dir()]) == 3
    # Seeded sampler: the same search elsewhere draws the same first parameters.
    again = tmp_path / "again"
    _train(
        [
            *(a if "sweep.dir" not in a else f"hydra.sweep.dir={again}" for a in args),
            "hydra.sweeper.n_trials=1",
        ],
        tmp_path,
    )
    assert _trials(again)[0].params == first[0].params


@pytest.mark.slow  # two DDP jobs of two processes each
def test_ddp_multirun_ranks_run_their_job(data_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    tiny = [
        o
        for o in tiny_overrides(data_dir, tmp_path)
        if not o.startswith(("paths.output", "trainer="))
    ]
    _train(
        [
            "-m",
            "model.lr=0.001,0.004",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"hydra.sweep.dir={sweep}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "+callbacks.record._target_=tests.helpers.RecordSamples",
            # Resolved by each rank: the job directory it writes to.
            "+callbacks.record.out_dir=${paths.output_dir}/records",
            *tiny,
        ],
        tmp_path,
    )
    # Exactly the two jobs ran (a rank re-running the sweep would add jobs and directories).
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "logs" / "train" / "runs").exists()  # no rank fell back to runs/
    for job, lr in (("0", 0.001), ("1", 0.004)):
        records = sweep / job / "records"
        ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        assert [r["lr"] for r in ranks] == [lr, lr]  # every rank trains the job's parameters
        assert {r["checkpoint_dir"] for r in ranks} == {str(sweep / job / "checkpoints")}
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
