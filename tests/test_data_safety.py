"""A user's data is never destroyed or silently mixed: prediction outputs, retrained checkpoints,
and raw intensities that do not fit the range their dtype suggests."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from joenet.data.datamodule import EMDataModule
from joenet.evaluate import evaluate_volume
from joenet.predict import predict_volume
from joenet.predict.writer import OutputError
from joenet.volume import VolumeError, fit_normalization
from tests.helpers import CLI_PRECISION

FAST = {"progress": False, "device": "cpu"}


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (or ``root`` itself), by relative path, with its bytes."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _predict_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "joenet.predict",
            *args,
            f"paths.log_dir={cwd / 'logs'}",
            "progress=false",
            "device=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def _copy_volume(volume_path: Path, target: Path) -> Path:
    shutil.copytree(volume_path, target)
    return target


# -- outputs that are, hold or contain the input --------------------------------------------


@pytest.mark.slow  # a subprocess
def test_output_that_is_the_input_is_refused_with_overwrite_too(
    ckpt_path: Path, volume_path: Path, tmp_path: Path
) -> None:
    cell = _copy_volume(volume_path, tmp_path / "cell.zarr")
    before = _snapshot(cell)
    # The reported case, through the real command: raw and labels were deleted.
    result = _predict_cli(
        tmp_path, f"ckpt_path={ckpt_path}", f"input={cell}", f"output={cell}", "overwrite=true"
    )
    line = _one_error_line(result)
    assert "is the input" in line and "overwrite" not in line  # no advice into the loss
    assert _snapshot(cell) == before
    (tmp_path / "link.zarr").symlink_to(cell)
    cases = [
        (cell, cell),  # the input itself, without overwrite
        (cell, cell / "pred.zarr"),  # inside the input group
        (cell, cell / "labels"),  # a group of the input
        (cell / "raw", cell / "pred.zarr"),  # the input is an array: its group is the input's
        (cell / "raw", cell),
        (cell, tmp_path),  # a folder that contains the input
        (cell, tmp_path / "link.zarr"),  # a symlink to the input
    ]
    for source, output in cases:
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="input") as info:
                predict_volume(ckpt_path, source, output, overwrite=overwrite, **FAST)
            assert "overwrite" not in str(info.value)
            assert _snapshot(cell) == before, (source, output, overwrite)


# -- existing paths that are not joenet's -----------------------------------------------------

OPTIONS: list[dict[str, Any]] = [
    {},
    {"overwrite": True},
    {"threshold": 0.5, "instances": True},
    {"threshold": 0.5, "instances": True, "overwrite": True},
    {"z_range": [0, 2]},
    {"planes": "xy,xz,yz", "tta": True, "overwrite": True},
    {"executor": "dask", "n_workers": 1, "overwrite": True},
    {"block_size": 32, "tile": 32, "overlap": 16, "blending": "constant", "overwrite": True},
]


@pytest.mark.slow  # a subprocess
def test_a_folder_of_user_files_survives_every_prediction_option(
    ckpt_path: Path, volume_path: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "results"
    (folder / "figures").mkdir(parents=True)
    (folder / "notes.txt").write_text("three weeks of annotation notes\n")
    (folder / "figures" / "panel.png").write_bytes(b"\x89PNG not really")
    other_zarr = _copy_volume(volume_path, tmp_path / "other.zarr")  # a zarr, not a prediction
    a_file = tmp_path / "table.csv"
    a_file.write_text("z,count\n0,3\n")
    targets = {path: _snapshot(path) for path in (folder, other_zarr, a_file)}
    result = _predict_cli(
        tmp_path,
        f"ckpt_path={ckpt_path}",
        f"input={volume_path}",
        f"output={folder}",
        "overwrite=true",
    )
    line = _one_error_line(result)
    assert "is not a joenet prediction" in line and "notes.txt" in line
    assert "overwrite" not in line
    for target, before in targets.items():
        for options in OPTIONS:
            with pytest.raises(OutputError, match="choose a new path"):
                predict_volume(ckpt_path, volume_path, target, **{**FAST, **options})
            assert _snapshot(target) == before, (target, options)


def test_overwrite_replaces_only_what_prediction_wrote(
    ckpt_path: Path, volume_path: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory holds nothing to lose: it is used as a new output
    predict_volume(ckpt_path, volume_path, empty, z_range=[0, 1], **FAST)
    assert set(zarr.open_group(str(empty), mode="r").array_keys()) == {"nuclei", "mito"}
    output = predict_volume(ckpt_path, volume_path, tmp_path / "pred.zarr", z_range=[0, 1], **FAST)
    (output / "my_notes.txt").write_text("keep me\n")
    with pytest.raises(OutputError, match=r"also holds \['my_notes.txt'\]"):
        predict_volume(ckpt_path, volume_path, output, tile=128, overwrite=True, **FAST)
    assert (output / "my_notes.txt").read_text() == "keep me\n"
    (output / "my_notes.txt").unlink()
    predict_volume(ckpt_path, volume_path, output, tile=128, overwrite=True, **FAST)
    assert zarr.open_group(str(output), mode="r").attrs["joenet"]["fingerprint"]["tile"] == 128


# -- the completion record identifies the model by its weights --------------------------------


def _save(ckpt_path: Path, target: Path, change: float) -> None:
    """The checkpoint re-saved, one weight tensor shifted by ``change``: as a retrained model,
    same layout, same file size."""
    checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    state = checkpoint["state_dict"]
    key = next(k for k, v in state.items() if v.dtype.is_floating_point and v.numel() > 8)
    state[key] = state[key] + change
    torch.save(checkpoint, target)


@pytest.mark.slow  # a subprocess
def test_a_model_retrained_into_the_same_path_never_mixes_outputs(
    ckpt_path: Path, volume_path: Path, tmp_path: Path
) -> None:
    model = tmp_path / "best.ckpt"
    _save(ckpt_path, model, 0.0)
    output = tmp_path / "pred.zarr"
    common = (f"ckpt_path={model}", f"input={volume_path}", f"output={output}")
    first = _predict_cli(tmp_path, *common, "z_range=[0,4]")  # a partly finished prediction
    assert first.returncode == 0, first.stderr[-3000:]
    size = model.stat().st_size
    _save(ckpt_path, model, 0.5)  # retrained into the same path
    assert model.stat().st_size == size  # what the old record compared, with the path
    before = _snapshot(output)
    line = _one_error_line(_predict_cli(tmp_path, *common))
    assert "other settings" in line and "weights:" in line
    assert _snapshot(output) == before  # nothing of the second model was written
    again = _predict_cli(tmp_path, *common, "overwrite=true")  # starts that prediction over
    assert again.returncode == 0, again.stderr[-3000:]
    fresh = predict_volume(
        model, volume_path, tmp_path / "fresh.zarr", precision=CLI_PRECISION, **FAST
    )
    got, want = zarr.open_group(str(output), mode="r"), zarr.open_group(str(fresh), mode="r")
    for name in ("nuclei", "mito"):
        # Levels round(255 p): two processes may put a value either side of a rounding edge
        # (seen once in 110,592); a mixed output would differ nearly everywhere.
        difference = np.abs(got[name][...].astype(int) - want[name][...].astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, name
    # The same weights under another name are the same model: the output resumes as it is.
    moved = tmp_path / "moved.ckpt"
    shutil.copy(model, moved)
    predict_volume(moved, volume_path, output, precision=CLI_PRECISION, **FAST)


# -- intensities that do not fit their dtype's assumed range ---------------------------------


def _raw_variant(volume_path: Path, target: Path, raw: np.ndarray) -> Path:
    """A copy of the volume (labels and attributes included) with another raw array."""
    shutil.copytree(volume_path, target)
    group = zarr.open_group(str(target), mode="r+")
    chunks = group["raw"].chunks
    del group["raw"]
    group.create_array("raw", data=raw, chunks=chunks)
    return target


def test_prediction_reads_uint16_and_float_raw_by_their_real_range(
    ckpt_path: Path, volume_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = zarr.open_group(str(volume_path), mode="r")["raw"][...]
    assert raw.dtype == np.uint8 and raw.max() > 200
    twelve_bit = np.rint(raw.astype(np.float64) * 4095 / 255).astype(np.uint16)
    variants = {
        "uint16_8bit": raw.astype(np.uint16),  # was scaled to at most 0.004
        "uint16_12bit": twelve_bit,  # was scaled to at most 0.06
        "float64_0_255": raw.astype(np.float64),  # was clipped to 1.0 almost everywhere
    }
    kwargs = {"z_range": [0, 2], **FAST}
    reference = predict_volume(ckpt_path, volume_path, tmp_path / "uint8.zarr", **kwargs)
    expected = zarr.open_group(str(reference), mode="r")
    for name, values in variants.items():
        source = _raw_variant(volume_path, tmp_path / f"{name}.zarr", values)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="joenet"):
            output = predict_volume(ckpt_path, source, tmp_path / f"pred_{name}.zarr", **kwargs)
        bits = "12-bit" if name == "uint16_12bit" else "8-bit"
        assert any(bits in record.getMessage() for record in caplog.records), name
        got = zarr.open_group(str(output), mode="r")
        for cls in ("nuclei", "mito"):
            diff = np.abs(got[cls][:2].astype(int) - expected[cls][:2].astype(int))
            assert diff.max() <= (2 if name == "uint16_12bit" else 0), (name, cls, diff.max())
    # Float raw that no bit depth explains is refused, with what to do instead.
    z_scored = (raw - raw.mean()) / raw.std()
    source = _raw_variant(volume_path, tmp_path / "zscored.zarr", z_scored.astype(np.float32))
    with pytest.raises(VolumeError, match=r"zscored\.zarr/raw: float raw values span \[-"):
        predict_volume(ckpt_path, source, tmp_path / "pred_z.zarr", **kwargs)
    assert not (tmp_path / "pred_z.zarr").exists()


def test_training_reads_raw_by_its_real_range(volume_path: Path, tmp_path: Path) -> None:
    raw = zarr.open_group(str(volume_path), mode="r")["raw"][...]
    options = {
        "train_z": (0, 8),
        "val_z": (8, 12),
        "patch_size": 32,
        "batch_size": 2,
        "patches_per_epoch": 4,
        "num_workers": 0,
    }

    def first_patch(path: Path) -> tuple[np.ndarray, dict]:
        data = EMDataModule(path=str(path), **options)
        data.setup("fit")
        return data.val_dataset[0]["image"].numpy(), data.state_dict()["normalization"]

    want, normalization = first_patch(volume_path)
    assert normalization == {"kind": "dtype_range"}
    float_raw = _raw_variant(volume_path, tmp_path / "f.zarr", raw.astype(np.float64))
    got, normalization = first_patch(float_raw)
    np.testing.assert_array_equal(got, want)  # was all 1.0 but the black pixels
    assert normalization == {"kind": "dtype_range", "bit_depth": 8}  # what the checkpoint keeps
    twelve = _raw_variant(volume_path, tmp_path / "u.zarr", raw.astype(np.uint16) * 16)
    got, normalization = first_patch(twelve)
    assert normalization == {"kind": "dtype_range", "bit_depth": 12}
    np.testing.assert_allclose(got, want * (255 * 16 / 4095), atol=1e-6)
    z_scored = _raw_variant(volume_path, tmp_path / "z.zarr", (raw - 128.0) / 40.0)
    with pytest.raises(VolumeError, match=r"z\.zarr/raw: .*\+data\.volume\.normalization="):
        first_patch(z_scored)


def test_range_checks_keep_what_fits_and_warn_on_what_looks_wrong(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain = {"kind": "dtype_range"}
    unit = np.linspace(-0.005, 1.005, 100)  # interpolation overshoot: clipped, not refused
    assert fit_normalization(unit, plain, "v", "fix") == plain
    full = np.array([0, 40000], np.uint16)
    assert fit_normalization(full, plain, "v", "fix") == plain
    assert fit_normalization(np.array([0, 1023], np.uint16), plain, "v", "")["bit_depth"] == 10
    # A checkpoint's bit depth is resolved anew for the data at hand (here: all 16 bits).
    assert fit_normalization(full, {**plain, "bit_depth": 12}, "v", "fix") == plain
    with caplog.at_level(logging.WARNING, logger="joenet"):
        assert fit_normalization(np.array([100, 130], np.uint8), plain, "v", "") == plain
        fixed = {"kind": "fixed", "min": 0.0, "max": 4095.0}
        assert fit_normalization(np.arange(256, dtype=np.uint8), fixed, "v", "") == fixed
        fit_normalization(np.full(10, 9000, np.uint16), fixed, "v", "")
    messages = [record.getMessage() for record in caplog.records]
    assert any("low contrast" in m for m in messages)
    assert any("another bit depth" in m for m in messages)
    assert any("100% of the sampled intensities lie outside" in m for m in messages)


def test_evaluate_refuses_float_predictions_outside_0_1(volume_path: Path, tmp_path: Path) -> None:
    labels = zarr.open_group(str(volume_path), mode="r")["labels/mito"][...]
    for values, hint in ((labels * 255.0, "divide by 255"), (labels * 8.0 - 4.0, "sigmoid")):
        group = zarr.open_group(str(tmp_path / "p.zarr"), mode="w")
        group.create_array("mito", data=values.astype(np.float32), chunks=(1, 96, 96))
        with pytest.raises(ValueError, match=rf"p\.zarr/mito: float values span .*{hint}"):
            evaluate_volume(tmp_path / "p.zarr", volume_path, instances=False)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="w")
    group.create_array("mito", data=labels.astype(np.float32), chunks=(1, 96, 96))
    results = evaluate_volume(tmp_path / "p.zarr", volume_path, instances=False)
    assert results["metrics"]["mito"]["iou"] == pytest.approx(1.0)
