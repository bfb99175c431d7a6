"""Prediction: the CLI contract, resume, seamless tiling, TTA/planes, instances, Dask, errors."""

from __future__ import annotations

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
from scipy import ndimage
from torch import nn

from joenet import checkpoint
from joenet.model import UNet2d
from joenet.predict import predict_volume
from joenet.predict import work_units as block_ops
from joenet.volume import VolumeError
from tests.helpers import CLI_PRECISION, TINY_SHAPE

FAST = {"progress": False, "device": "cpu"}


def _chunk_bytes(output: Path) -> dict[str, bytes]:
    """Every stored chunk of the class arrays, by relative path."""
    return {
        str(path.relative_to(output)): path.read_bytes()
        for name in ("nuclei", "mito")
        for path in sorted((output / name).rglob("c/**/*"))
        if path.is_file()
    }


@pytest.mark.slow  # a subprocess
def test_cli_writes_ome_zarr(ckpt_path: Path, volume_path: Path, tmp_path: Path) -> None:
    output = tmp_path / "pred.zarr"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "joenet.predict",
            f"ckpt_path={ckpt_path}",
            f"input={volume_path}",
            f"output={output}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    group = zarr.open_group(str(output), mode="r")
    source = zarr.open_group(str(volume_path), mode="r")["raw"]
    for name in ("nuclei", "mito"):
        array = group[name]
        assert array.shape == TINY_SHAPE and array.chunks == source.chunks
        assert array.dtype == np.uint8
        values = array[...]
        assert values.min() < values.max()  # a real prediction, not a constant
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    assert [entry["name"] for entry in ome["multiscales"]] == ["nuclei", "mito"]
    dataset = ome["multiscales"][1]["datasets"]
    assert dataset[0]["path"] == "mito" and len(dataset) == 1
    assert dataset[0]["coordinateTransformations"] == [{"type": "scale", "scale": [8, 8, 8]}]
    meta = group.attrs["joenet"]
    assert meta["checkpoint"] == str(ckpt_path.resolve())
    assert meta["config"]["tile"] == 256 and meta["config"]["ckpt_path"] == str(ckpt_path)
    assert meta["version"] == __import__("joenet").__version__
    assert group["mito"].attrs["joenet"]["checkpoint"] == str(ckpt_path.resolve())
    assert (tmp_path / "logs" / "predict" / "runs").is_dir()
    # z_range writes only its slices, with the same values as the whole-volume run (in the
    # precision the CLI's auto picked on this CPU: conftest pins in-process prediction to fp32).
    partial = predict_volume(
        ckpt_path,
        volume_path,
        tmp_path / "part.zarr",
        z_range=[3, 6],
        precision=CLI_PRECISION,
        **FAST,
    )
    part = zarr.open_group(str(partial), mode="r")["nuclei"][...]
    np.testing.assert_array_equal(part[3:6], group["nuclei"][3:6])
    assert not part[:3].any() and not part[6:].any()


