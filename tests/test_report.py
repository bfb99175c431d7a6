"""The end of a training run (summary, summary.json, TensorBoard HParams) and the run report."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from joenet.report import write_report
from joenet.train import train
from tests.helpers import compose_train, tiny_overrides

QUIET = ["~callbacks.validation_images", "~callbacks.lr_monitor"]


@pytest.fixture(scope="module")
def two_runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished runs with different learning rates, in one folder, as runs/ holds them."""
    root = tmp_path_factory.mktemp("runs")
    for name, lr in (("a", "1e-3"), ("b", "3e-3")):
        overrides = [*tiny_overrides(data_dir, root / name), f"model.lr={lr}", *QUIET]
        train(compose_train(overrides))
        # Hydra's record of the command line (compose does not write one).
        (root / name / ".hydra").mkdir()
        (root / name / ".hydra" / "overrides.yaml").write_text(f"- model.lr={lr}\n- trainer=cpu\n")
    return root


def test_training_ends_with_a_summary(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    metrics = train(compose_train([*tiny_overrides(data_dir, run_dir), *QUIET]))
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert re.search(
        r"joenet: training finished after \d+ min \d\d s, stopped by max_epochs=2: 2 epochs, "
        r"4 steps, 16 patches",
        out,
    ), out
    assert f"best val/dice {summary['best']:.4f} at epoch {summary['best_epoch']}" in out
    assert re.search(r"  nuclei +0\.\d{4} +0\.\d{4}", out) and re.search(r"  mito +0\.\d{4}", out)
    assert f"best {run_dir / 'checkpoints' / 'best.ckpt'}" in out
    assert f"last {run_dir / 'checkpoints' / 'last.ckpt'}" in out
    assert f"tensorboard --logdir {tmp_path}" in out
    assert f"python -m joenet.predict ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}" in out
    # The best is the best validation's, not the last one's; train() returns it for sweepers.
    assert summary["best"] == pytest.approx(metrics["best/val/dice"])
    assert summary["best"] >= metrics["val/dice"] - 1e-9
    assert summary["best_metrics"]["val/dice_mito"] == pytest.approx(metrics["best/val/dice_mito"])
    assert summary["patches"] == 16 and summary["steps"] == 4 and summary["epochs"] == 2
    assert summary["parameters"] > 0 and summary["gflops_per_patch"] > 0
    assert "Tip" not in capsys.readouterr().err  # no third-party advertising


def test_tensorboard_hparams_hold_the_hyperparameters_and_best_metrics(two_runs: Path) -> None:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    files = sorted((two_runs / "b" / "tensorboard").glob("events.out.tfevents.*"))
    contents: dict[str, bytes] = {}
    for path in files:  # the summaries TensorBoard's HParams plugin reads
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    contents[value.tag] = value.metadata.plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(contents["_hparams_/experiment"])
    session = plugin_data_pb2.HParamsPluginData.FromString(contents["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["model/lr"].number_value == pytest.approx(3e-3)
    assert "data/patch_size" in session.session_start_info.hparams
    metrics = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"best/val/dice", "best/val/iou_mito"} <= metrics


def test_report_compares_runs(two_runs: Path, tmp_path: Path) -> None:
    written = write_report(two_runs, tmp_path / "report")
    assert [p.name for p in written] == ["report.md", "report.csv", "curves.png"]
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    assert [row["run"] for row in rows] == ["a", "b"]
    assert [row["overrides"] for row in rows] == ["model.lr=1e-3", "model.lr=3e-3"]
    for row, name in zip(rows, "ab", strict=True):
        summary = json.loads((two_runs / name / "summary.json").read_text())
        assert float(row["best"]) == pytest.approx(summary["best"])
        assert float(row["dice_mito"]) == pytest.approx(summary["best_metrics"]["val/dice_mito"])
        assert int(row["parameters"]) == summary["parameters"]
        assert row["finished"] == "True"
    table = (tmp_path / "report" / "report.md").read_text()
    assert "Every run: `trainer=cpu`" in table and "| a | `model.lr=1e-3` |" in table
    assert (tmp_path / "report" / "curves.png").stat().st_size > 10_000


def test_report_reads_a_killed_run_from_its_events(two_runs: Path, tmp_path: Path) -> None:
    import shutil

    killed = tmp_path / "runs" / "killed"
    shutil.copytree(two_runs / "a", killed)
    summary = json.loads((killed / "summary.json").read_text())
    (killed / "summary.json").unlink()  # as a run killed before its end leaves it
    write_report(tmp_path / "runs", tmp_path / "out")
    (row,) = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert row["finished"] == "False"
    assert float(row["best"]) == pytest.approx(summary["best"], abs=1e-6)
    assert int(row["best_epoch"]) == summary["best_epoch"]
    assert int(row["parameters"]) == summary["parameters"]  # rebuilt from its config
    assert "Not finished" in (tmp_path / "out" / "report.md").read_text()


def test_report_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from joenet.report.cli import main

    with pytest.raises(SystemExit) as info:
        main([str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    assert f"error: {tmp_path}: no joenet training runs under it" in err
