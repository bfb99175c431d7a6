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


# The seed's open decisions and future enhancements (issue 13), each an experiment config.
SEED_EXPERIMENTS = {
    "strided_down": {"model.net.down": "strided"},
    "maxpool_down": {"model.net.down": "maxpool"},
    "bilinear_up": {"model.net.up": "bilinear"},
    "leaky_relu": {"model.net.activation": "leaky_relu"},
    "se_attention": {"model.net.attention": "se"},
    "cbam_attention": {"model.net.attention": "cbam"},
    "level5": {"model.net.channels": [32, 64, 128, 256, 512]},
    "wide": {"model.net.channels": [64, 64, 128, 256, 512]},
    "deep_supervision": {"model.net.deep_supervision": 2},
    "bottleneck_dropout": {"model.net.dropout": 0.2},
    "depthwise_separable": {"model.net.conv": "depthwise_separable"},
    "plateau_scheduler": {"model.scheduler": "plateau"},
    "grad_accumulation": {"trainer.accumulate_grad_batches": 4, "data.batch_size": 1},
    "strong_augmentation": {"data.augment.elastic": True, "data.augment.noise": True},
    "em_defects": {"data.augment.defects": 0.33},
    "seed_literal": {"model.net.input_norm": True, "model.warmup": 0.0},
}


@pytest.mark.parametrize("experiment", sorted(SEED_EXPERIMENTS))
def test_each_seed_experiment_sets_what_it_names(experiment: str, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    cfg = compose_train([f"experiment={experiment}", "trainer=cpu", f"paths.output_dir={tmp_path}"])
    default = compose_train(["trainer=cpu", f"paths.output_dir={tmp_path}"])
    for key, value in SEED_EXPERIMENTS[experiment].items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, f"{experiment}: {key} = {got}"
        if experiment == "strided_down":
            continue  # the seed's and joenet's default, named so that sweeps can list it
        before = OmegaConf.select(default, key)
        before = OmegaConf.to_container(before) if OmegaConf.is_config(before) else before
        assert before != value, f"{experiment} changes nothing: {key} is {value} by default"


@pytest.mark.parametrize(
    ("amx", "bf16", "expected"),
    [
        (True, True, "bf16-mixed"),
        (False, True, "32-true"),
        (True, False, "32-true"),
        (False, False, "32-true"),
    ],
)
def test_cpu_precision_is_bf16_only_with_amx(
    amx: bool, bf16: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 only where the CPU multiplies it in hardware: elsewhere it runs ~400x slower."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for trainer in ("auto", "cpu"):
        cfg = compose_train([f"trainer={trainer}"])
        assert cfg.trainer.precision == expected, trainer