def test_resume_after_kill_is_identical(
    ckpt_path: Path,
    volume_path: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = tmp_path / "pred.zarr"
    write_block, computed = block_ops.write_block, []

    def write_then_die(group: zarr.Group, job: Any, block: Any, values: np.ndarray) -> None:
        if len(computed) == 2:
            raise KeyboardInterrupt("killed")  # as if the job died before writing block 3
        write_block(group, job, block, values)
        computed.append(block.index)

    monkeypatch.setattr(block_ops, "write_block", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        predict_volume(ckpt_path, volume_path, output, z_range=[0, 4], **FAST)
    monkeypatch.setattr(block_ops, "write_block", write_block)
    compute_block, recomputed = block_ops.compute_block, []

    def counting(job: Any, predictor: Any, inputs: list) -> np.ndarray:
        recomputed.append(inputs[0].region)
        return compute_block(job, predictor, inputs)

    monkeypatch.setattr(block_ops, "compute_block", counting)
    predict_volume(ckpt_path, volume_path, output, z_range=[0, 4], **FAST)
    assert len(recomputed) == 2  # of 4 blocks, the 2 finished ones were skipped
    assert {region[0] for region in recomputed} == {(2, 3), (3, 4)}
    assert _chunk_bytes(output) == _chunk_bytes(reference)
    assert len(_chunk_bytes(reference)) > 0
    done = zarr.open_array(str(output / ".joenet" / "done"), mode="r")[...]
    assert done[:4].all() and not done[4:].any()
    with pytest.raises(ValueError, match="other settings"):
        predict_volume(ckpt_path, volume_path, output, z_range=[0, 4], tile=128, **FAST)


class _Pointwise(nn.Module):
    """A per-pixel model (logits = 20 (x - 0.5) for both classes): known output, any geometry."""

    divisor = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([20 * (x - 0.5), 20 * (x - 0.5)], dim=1)


def _fake_checkpoint(
    ckpt_path: Path,
    tmp_path: Path,
    net: nn.Module,
    normalization: dict | None = None,
    divisor: int = 8,
    receptive_field: int = 1,
) -> Path:
    """A checkpoint path whose cached model is ``net`` (the file is a copy of a real one)."""
    fake = tmp_path / "fake.ckpt"
    shutil.copy(ckpt_path, fake)
    checkpoint._CACHE[(str(fake.resolve()), "cpu")] = checkpoint.LoadedModel(
        net=net,
        class_names=["nuclei", "mito"],
        voxel_size_nm=[8.0, 8.0, 8.0],
        normalization=normalization or {"kind": "dtype_range"},
        receptive_field=receptive_field,
        divisor=divisor,
        device=torch.device("cpu"),
    )
    return fake


def _crop(volume_path: Path, crop_path: Path, depth: int) -> None:
    """The first ``depth`` slices of the volume's raw, 48 x 40 px, one chunk per slice."""
    source = zarr.open_group(str(volume_path), mode="r")["raw"]
    crop = zarr.open_group(str(crop_path), mode="w")
    crop.create_array("raw", data=source[:depth, :48, :40], chunks=(1, 48, 40))


def test_a_six_level_network_predicts_any_size(
    ckpt_path: Path, volume_path: Path, tmp_path: Path
) -> None:
    # 48 x 40 px: a lone tile is rounded up to the 6-level network's 32 px grid, not to 16 px
    # (which the network refuses); an overlap off that grid is one clear error.
    _crop(volume_path, tmp_path / "crop.zarr", depth=2)
    net = UNet2d(channels=(2, 4, 4, 4, 4, 4)).eval()
    fake = _fake_checkpoint(
        ckpt_path, tmp_path, net, divisor=net.divisor, receptive_field=net.receptive_field()
    )
    output = predict_volume(fake, tmp_path / "crop.zarr", tmp_path / "six.zarr", **FAST)
    assert zarr.open_group(str(output), mode="r")["mito"].shape == (2, 48, 40)
    with pytest.raises(ValueError, match="overlap must be a multiple of 32 px"):
        predict_volume(fake, tmp_path / "crop.zarr", tmp_path / "o.zarr", overlap=48, **FAST)
    assert not (tmp_path / "o.zarr").exists()  # refused before writing anything


def test_tta_and_planes_invert_their_transforms(
    ckpt_path: Path, volume_path: Path, tmp_path: Path
) -> None:
    _crop(volume_path, tmp_path / "crop.zarr", depth=6)
    fake = _fake_checkpoint(ckpt_path, tmp_path, _Pointwise())
    arrays = {}
    for name, options in {
        "plain": {},
        "tta": {"tta": True},
        "planes": {"planes": "xy,xz,yz"},
        "both": {"tta": True, "planes": ["xy", "xz", "yz"]},
    }.items():
        output = predict_volume(
            fake, tmp_path / "crop.zarr", tmp_path / f"{name}.zarr", **options, **FAST
        )
        arrays[name] = zarr.open_group(str(output), mode="r")["mito"][...]
        assert arrays[name].shape == (6, 48, 40) and arrays[name].dtype == np.uint8
    # A per-pixel model gives the same value whatever flips/rotations/planes it is applied in,
    # so any misplaced inverse transform or axis order would show here.
    for name in ("tta", "planes", "both"):
        np.testing.assert_array_equal(arrays[name], arrays["plain"])
    # With the real (random-ish) tiny model, TTA changes the probabilities.
    kwargs = {"z_range": [0, 1], **FAST}
    plain = predict_volume(ckpt_path, volume_path, tmp_path / "p.zarr", **kwargs)
    tta = predict_volume(ckpt_path, volume_path, tmp_path / "t.zarr", tta=True, **kwargs)
    plain_values = zarr.open_group(str(plain), mode="r")["nuclei"][0]
    tta_values = zarr.open_group(str(tta), mode="r")["nuclei"][0]
    assert not np.array_equal(plain_values, tta_values)


class _RowGradient(nn.Module):
    """logits = 20 (next row - this row): it sees only how the image changes down a plane's rows."""

    divisor = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = torch.nn.functional.pad(x[:, :, 1:] - x[:, :, :-1], (0, 0, 0, 1))
        return torch.cat([20 * step, 20 * step], dim=1)


def test_orthoplanes_see_the_other_axes(ckpt_path: Path, tmp_path: Path) -> None:
    """A ramp along z is flat in every xy plane but not in xz and yz: ``planes`` must show it."""
    depth, step = 6, 40
    ramp = np.broadcast_to(
        (np.arange(depth) * step).astype(np.uint8)[:, None, None], (depth, 48, 40)
    )
    volume = zarr.open_group(str(tmp_path / "ramp.zarr"), mode="w")
    volume.create_array("raw", data=np.ascontiguousarray(ramp), chunks=(1, 48, 40))
    fake = _fake_checkpoint(ckpt_path, tmp_path, _RowGradient())
    values = {}
    for name, planes in {"xy": "xy", "three": ["xy", "xz", "yz"]}.items():
        output = predict_volume(
            fake, tmp_path / "ramp.zarr", tmp_path / f"{name}.zarr", planes=planes, **FAST
        )
        values[name] = zarr.open_group(str(output), mode="r")["mito"][...].astype(int)
    assert (values["xy"] == 128).all()  # flat planes: logit 0, p = 0.5
    # xz and yz planes have z down their rows: p = sigmoid(20 * 40 / 255) there, averaged with xy.
    expected = 255 * (0.5 + 2 * torch.sigmoid(torch.tensor(20 * step / 255)).item()) / 3
    inner = values["three"][1 : depth - 2]  # rows with a true neighbour below in every plane
    assert np.abs(inner - expected).max() <= 2, (inner.min(), inner.max(), expected)


def test_z_range_inside_deep_chunks(ckpt_path: Path, tmp_path: Path) -> None:
    """A z_range that cuts a chunk keeps the chunk's other slices and leaves the block pending."""
    raw = np.random.default_rng(1).integers(0, 256, (8, 32, 32), dtype=np.uint8)
    zarr.open_group(str(tmp_path / "deep.zarr"), mode="w").create_array(
        "raw", data=raw, chunks=(4, 32, 32)
    )
    fake = _fake_checkpoint(ckpt_path, tmp_path, _Pointwise())
    inputs = (fake, tmp_path / "deep.zarr")
    whole = predict_volume(*inputs, tmp_path / "whole.zarr", **FAST)
    output = tmp_path / "parts.zarr"
    predict_volume(*inputs, output, z_range=[0, 2], **FAST)
    predict_volume(*inputs, output, z_range=[2, 7], **FAST)
    done = zarr.open_array(str(output / ".joenet" / "done"), mode="r")[...]
    assert done.ravel().tolist() == [False, False]  # [0, 4) and [4, 8) were cut by the ranges
    parts = zarr.open_group(str(output), mode="r")["mito"][...]
    expected = zarr.open_group(str(whole), mode="r")["mito"][...]
    np.testing.assert_array_equal(parts[:7], expected[:7])
    assert not parts[7].any()
    predict_volume(*inputs, output, **FAST)  # finishes both blocks
    np.testing.assert_array_equal(zarr.open_group(str(output), mode="r")["mito"][...], expected)


def test_threshold_and_instances_match_scipy(ckpt_path: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blobs = ndimage.gaussian_filter(rng.random((6, 64, 64)), sigma=(1, 3, 3)) > 0.52
    expected, count = ndimage.label(blobs)
    assert count > 3
    # Some components cross chunk faces (chunks are (1, 32, 32)): in z, y and x.
    assert (blobs[:-1] & blobs[1:]).any()
    assert (blobs[:, 31] & blobs[:, 32]).any() and (blobs[:, :, 31] & blobs[:, :, 32]).any()
    volume = zarr.open_group(str(tmp_path / "blobs.zarr"), mode="w")
    volume.attrs["voxel_size_nm"] = [8, 10, 10]  # > 10 % from the training data's 8 nm
    volume.create_array("raw", data=blobs.astype(np.uint8) * 255, chunks=(1, 32, 32))
    fake = _fake_checkpoint(ckpt_path, tmp_path, _Pointwise())
    with pytest.warns(UserWarning, match="voxel size"):
        output = predict_volume(
            fake,
            tmp_path / "blobs.zarr",
            tmp_path / "pred.zarr",
            threshold=0.5,
            instances=True,
            **FAST,
        )
    group = zarr.open_group(str(output), mode="r")
    mask = group["nuclei"][...]
    assert set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(mask.astype(bool), blobs)
    labels = group["nuclei_instances"][...]
    assert labels.dtype == np.uint32
    assert labels.max() == count and set(np.unique(labels)) == set(range(count + 1))
    # The same partition: each expected component maps to exactly one label and back.
    pairs = np.unique(np.stack([expected[blobs], labels[blobs]], axis=1), axis=0)
    assert len(pairs) == count
    assert group.attrs["joenet"]["voxel_size_nm"] == [8, 10, 10]


def test_ome_zarr_input_with_fixed_normalization(ckpt_path: Path, tmp_path: Path) -> None:
    """raw as an NGFF 0.5 multiscale image: s0 is predicted, with its scale and the checkpoint's
    ``fixed`` normalisation (min 0, max 100: the pointwise model thresholds at 50)."""
    raw = np.random.default_rng(2).integers(0, 101, (4, 32, 48), dtype=np.uint16)
    group = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    image = group.create_group("raw")
    image.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
                "datasets": [
                    {"path": path, "coordinateTransformations": [{"type": "scale", "scale": s}]}
                    for path, s in (("s0", [8, 8.4, 8.4]), ("s1", [16, 16.8, 16.8]))
                ],
            }
        ],
    }
    image.create_array("s0", data=raw, chunks=(1, 32, 48))
    image.create_array("s1", data=raw[::2, ::2, ::2], chunks=(1, 16, 24))
    fake = _fake_checkpoint(
        ckpt_path, tmp_path, _Pointwise(), {"kind": "fixed", "min": 0, "max": 100}
    )
    output = predict_volume(
        fake, tmp_path / "ome.zarr", tmp_path / "pred.zarr", threshold=0.5, **FAST
    )
    pred = zarr.open_group(str(output), mode="r")
    np.testing.assert_array_equal(pred["mito"][...], (raw >= 50).astype(np.uint8))
    scale = pred.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale == [{"type": "scale", "scale": [8, 8.4, 8.4]}]


