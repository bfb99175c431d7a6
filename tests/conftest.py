"""Shared fixtures: a tiny synthetic volume and a tiny composed training config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from joenet.config import config_dir, register_resolvers
from joenet.synthetic import generate_synthetic_volume

TINY_SHAPE = (12, 96, 96)
register_resolvers()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the synthetic volume at the tiny shape the tiny config asks for."""
    directory = tmp_path_factory.mktemp("data")
    generate_synthetic_volume(directory / "synthetic_em.zarr", shape=TINY_SHAPE, seed=0)
    return directory


@pytest.fixture(scope="session")
def volume_path(data_dir: Path) -> Path:
    return data_dir / "synthetic_em.zarr"


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
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


@pytest.fixture(scope="session")
def ckpt_path(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for one epoch (no logger or image callback: seconds)."""
    from joenet.train import train

    run_dir = tmp_path_factory.mktemp("predict_run")
    overrides = [*tiny_overrides(data_dir, run_dir), "trainer.max_epochs=1", "~logger",
                 "~callbacks.validation_images", "~callbacks.lr_monitor"]  # fmt: skip
    train(compose_train(overrides))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture
def cfg_tiny(data_dir: Path, tmp_path: Path) -> DictConfig:
    return compose_train(tiny_overrides(data_dir, tmp_path / "run"))
