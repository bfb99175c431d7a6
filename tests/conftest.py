"""Shared fixtures: a tiny synthetic volume, a checkpoint trained on it, a tiny config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from joenet.config import register_resolvers
from joenet.synthetic import generate_synthetic_volume
from tests.helpers import TINY_SHAPE, compose_train, tiny_overrides, train_tiny_checkpoint

register_resolvers()

# Under pytest-xdist, each test process gets its share of the cores, and so do the subprocesses
# its tests start (OMP_NUM_THREADS): oversubscribed OpenMP threads spin and slow every test.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


@pytest.fixture(scope="session", autouse=True)
def compiled_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prediction's compiled networks go to a temporary cache, not the user's ~/.cache (set in
    the environment so that the CLI tests' subprocesses use it too)."""
    directory = tmp_path_factory.mktemp("joenet_cache")
    os.environ["JOENET_CACHE_DIR"] = str(directory)
    return directory / "compiled"


@pytest.fixture(scope="session", autouse=True)
def fp32_prediction() -> Iterator[None]:
    """Prediction's ``precision=auto`` as on a CPU without AMX (fp32), on every host: the tests
    compare outputs with fp32 references to float rounding. bf16 on AMX CPUs is tested where it
    is asked for (tests/test_bf16_prediction.py); training keeps the host's precision."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("joenet.predict.tiling.cpu_has_bf16_matrix_units", lambda: False)
        patch.setattr("joenet.predict.worker.cpu_has_bf16_matrix_units", lambda: False)
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the synthetic volume at the tiny shape the tiny config asks for."""
    directory = tmp_path_factory.mktemp("data")
    generate_synthetic_volume(directory / "synthetic_em.zarr", shape=TINY_SHAPE, seed=0)
    return directory


@pytest.fixture(scope="session")
def volume_path(data_dir: Path) -> Path:
    return data_dir / "synthetic_em.zarr"


@pytest.fixture(scope="session")
def ckpt_path(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for one epoch on the tiny volume."""
    return train_tiny_checkpoint(data_dir, tmp_path_factory.mktemp("predict_run"))


@pytest.fixture
def cfg_tiny(data_dir: Path, tmp_path: Path) -> DictConfig:
    return compose_train(tiny_overrides(data_dir, tmp_path / "run"))


@pytest.fixture(scope="session")
def reference(ckpt_path: Path, volume_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted local prediction of slices [0, 4) with the default options."""
    from joenet.predict import predict_volume

    output = tmp_path_factory.mktemp("reference") / "pred.zarr"
    return predict_volume(
        ckpt_path, volume_path, output, z_range=[0, 4], progress=False, device="cpu"
    )