def test_dask_executor_matches_local(
    ckpt_path: Path, volume_path: Path, reference: Path, tmp_path: Path
) -> None:
    output = predict_volume(
        ckpt_path,
        volume_path,
        tmp_path / "pred.zarr",
        z_range=[0, 4],
        executor="dask",
        n_workers=2,
        **FAST,
    )
    assert _chunk_bytes(output) == _chunk_bytes(reference)


def test_clear_errors(ckpt_path: Path, volume_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no_such\.ckpt"):
        predict_volume(tmp_path / "no_such.ckpt", volume_path, tmp_path / "a.zarr", **FAST)
    zarr.open_group(str(tmp_path / "no_raw.zarr"), mode="w").create_array(
        "image", shape=(2, 16, 16), dtype=np.uint8
    )
    with pytest.raises(VolumeError, match="no 'raw' array"):
        predict_volume(ckpt_path, tmp_path / "no_raw.zarr", tmp_path / "b.zarr", **FAST)
    with pytest.raises(ValueError, match="multiple of 16"):
        predict_volume(ckpt_path, volume_path, tmp_path / "c.zarr", tile=250, **FAST)
    with pytest.raises(ValueError, match="smaller than tile"):
        predict_volume(ckpt_path, volume_path, tmp_path / "d.zarr", tile=64, overlap=64, **FAST)


def test_disk_full_is_a_clear_error_and_resumes(
    ckpt_path: Path,
    volume_path: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import errno

    from joenet.cli import exit_on_error

    output = tmp_path / "pred.zarr"
    write_block, written = block_ops.write_block, []

    def disk_fills_up(group: zarr.Group, job: Any, block: Any, values: np.ndarray) -> None:
        if len(written) == 2:  # the third block: nuclei written, then the disk is full
            group[job.class_names[0]][tuple(slice(*r) for r in block.region)] = values[0]
            raise OSError(errno.ENOSPC, "No space left on device", str(output / "mito"))
        write_block(group, job, block, values)
        written.append(block.index)

    monkeypatch.setattr(block_ops, "write_block", disk_fills_up)
    with pytest.raises(SystemExit) as info:
        exit_on_error(predict_volume)(ckpt_path, volume_path, output, z_range=[0, 4], **FAST)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"error: no space left on the device while writing {output / 'mito'}" in err
    assert "Traceback" not in err
    # The half-written block was never recorded as done: the rerun redoes it, and only it.
    monkeypatch.setattr(block_ops, "write_block", write_block)
    predict_volume(ckpt_path, volume_path, output, z_range=[0, 4], **FAST)
    assert _chunk_bytes(output) == _chunk_bytes(reference)
