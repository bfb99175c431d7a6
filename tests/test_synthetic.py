"""Tests for the synthetic EM volume generator: layout, determinism, EM-likeness, caching."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from joenet.synthetic import (
    ensure_synthetic_volume,
    generate_synthetic_volume,
    render_synthetic_volume,
)
from joenet.synthetic import generator as synthetic

SHAPE = (8, 96, 128)
# Erode within each slice only: a z-slab border is not a nuclear envelope.
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_volume(tmp_path_factory.mktemp("syn") / "vol.zarr", SHAPE, seed=0)


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return group["raw"][:], group["labels/nuclei"][:], group["labels/mito"][:]


def _z_iou(mask: np.ndarray) -> float:
    """IoU of each slice with the next, pooled over the stack."""
    a, b = mask[:-1].astype(bool), mask[1:].astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_layout_dtypes_and_attrs(volume: Path) -> None:
    group = zarr.open_group(volume, mode="r")
    assert group.metadata.zarr_format == 3
    for name in ("raw", "labels/nuclei", "labels/mito"):
        array = group[name]
        assert array.shape == SHAPE
        assert array.dtype == np.uint8
        assert array.chunks == (1, 96, 128)  # default (1, 256, 256) clipped to the shape
    attrs = dict(group.attrs)
    assert attrs["name"] == "synthetic_em"
    assert attrs["source"] == "joenet synthetic generator"
    assert attrs["voxel_size_nm"] == [8, 8, 8]
    assert attrs["axes"] == "zyx"
    assert attrs["labels_available"] == ["nuclei", "mito"]
    assert attrs["generator"] == {"seed": 0, "shape": list(SHAPE), "version": synthetic.VERSION}
    # Nothing but the finished group is left beside it.
    assert sorted(p.name for p in volume.parent.iterdir()) == ["vol.zarr"]


def test_labels_binary_disjoint_with_plausible_fractions(volume: Path) -> None:
    _, nuclei, mito = _arrays(volume)
    assert set(np.unique(nuclei)) == {0, 1}
    assert set(np.unique(mito)) == {0, 1}
    assert not (nuclei & mito).any()
    assert 0.05 < nuclei.mean() < 0.3
    assert 0.02 < mito.mean() < 0.12


def test_same_seed_is_byte_identical_other_seed_differs(volume: Path, tmp_path: Path) -> None:
    again = generate_synthetic_volume(tmp_path / "again.zarr", SHAPE, seed=0)
    other = generate_synthetic_volume(tmp_path / "other.zarr", SHAPE, seed=1)
    for a, b in zip(_arrays(volume), _arrays(again), strict=True):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(_arrays(volume), _arrays(other), strict=True):
        assert not np.array_equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_looks_like_em(seed: int) -> None:
    raw, nuclei, mito = render_synthetic_volume(SHAPE, seed)
    raw = raw.astype(np.float64)
    nuclei, mito = nuclei.astype(bool), mito.astype(bool)
    background = ~nuclei & ~mito

    assert raw[mito].mean() < raw[background].mean() - 20
    shell = nuclei & ~ndimage.binary_erosion(nuclei, IN_PLANE, iterations=2, border_value=1)
    interior = ndimage.binary_erosion(nuclei, IN_PLANE, iterations=6, border_value=1)
    assert interior.any()
    assert raw[shell].mean() < raw[interior].mean() - 30
    # Dark is not enough to be mito: unlabelled dark structures are common too.
    dark = raw < 100
    assert (dark & background).sum() > 0.3 * (dark & mito).sum()
    # Objects are 3D, so neighbouring slices agree (a z split of the volume is meaningful).
    assert _z_iou(mito) > 0.5
    assert _z_iou(nuclei) > 0.5
    low, high = np.percentile(raw, [1, 99])
    assert high - low > 100


def test_render_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="three positive"):
        render_synthetic_volume((0, 96, 128), seed=0)
    with pytest.raises(ValueError, match="at least 32"):
        render_synthetic_volume((8, 16, 128), seed=0)


def test_ensure_reuses_a_complete_volume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "cache.zarr"
    assert ensure_synthetic_volume(path, SHAPE, seed=0) == path
    mtime = (path / "zarr.json").stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a valid cache must not be regenerated")

    monkeypatch.setattr(synthetic, "generate_synthetic_volume", fail)
    assert ensure_synthetic_volume(str(path), SHAPE, seed=0) == path
    # Hydra passes the shape as a list: still the same volume.
    assert ensure_synthetic_volume(path, list(SHAPE), seed=0) == path  # type: ignore[arg-type]
    assert (path / "zarr.json").stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="must not"):
        ensure_synthetic_volume(path, SHAPE, seed=1)  # another seed is not a cache hit


def test_ensure_regenerates_for_another_seed(volume: Path, tmp_path: Path) -> None:
    path = ensure_synthetic_volume(tmp_path / "cache.zarr", SHAPE, seed=0)
    ensure_synthetic_volume(path, SHAPE, seed=1)
    group = zarr.open_group(path, mode="r")
    assert group.attrs["generator"]["seed"] == 1
    assert not np.array_equal(group["raw"][:], _arrays(volume)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.zarr"]


def test_leftover_tmp_dir_is_not_a_cache(tmp_path: Path) -> None:
    path = tmp_path / "cache.zarr"
    # A complete volume that never got renamed into place (the run died just before).
    tmp = generate_synthetic_volume(tmp_path / "cache.zarr.tmp-999999", SHAPE, seed=0)
    assert not path.exists()
    ensure_synthetic_volume(path, SHAPE, seed=0)
    assert synthetic._is_complete(path, SHAPE, seed=0)
    assert tmp.exists()  # too young to be judged abandoned, so left alone


@pytest.mark.parametrize("partial", ["no_generator_attrs", "missing_label_array"])
def test_partial_group_is_regenerated(partial: str, volume: Path, tmp_path: Path) -> None:
    path = tmp_path / "cache.zarr"
    group = zarr.open_group(path, mode="w")
    for name in ("raw", "labels/nuclei", "labels/mito"):
        if partial == "missing_label_array" and name == "labels/mito":
            continue
        group.create_array(name, shape=SHAPE, dtype=np.uint8, chunks=(1, 96, 128))
    if partial == "missing_label_array":
        group.attrs["generator"] = {"seed": 0, "shape": list(SHAPE), "version": synthetic.VERSION}
    assert not synthetic._is_complete(path, SHAPE, seed=0)
    ensure_synthetic_volume(path, SHAPE, seed=0)
    for a, b in zip(_arrays(path), _arrays(volume), strict=True):
        assert np.array_equal(a, b)


def test_interrupted_generation_leaves_nothing_at_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "cache.zarr"

    def crash(*args: object) -> dict:
        raise KeyboardInterrupt  # dies after the arrays are written, before the final attrs

    monkeypatch.setattr(synthetic, "_generator_attrs", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_volume(path, SHAPE, seed=0)
    assert not path.exists()
    assert not (tmp_path / "cache.zarr.lock").exists()
    monkeypatch.undo()
    ensure_synthetic_volume(path, SHAPE, seed=0)
    assert synthetic._is_complete(path, SHAPE, seed=0)


def test_concurrent_ensure_generates_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "cache.zarr"
    calls: list[int] = []
    real = synthetic.generate_synthetic_volume

    def counting(*args: object, **kwargs: object) -> Path:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(synthetic, "generate_synthetic_volume", counting)
    threads = [
        threading.Thread(target=ensure_synthetic_volume, args=(path, SHAPE, 0)) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert synthetic._is_complete(path, SHAPE, seed=0)


@pytest.mark.slow  # a subprocess
def test_lock_of_a_dead_process_is_broken(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "cache.zarr.lock"
    lock.write_text(f"{socket.gethostname()} {dead.pid}")
    assert synthetic._lock_is_stale(lock)
    ensure_synthetic_volume(tmp_path / "cache.zarr", SHAPE, seed=0)
    assert not lock.exists()
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    assert not synthetic._lock_is_stale(lock)
