"""Every shipped config option composes and instantiates (no setup, no data needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from joenet.config import config_dir
from joenet.data.datamodule import EMDataModule
from joenet.lit_module import SegmentationLitModule
from tests.conftest import compose_train

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
    cfg = compose_train([f"experiment={experiment}", f"trainer={trainer}", "preset=cpu_demo",
                         f"paths.output_dir={tmp_path}"])  # fmt: skip
    model = instantiate(cfg.model)
    assert isinstance(model, SegmentationLitModule)
    assert cfg.trainer.precision in ("32-true", "bf16-mixed", "16-mixed")
    if trainer == "cpu":
        assert cfg.trainer.accelerator == "cpu"
