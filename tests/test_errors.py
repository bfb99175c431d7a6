"""Bad input: one clear line naming the file, the key and what was expected; exit 1; no traceback.

One test per row of docs/errors.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from omegaconf import DictConfig

from joenet.cli import exit_on_error
from joenet.train import train
from tests.helpers import compose_train, tiny_overrides, train_tiny_checkpoint


def _run_train(cfg: DictConfig, capsys: pytest.CaptureFixture) -> str:
    """Run training as the CLI does; return the single error line it printed."""
    with pytest.raises(SystemExit) as info:
        exit_on_error(train)(cfg)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _volume(path: Path, raw: np.ndarray, **labels: np.ndarray) -> str:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("raw", data=raw, chunks=(1, *raw.shape[1:]))
    for name, data in labels.items():
        group.create_array(f"labels/{name}", data=data, chunks=(1, *data.shape[1:]))
    return str(path)


def _good_raw() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (12, 96, 96), dtype=np.uint8)


def _mito() -> np.ndarray:
    return (np.random.default_rng(1).random((12, 96, 96)) > 0.9).astype(np.uint8)


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "missing path": (
        lambda tmp: ["data.path=" + str(tmp / "nope.zarr")],
        r"nope\.zarr: no such file or directory \(expected a zarr group\)",
    ),
    "not a zarr": (lambda tmp: [f"data.path={tmp}"], r"not a zarr group"),
    "no raw array": (lambda tmp: [f"data.path={_volume_without_raw(tmp)}"], r"no 'raw' array"),
    "labels shaped unlike raw": (
        lambda tmp: [f"data.path={_volume(tmp / 'v.zarr', _good_raw(), mito=_mito()[:, :90])}"],
        r"v\.zarr/labels/mito: shape \(12, 90, 96\) differs from raw \(12, 96, 96\)",
    ),
    "label values not 0/1": (
        lambda tmp: [f"data.path={_volume(tmp / 'v.zarr', _good_raw(), mito=_mito() * 255)}"],
        r"labels/mito: values \[0, 255\] in slice z=0, expected a 0/1 mask\. Convert .*"
        r"joenet\.data\.convert .*--label-mode auto",
    ),
    "unsupported dtype": (
        lambda tmp: [f"data.path={_volume(tmp / 'v.zarr', _good_raw().astype(np.int64))}"],
        r"raw: unsupported dtype int64",
    ),
    "z range out of bounds": (
        lambda tmp: ["data.val_z=[8,13]"],
        r"data\.val_z=\[8, 13\] must be \[start, stop\).*12 slices",
    ),
    "z range empty": (lambda tmp: ["data.train_z=[4,4]"], r"data\.train_z=\[4, 4\] must be"),
    "z ranges overlap": (
        lambda tmp: ["data.train_z=[0,10]"],
        r"data\.train_z \[0, 10\] and data\.val_z \[8, 12\] overlap",
    ),
    "patch larger than the volume": (
        lambda tmp: ["data.patch_size=128"],
        r"slices are 96x96 px but training reads 18[0-9]x18[0-9]",
    ),
    "learning rate not a number": (
        lambda tmp: ["model.lr=abc"],
        r"model\.lr must be a number >= 0, got 'abc'",
    ),
    "misspelt model key": (
        lambda tmp: ["+model.net.chanels=[4,8,16,32]"],
        r"unexpected keyword argument 'chanels': check the spelling",
    ),
    "nan in raw": (
        lambda tmp: [f"data.path={_volume(tmp / 'v.zarr', _nan_raw(), mito=_mito())}"],
        r"v\.zarr/raw: NaN or Inf in raw slice z=\d+",
    ),
    "corrupt chunk": (
        lambda tmp: [f"data.path={_corrupt_volume(tmp)}"],
        r"v\.zarr(/raw)?: cannot (read slice|load its arrays).*chunk is corrupt",
    ),
    "incompatible init_from checkpoint": (
        lambda tmp: [f"init_from={_checkpoint_of_other_model(tmp)}"],
        r"init_from=.*other\.ckpt: its weights do not fit model\.net=",
    ),
    "missing init_from checkpoint": (
        lambda tmp: [f"init_from={tmp / 'gone.ckpt'}"],
        r"init_from=.*gone\.ckpt: no such checkpoint file",
    ),
}


def _volume_without_raw(tmp: Path) -> str:
    group = zarr.open_group(str(tmp / "v.zarr"), mode="w")
    group.create_array("image", data=_good_raw())
    return str(tmp / "v.zarr")


def _nan_raw() -> np.ndarray:
    raw = np.random.default_rng(0).random((12, 96, 96)).astype(np.float32)
    raw[:, 40:50, 40:50] = np.nan
    return raw


def _corrupt_volume(tmp: Path) -> str:
    path = _volume(tmp / "v.zarr", _good_raw(), mito=_mito())
    for chunk in (tmp / "v.zarr" / "raw" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"this is not a zstd frame")
    return path


def _checkpoint_of_other_model(tmp: Path) -> str:
    import torch

    from joenet.lit_module import SegmentationLitModule

    model = SegmentationLitModule(net={"channels": [8, 16, 32, 64]})
    torch.save({"state_dict": model.state_dict()}, tmp / "other.ckpt")
    return str(tmp / "other.ckpt")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line(
    case: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make_overrides, expected = CASES[case]
    overrides = make_overrides(tmp_path)
    if any(o.startswith("data.path=") for o in overrides):
        overrides.append("data.synthetic=null")
    cfg = compose_train([*tiny_overrides(data_dir, tmp_path / "run"), *overrides])
    line = _run_train(cfg, capsys)
    assert re.search(expected, line), line


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "joenet.train", f"paths.log_dir={cwd / 'logs'}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
        timeout=300,
    )


@pytest.mark.slow  # a subprocess
def test_cli_exit_code_and_debug_flag(data_dir: Path, tmp_path: Path) -> None:
    args = [*tiny_overrides(data_dir, tmp_path / "run"), "data.train_z=[0,10]"]
    quiet = _cli(args, tmp_path)
    assert quiet.returncode == 1
    assert "Traceback" not in quiet.stderr
    assert "error: " in quiet.stderr and "overlap" in quiet.stderr
    debug = _cli(args, tmp_path, JOENET_DEBUG="1", HYDRA_FULL_ERROR="1")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr


@pytest.mark.slow  # a subprocess
def test_cli_misspelt_override_and_unwritable_output(tmp_path: Path) -> None:
    misspelt = _cli(["model.nett.down=maxpool"], tmp_path)
    assert misspelt.returncode == 1
    assert "Key 'nett' is not in struct" in misspelt.stderr
    assert "Traceback" not in misspelt.stderr
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    unwritable = _cli([f"paths.log_dir={blocked}/logs"], tmp_path)
    assert unwritable.returncode == 1
    assert f"error: cannot create the run directory {blocked}/logs" in unwritable.stderr
    assert "Traceback" not in unwritable.stderr


def test_resume_with_another_network_is_one_line(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    last = train_tiny_checkpoint(data_dir, tmp_path / "first")
    capsys.readouterr()
    cfg = compose_train(
        [
            *tiny_overrides(data_dir, tmp_path / "resumed"),
            f"ckpt_path={last}",
            "model.net.channels=[8,16,32,64]",
        ]
    )
    line = _run_train(cfg, capsys)
    assert re.search(
        r"ckpt_path=.*last\.ckpt: its weights do not fit model\.net=.*'channels': \[8, 16, 32, 64\]"
        r".*\(trained with net=.*'channels': \[4, 8, 16, 32\].*size mismatch",
        line,
    ), line


def _volume_with_labels(tmp: Path, **labels: np.ndarray) -> list[str]:
    path = tmp / "v.zarr"
    _volume(path, _good_raw(), **labels)
    zarr.open_group(str(path), mode="a").require_group("labels")  # an empty labels/ group
    return [f"data.path={path}", "data.synthetic=null"]


def test_labels_group_without_arrays_is_refused_before_training(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = compose_train(
        [*tiny_overrides(data_dir, tmp_path / "run"), *_volume_with_labels(tmp_path)]
    )
    line = _run_train(cfg, capsys)
    assert re.search(
        r"v\.zarr: no labels for any class \['nuclei', 'mito'\] \(expected labels/<class>", line
    ), line
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step


@pytest.mark.parametrize("foreground_fraction", [0.0, 0.5])  # with and without sampled points
def test_all_zero_labels_are_reported_before_training(
    foreground_fraction: float, data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    zeros = np.zeros((12, 96, 96), np.uint8)
    overrides = _volume_with_labels(tmp_path, mito=zeros, nuclei=_mito())
    overrides.append(f"+data.foreground_fraction={foreground_fraction}")
    cfg = compose_train([*tiny_overrides(data_dir, tmp_path / "run"), *overrides])
    from hydra.utils import instantiate

    with caplog.at_level("WARNING", logger="joenet.data.datamodule"):
        instantiate(cfg.data).setup("fit")
    warnings = [r.getMessage() for r in caplog.records if "all zero" in r.getMessage()]
    assert len(warnings) == 1, caplog.text  # mito only: nuclei has foreground
    assert re.search(
        r"labels/mito are all zero in the training data \(.*v\.zarr z \[0, 8\)\)", warnings[0]
    )
