"""End to end: the real entry point, configs, checkpoints and TensorBoard logs on a tiny run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from joenet.config import config_dir
from joenet.lit_module import SegmentationLitModule
from joenet.train import train
from tests.helpers import (
    CaptureStartState,
    assert_same_tensors,
    compose_train,
    tiny_overrides,
)

EXPERIMENTS = sorted(path.stem for path in (config_dir() / "experiment").glob("*.yaml"))
# Experiments that set the widths keep their number of levels at the tiny size.
_TINY_CHANNELS = {"level5": "[4,8,16,32,64]", "wide": "[8,8,16,32,64]"}


def _tensorboard_tags(run_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return events.Tags()


def _assert_run_dir(run_dir: Path) -> None:
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert "joenet.train" in (run_dir / "command.txt").read_text()
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["packages"]["torch"] and info["packages"]["lightning"]
    assert "commit" in info["git"]
    tags = _tensorboard_tags(run_dir)
    scalars = set(tags["scalars"])
    for key in (
        "train/loss_step",
        "train/loss_epoch",
        "val/loss",
        "val/dice",
        "val/iou",
        "val/dice_mito",
        "val/dice_nuclei",
        "val/iou_mito",
        "val/precision_nuclei",
        "val/recall_mito",
        "val/accuracy_mito",
        "train/dice_mito",
        "train/lr",
    ):
        assert key in scalars, f"{key} not logged; have {sorted(scalars)}"
    assert {"val/images_nuclei", "val/images_mito"} <= set(tags["images"])


def trained_hparams(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_train_each_experiment(experiment: str, data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"experiment={experiment}", *tiny_overrides(data_dir, run_dir)]
    if experiment in _TINY_CHANNELS:
        overrides.append(f"model.net.channels={_TINY_CHANNELS[experiment]}")
    cfg = compose_train(overrides)
    metrics = train(cfg)
    _assert_run_dir(run_dir)
    assert math.isfinite(metrics["val/loss"]) and 0.0 <= metrics["val/dice_mito"] <= 1.0
    # Every parameter moved by more than weight decay alone would: a detached branch, a frozen
    # optimizer or a zero learning rate leaves some tensor at its initial value.
    L.seed_everything(cfg.seed, workers=True)  # as train() does before building the model
    instantiate(cfg.data)
    initial = instantiate(cfg.model).state_dict()
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    trained = trained.get("current_model_state", trained["state_dict"])  # raw weights, not EMA
    for name, _ in SegmentationLitModule(**dict(trained_hparams(run_dir))).named_parameters():
        assert (trained[name] - initial[name]).abs().max() > 1e-5, f"{name} did not train"
    # The checkpoint alone rebuilds the model, and holds only tensors and primitives.
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["net"]["down"] == cfg.model.net.down
    data_state = checkpoint["EMDataModule"]  # what prediction needs to know about the data
    assert data_state["class_names"] == ["nuclei", "mito"]
    assert data_state["voxel_size_nm"] == [8, 8, 8]
    assert data_state["normalization"] == {"kind": "dtype_range"}
    model = SegmentationLitModule.load_from_checkpoint(
        run_dir / "checkpoints" / "best.ckpt", weights_only=True
    )
    assert model.hparams.net == checkpoint["hyper_parameters"]["net"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][name])
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_resume_from_last_checkpoint(cfg_tiny: DictConfig, data_dir: Path, tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from joenet.train import _instantiate_all

    train(cfg_tiny)
    last = Path(cfg_tiny.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    resumed = compose_train(
        [
            *tiny_overrides(data_dir, tmp_path / "resumed"),
            "trainer.max_epochs=3",
            "~logger",
            "~callbacks.lr_monitor",
            "~callbacks.validation_images",
        ]
    )
    capture = CaptureStartState()
    callbacks = [*_instantiate_all(resumed.callbacks), capture]
    trainer = instantiate(resumed.trainer, callbacks=callbacks, logger=False)
    trainer.fit(instantiate(resumed.model), datamodule=instantiate(resumed.data), ckpt_path=last)
    # Training restarts from the saved raw weights (the EMA's average is in state_dict), the
    # saved optimizer moments and the saved step, not from a fresh start.
    assert_same_tensors(capture.captured["weights"], saved["current_model_state"], "weights")
    assert_same_tensors(capture.captured["optimizer"], saved["optimizer_states"][0], "optimizer")
    assert capture.captured["global_step"] == saved["global_step"] > 0
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 2  # 2 epochs from the first run, 1 more after resuming
    assert checkpoint["global_step"] == saved["global_step"] * 3 // 2


def test_plateau_scheduler_and_mito_only_volume(cfg_tiny: DictConfig, tmp_path: Path) -> None:
    import zarr

    source = zarr.open_group(cfg_tiny.data.path, mode="r")
    mito_only = zarr.open_group(str(tmp_path / "mito_only.zarr"), mode="w")
    for key in ("raw", "labels/mito"):
        mito_only.create_array(key, data=source[key][...], chunks=(1, 96, 96))
    cfg_tiny.data.path = str(tmp_path / "mito_only.zarr")
    cfg_tiny.data.synthetic = None
    cfg_tiny.model.scheduler = "plateau"
    metrics = train(cfg_tiny)
    assert "val/dice_mito" in metrics
    assert not any("nuclei" in key for key in metrics)  # an unlabelled class is not logged
    tags = set(_tensorboard_tags(Path(cfg_tiny.paths.output_dir))["scalars"])
    assert not any("nuclei" in tag for tag in tags)
    assert "train/lr" in tags


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "joenet.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_multirun_from_another_directory(data_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(data_dir, tmp_path) if not o.startswith("paths.output")]
    result = _run_cli(
        [
            "-m",
            "experiment=strided_down,maxpool_down",
            f"paths.log_dir={tmp_path / 'logs'}",
            *overrides,
        ],
        cwd=tmp_path,  # configs are found from any working directory
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/*"))
    job_dirs = [run for run in runs if run.name.isdigit()]
    assert len(job_dirs) == 2
    for job_dir in job_dirs:
        _assert_run_dir(job_dir)
    downs = sorted(
        (job_dir / "config.yaml").read_text().count("down: maxpool") for job_dir in job_dirs
    )
    assert downs == [0, 1]
    # Each job ends with its summary; the report then compares the two.
    assert result.stdout.count("joenet: training finished after") == 2
    sweep = job_dirs[0].parent
    report = subprocess.run(
        [sys.executable, "-m", "joenet.report", str(sweep)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    table = (sweep / "report.md").read_text()
    assert "`experiment=strided_down`" in table and "`experiment=maxpool_down`" in table
    assert (sweep / "curves.png").stat().st_size > 10_000


@pytest.mark.slow  # a subprocess
def test_unknown_experiment_is_a_clear_error(tmp_path: Path) -> None:
    result = _run_cli(["experiment=no_such_experiment"], cwd=tmp_path)
    assert result.returncode != 0
    assert "no_such_experiment" in result.stderr
    assert "strided_down" in result.stderr  # Hydra lists the available options


def test_init_from_starts_from_checkpoint_weights(
    cfg_tiny: DictConfig, data_dir: Path, tmp_path: Path
) -> None:
    train(cfg_tiny)
    source = Path(cfg_tiny.paths.output_dir) / "checkpoints" / "last.ckpt"
    # lr=0: the fine-tuned parameters must stay exactly the loaded ones.
    cfg = compose_train(
        [
            *tiny_overrides(data_dir, tmp_path / "tuned"),
            f"init_from={source}",
            "model.lr=0.0",
            "trainer.max_epochs=1",
        ]
    )
    train(cfg)
    before = torch.load(source, weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", weights_only=True)
    model = SegmentationLitModule(net=dict(cfg.model.net))  # the configured network
    for name, _ in model.named_parameters():
        assert torch.equal(before[name], after["state_dict"][name]), name


def test_init_from_incompatible_checkpoint_is_a_clear_error(
    cfg_tiny: DictConfig, tmp_path: Path
) -> None:
    train(cfg_tiny)
    source = Path(cfg_tiny.paths.output_dir) / "checkpoints" / "last.ckpt"
    model = SegmentationLitModule(net={"channels": [8, 16, 32, 64]})
    with pytest.raises(ValueError, match=r"init_from=.*last\.ckpt: its weights do not fit"):
        model.init_weights_from(source)
    with pytest.raises(FileNotFoundError, match="init_from="):
        model.init_weights_from(tmp_path / "missing.ckpt")


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(
    not (SHARED_DATA / "lucchi_train.zarr").is_dir(),
    reason=f"real EM data not present at {SHARED_DATA} (only in the project's own workspace)",
)
def test_train_on_lucchi_logs_mito_and_no_nuclei(tmp_path: Path) -> None:
    overrides = [
        "experiment=strided_down",
        "data=lucchi",
        f"paths.data_dir={SHARED_DATA}",
        f"paths.output_dir={tmp_path}",
        "data.patch_size=64",
        "data.batch_size=4",
        "data.patches_per_epoch=8",
        "data.num_workers=0",
        "data.val_z=[132,133]",
        "model.net.channels=[4,8,16,32]",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "+trainer.enable_progress_bar=false",
    ]
    metrics = train(compose_train(overrides))
    assert {"val/iou_mito", "val/dice_mito", "val/dice"} <= set(metrics)
    assert not any("nuclei" in key for key in metrics)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["EMDataModule"]
    assert state["voxel_size_nm"] == [5, 5, 5]
