"""A plain (non-editable) install ships conf/ and composes its configs from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (the dev extra)")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("joenet-*.whl")
    return built


def test_wheel_contains_configs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in (
        "train.yaml",
        "experiment/strided_down.yaml",
        "data/synthetic.yaml",
        "trainer/cpu.yaml",
        "preset/cpu_demo.yaml",
        "predict.yaml",
        "evaluate.yaml",
        "data/lucchi.yaml",
    ):
        assert f"joenet/conf/{config}" in names


@pytest.mark.slow  # a subprocess
def test_installed_package_composes_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    script = (
        "import joenet.train as t, joenet.config as c\n"
        "from hydra import compose, initialize_config_dir\n"
        "assert c.source_root() is None, c.source_root()\n"
        "with initialize_config_dir(config_dir=str(c.config_dir()), version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['experiment=maxpool_down'])\n"
        "print(c.config_dir()); print(cfg.model.net.down); print(cfg.paths.data_dir)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("JOENET_DATA_DIR", "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=str(site), HOME=str(tmp_path / "home"))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config_path, down, data_dir = result.stdout.split()
    assert Path(config_path) == site / "joenet" / "conf"
    assert down == "maxpool"
    assert Path(data_dir) == tmp_path / "home" / ".cache" / "joenet" / "data"


def test_dependency_floors_load_checkpoints_safely() -> None:
    """Every checkpoint load is weights-only: torch >= 2.6 defaults to it, Lightning >= 2.6
    takes ``Trainer.fit(weights_only=True)`` (what train passes on resume)."""
    import inspect
    import re
    import tomllib

    import lightning as L

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for requirement in project["dependencies"]:
        match = re.match(r"([a-z-]+)>=(\d+)\.(\d+)", requirement)
        if match:
            floors[match[1]] = (int(match[2]), int(match[3]))
    assert floors["torch"] >= (2, 6) and floors["lightning"] >= (2, 6)
    assert "weights_only" in inspect.signature(L.Trainer.fit).parameters
