"""The notebooks run top to bottom on the tiny synthetic volume and a tiny training run.

They are executed with nbclient directly (no nbmake plugin): parameters go in through the
environment variables that each notebook's first cell reads, and the executed copies are written
to the test's temporary directory, never over the committed (output-free) files.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pytest
import zarr
from nbclient import NotebookClient

from joenet.train import train
from tests.helpers import compose_train, tiny_overrides

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def run_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny training run (checkpoints, config.yaml, TensorBoard logs)."""
    run = tmp_path_factory.mktemp("nb_run") / "run"
    train(compose_train([*tiny_overrides(data_dir, run), "trainer.max_epochs=1"]))
    return run


def _execute(name: str, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run a notebook in a fresh kernel with ``env`` set; return the executed notebook."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # keep ~/.ipython untouched
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend makes PNGs
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    nbformat.write(notebook, tmp_path / name)  # kept for inspection when a later assert fails
    return notebook


def _outputs(notebook: nbformat.NotebookNode) -> tuple[str, int]:
    """The notebook's printed text, and how many images it shows."""
    outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
    text = "".join(out.get("text", "") for out in outputs)
    return text, sum("image/png" in out.get("data", {}) for out in outputs)


@pytest.mark.parametrize(
    "name", ["01_explore_data.ipynb", "02_results.ipynb", "03_exported_model.ipynb"]
)
def test_committed_notebooks_are_stripped(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs"
    assert "JOENET_NB_" in notebook.cells[1].source, f"{name}: first code cell holds parameters"


def test_explore_data(volume_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = _execute(
        "01_explore_data.ipynb", {"JOENET_NB_VOLUME": str(volume_path)}, tmp_path, monkeypatch
    )
    text, images = _outputs(notebook)
    assert "labels/nuclei" in text and "mito" in text and "of voxels" in text
    assert images == 3  # slices, label fractions, histograms


def test_results(
    run_dir: Path, volume_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpoint branch (no PREDICTION): the one that must work without joenet.predict.
    env = {"JOENET_NB_RUN_DIR": str(run_dir), "JOENET_NB_SLICES": "8,11"}
    text, images = _outputs(_execute("02_results.ipynb", env, tmp_path, monkeypatch))
    assert images == 2  # curves, predictions beside truth
    assert "val/dice_mito" in text and "val/loss" in text
    assert "slices: [8, 11]" in text and "best.ckpt" in text


@pytest.mark.slow
def test_results_from_prediction(
    run_dir: Path, volume_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = zarr.open_group(str(volume_path), mode="r")
    prediction = zarr.open_group(str(tmp_path / "pred.zarr"), mode="w")
    for name in ("nuclei", "mito"):  # joenet.predict's layout: uint8 round(255 p) per class
        prediction.create_array(name, data=(truth[f"labels/{name}"][...] > 0) * np.uint8(255))
    env = {"JOENET_NB_RUN_DIR": str(run_dir), "JOENET_NB_PREDICTION": str(tmp_path / "pred.zarr")}
    text, images = _outputs(_execute("02_results.ipynb", env, tmp_path, monkeypatch))
    assert images == 2
    assert "pred.zarr" in text and "slices: [8, 10, 11]" in text  # 3 slices of val_z [8, 12)


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_exported_model_without_joenet(
    suffix: str, run_dir: Path, volume_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime", reason="pip install onnxruntime")
    from joenet.export import export_model

    model = export_model(
        run_dir / "checkpoints" / "best.ckpt",
        "onnx" if suffix == ".onnx" else "torchscript",
        tmp_path / f"joenet{suffix}",
        tile=64,
    )
    env = {"JOENET_NB_MODEL": str(model), "JOENET_NB_VOLUME": str(volume_path)}
    notebook = _execute("03_exported_model.ipynb", env, tmp_path, monkeypatch)
    text, images = _outputs(notebook)
    assert images == 1
    assert "classes: ['nuclei', 'mito']" in text and "halo:" in text
    assert "nuclei: mean probability" in text and "mito: mean probability" in text
    # The notebook imports neither joenet nor Lightning nor Hydra.
    source = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    for package in ("joenet", "lightning", "hydra"):
        assert f"import {package}" not in source and f"from {package}" not in source
