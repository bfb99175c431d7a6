"""Exports: TorchScript and ONNX reload and match the checkpoint; bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from joenet.checkpoint import load_model
from joenet.export import export_model
from joenet.export.exporter import ONNX_TOLERANCE, TORCHSCRIPT_TOLERANCE
from joenet.export.metadata import halo

LUCCHI = Path(os.environ.get("JOENET_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))


def _em_tile(volume_path: Path, size: int) -> torch.Tensor:
    """A real EM tile when the Lucchi data is here, else one of the synthetic volume."""
    path = LUCCHI / "lucchi_train.zarr"
    source = path if path.is_dir() else volume_path
    raw = zarr.open_group(str(source), mode="r")["raw"]
    size = min(size, raw.shape[1] // 16 * 16, raw.shape[2] // 16 * 16)
    tile = np.asarray(raw[raw.shape[0] // 2, :size, :size], dtype=np.float32) / 255.0
    return torch.from_numpy(tile)[None, None]


def _reference(ckpt_path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(ckpt_path).net(x)


def test_torchscript_export_matches_the_checkpoint(
    ckpt_path: Path, volume_path: Path, tmp_path: Path
) -> None:
    output = export_model(ckpt_path, "torchscript", tmp_path / "joenet.pt", tile=64)
    files = {"joenet.json": ""}
    scripted = torch.jit.load(str(output), _extra_files=files)
    meta = json.loads(files["joenet.json"])
    model = load_model(ckpt_path)
    assert meta["class_names"] == model.class_names == ["nuclei", "mito"]
    assert meta["normalization"] == model.normalization
    assert meta["divisor"] == model.divisor and meta["tile"] == 64
    assert meta["halo"] == halo(model.receptive_field, model.divisor) >= model.receptive_field / 2
    for x in (_em_tile(volume_path, 64), torch.rand(2, 1, 48, 80)):  # another, non-square size
        with torch.no_grad():
            got = scripted(x)
        assert got.shape == (x.shape[0], 2, *x.shape[2:])
        assert float((got - _reference(ckpt_path, x)).abs().max()) <= TORCHSCRIPT_TOLERANCE
    assert not list(tmp_path.glob(".*tmp*"))  # no staging file left


def test_onnx_export_matches_the_checkpoint(
    ckpt_path: Path, volume_path: Path, tmp_path: Path
) -> None:
    onnxruntime = pytest.importorskip("onnxruntime", reason="pip install onnxruntime")
    import onnx

    output = export_model(ckpt_path, "onnx", tmp_path / "joenet.onnx", tile=64)
    proto = onnx.load(str(output))
    onnx.checker.check_model(proto)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["joenet"])
    assert meta["class_names"] == ["nuclei", "mito"]
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    for x in (_em_tile(volume_path, 64), torch.rand(3, 1, 32, 96)):  # dynamic batch and size
        (got,) = session.run(["logits"], {"raw": x.numpy()})
        assert got.shape == (x.shape[0], 2, *x.shape[2:])
        diff = np.abs(got - _reference(ckpt_path, x).numpy()).max()
        assert diff <= ONNX_TOLERANCE, diff


def test_export_uses_the_ema_weights(ckpt_path: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(ckpt_path, weights_only=True)
    assert "current_model_state" in checkpoint  # trained with EMA: raw weights kept aside
    raw = {k.removeprefix("net."): v for k, v in checkpoint["current_model_state"].items()}
    averaged = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()}
    name = next(k for k in averaged if not torch.equal(averaged[k], raw[k]))
    output = export_model(ckpt_path, "torchscript", tmp_path / "ema.pt", tile=32)
    exported = torch.jit.load(str(output)).state_dict()
    assert torch.equal(exported[name], averaged[name])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["format=keras", "output={tmp}/m.h5"],
            r"format must be one of \['torchscript', 'onnx', 'bioimageio'\], got 'keras'",
        ),
        (["format=onnx", "output={tmp}/m.pt"], r"output=.*m\.pt: a onnx export is a \.onnx file"),
        (["format=onnx", "output={tmp}/missing/m.onnx"], r"its folder .*missing does not exist"),
    ],
)
def test_bad_export_is_one_line(
    args: list[str], expected: str, ckpt_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import re

    from joenet.cli import exit_on_error

    options = dict(a.format(tmp=tmp_path).split("=", 1) for a in args)
    with pytest.raises(SystemExit) as info:
        exit_on_error(export_model)(ckpt_path=ckpt_path, **options)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(expected, err), err


def test_export_refuses_a_checkpoint_that_is_not_joenets(tmp_path: Path) -> None:
    bare = tmp_path / "bare.ckpt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(ValueError, match=r"bare\.ckpt: not a joenet training checkpoint"):
        export_model(bare, "torchscript", tmp_path / "m.pt")


def test_unwritable_output_is_one_line(
    ckpt_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from joenet.cli import exit_on_error
    from joenet.export import exporter

    # As a read-only folder looks to a normal user (root passes every permission check).
    monkeypatch.setattr(exporter.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit):
        exit_on_error(export_model)(ckpt_path, "onnx", tmp_path / "m.onnx")
    err = capsys.readouterr().err
    assert f"error: permission denied: {tmp_path} (is the output directory writable?)" in err


@pytest.mark.slow  # a subprocess
def test_export_cli(ckpt_path: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "joenet.export",
            f"ckpt_path={ckpt_path}",
            "format=torchscript",
            f"output={tmp_path / 'm.pt'}",
            "tile=32",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {tmp_path / 'm.pt'}" in result.stdout
    assert torch.jit.load(str(tmp_path / "m.pt"))(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_bioimageio_package_validates_and_reproduces_its_test_output(
    ckpt_path: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bioimageio.core", reason='pip install "joenet[export]"')
    import zipfile

    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    output = export_model(ckpt_path, "bioimageio", tmp_path / "joenet.zip", tile=64)
    names = set(zipfile.ZipFile(output).namelist())
    assert {"rdf.yaml", "weights.pt", "weights.onnx", "test_input.npy", "test_output.npy"} <= names
    assert {"cover.png", "README.md"} <= names
    descr = load_description(output)
    assert descr.validation_summary.status == "valid-format", descr.validation_summary.format()
    for weights in ("torchscript", "onnx"):
        assert test_model(output, weight_format=weights).status == "passed", weights
    (inputs,), (outputs,) = descr.inputs, descr.outputs
    steps = [step.id for step in inputs.preprocessing]
    assert "scale_linear" in steps and "clip" in steps
    scale = next(step for step in inputs.preprocessing if step.id == "scale_linear")
    assert scale.kwargs.gain == pytest.approx(1 / 255)  # the checkpoint's uint8 dtype range
    assert [step.id for step in outputs.postprocessing if step.id != "ensure_dtype"] == ["sigmoid"]
    channel = next(axis for axis in outputs.axes if axis.type == "channel")
    assert [str(n) for n in channel.channel_names] == ["nuclei", "mito"]
    model = load_model(ckpt_path)
    assert all(
        axis.halo == halo(model.receptive_field, model.divisor)
        for axis in outputs.axes
        if axis.type == "space"
    )
    assert str(descr.license) == "MIT"
    assert descr.config.model_extra["joenet"]["class_names"] == ["nuclei", "mito"]
