"""Every shipped config option composes and instantiates (no setup, no data needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from joenet.config import config_dir
from joenet.data.datamodule import EMDataModule
from joenet.lit_module import SegmentationLitModule
from tests.helpers import compose_train

CONF = config_dir()


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("data", _options("data"))
def test_data_configs_instantiate(data: str, tmp_path: Path) -> None:
    overrides = [f"data={data}", f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    if data in ("em_zarr", "cellmap_example"):
        overrides.append(f"data.path={tmp_path / 'volume.zarr'}")
    cfg = compose_train(overrides)
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, EMDataModule)
    assert datamodule.class_names == ["nuclei", "mito"]


@pytest.mark.parametrize("experiment", _options("experiment"))
@pytest.mark.parametrize("trainer", _options("trainer"))
def test_experiments_and_trainers_compose(experiment: str, trainer: str, tmp_path: Path) -> None:
    cfg = compose_train(
        [
            f"experiment={experiment}",
            f"trainer={trainer}",
            "preset=cpu_demo",
            f"paths.output_dir={tmp_path}",
        ]
    )
    model = instantiate(cfg.model)
    assert isinstance(model, SegmentationLitModule)
    assert cfg.trainer.precision in ("32-true", "bf16-mixed", "16-mixed")
    if trainer == "cpu":
        assert cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize("preset", [None, *_options("preset")])
@pytest.mark.parametrize("trainer", _options("trainer"))
def test_trainer_callbacks_and_logger_instantiate(
    preset: str | None, trainer: str, tmp_path: Path
) -> None:
    """What train() builds from each trainer config and preset: a Trainer, callbacks, loggers."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from joenet.train import _instantiate_all

    overrides = [f"trainer={trainer}", f"paths.output_dir={tmp_path}"]
    cfg = compose_train([*overrides, *([f"preset={preset}"] if preset else [])])
    callbacks = _instantiate_all(cfg.callbacks)
    loggers = _instantiate_all(cfg.logger)
    names = {type(callback).__name__ for callback in callbacks}
    assert {"ModelCheckpoint", "EarlyStopping", "EMA", "ValidateAtTimeBudget"} <= names
    assert any(isinstance(logger, TensorBoardLogger) for logger in loggers)
    if trainer in ("gpu", "mps") and not _has(trainer):  # they require that device
        assert cfg.trainer.accelerator == trainer
        return
    trainer_ = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert isinstance(trainer_, L.Trainer)
    early = next(c for c in callbacks if type(c).__name__ == "EarlyStopping")
    best = next(c for c in callbacks if getattr(c, "monitor", None) == cfg.monitor)
    assert early.monitor == best.monitor == cfg.monitor == "val/dice"  # one monitor everywhere
    if preset == "cpu_demo":
        assert trainer_.max_epochs == -1 or trainer_.max_epochs is None


def _has(accelerator: str) -> bool:
    import torch

    if accelerator == "gpu":
        return torch.cuda.is_available()
    return torch.backends.mps.is_available()
