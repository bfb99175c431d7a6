"""Tests for ``python -m joenet.data.convert``: readers, label modes, errors, atomic writes, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from joenet import __version__
from joenet.convert import ConvertError, convert
from joenet.convert import converter as convert_module
from joenet.convert.readers import SourceError, natural_key, open_source
from joenet.volume import ZarrVolume

# The io formats are optional dependencies: a test skips, saying why, when its package is absent.
tifffile = pytest.importorskip("tifffile", reason="TIFF input needs tifffile")
SHAPE = (6, 40, 56)


def _raw(dtype: type = np.uint8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, SHAPE).astype(dtype)


def _instances() -> np.ndarray:
    ids = np.zeros(SHAPE, dtype=np.uint16)
    ids[:, 4:12, 4:12] = 3
    ids[:, 20:30, 30:50] = 700
    ids[2:4, 30:38, 2:10] = 1
    return ids


def _tif(path: Path, data: np.ndarray) -> str:
    tifffile.imwrite(path, data)
    return str(path)


def _leftovers(path: Path) -> list[Path]:
    return [p for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.")]


def test_tiff_stack_and_slice_folder_to_layout(tmp_path: Path) -> None:
    raw, ids = _raw(), _instances()
    mito_folder = tmp_path / "mito"
    mito_folder.mkdir()
    for z in range(SHAPE[0]):  # 0/255 masks, one TIFF per slice
        tifffile.imwrite(mito_folder / f"m_{z}.tif", ((ids[z] > 0) * 255).astype(np.uint8))
    out = convert(
        tmp_path / "cell.zarr",
        _tif(tmp_path / "raw.tif", raw),
        {"mito": str(mito_folder), "nuclei": _tif(tmp_path / "nuc.tif", (ids == 3).astype("u1"))},
        voxel_size_nm=(40, 4.5, 4.5),
        chunks=(2, 16, 32),
    )
    group = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(group["raw"][:], raw)
    np.testing.assert_array_equal(group["labels/mito"][:], ids > 0)
    np.testing.assert_array_equal(group["labels/nuclei"][:], ids == 3)
    for key in ("raw", "labels/mito", "labels/nuclei"):
        assert group[key].dtype == np.uint8
        assert group[key].chunks == (2, 16, 32)
        assert isinstance(group[key].compressors[0], zarr.codecs.ZstdCodec)
    attrs = dict(group.attrs)
    assert attrs["voxel_size_nm"] == [40, 4.5, 4.5]
    assert attrs["axes"] == "zyx"
    assert attrs["labels_available"] == ["mito", "nuclei"]
    assert attrs["source"]["raw"] == str((tmp_path / "raw.tif").resolve())
    assert attrs["source"]["labels/mito"] == str(mito_folder.resolve())
    assert attrs["converter"]["label_mode"] == "auto"
    assert attrs["converter"]["version"] == __version__
    assert attrs["converter"]["labels"]["labels/mito"].startswith("0/255 mask -> 0/1")
    assert attrs["converter"]["labels"]["labels/nuclei"].startswith("0/1 mask kept")
    assert not _leftovers(out)

    volume = ZarrVolume(out, class_names=("nuclei", "mito"))
    assert volume.shape == SHAPE
    assert volume.voxel_size_nm == [40, 4.5, 4.5]
    image, target, valid = volume.read(3, 4, 4, 16)
    np.testing.assert_allclose(image[0], raw[3, 4:20, 4:20] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(target[0], ids[3, 4:20, 4:20] == 3)
    np.testing.assert_array_equal(target[1], ids[3, 4:20, 4:20] > 0)
    assert valid.all()  # no --mask: every pixel is annotated


def test_slice_folder_sorts_by_number_not_text(tmp_path: Path) -> None:
    pytest.importorskip("PIL", reason="PNG input needs pillow")
    from PIL import Image

    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(12):  # lexicographic order would put slice_10 before slice_2
        Image.fromarray(np.full((8, 9), z * 10, dtype=np.uint8)).save(folder / f"slice_{z}.png")
    (folder / "notes.txt").write_text("ignored")
    assert sorted(["slice_10", "slice_2"], key=natural_key) == ["slice_2", "slice_10"]
    out = convert(tmp_path / "s.zarr", str(folder))
    raw = zarr.open_group(out, mode="r")["raw"][:]
    assert raw.shape == (12, 8, 9)
    np.testing.assert_array_equal(raw[:, 0, 0], np.arange(12) * 10)


def test_hdf5_datasets_keep_uint16_and_read_by_slabs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h5py = pytest.importorskip("h5py", reason="HDF5 input needs h5py")
    raw = _raw(np.uint16) * 200
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f.create_dataset("volumes/raw", data=raw, chunks=(3, 40, 56))
        f.create_dataset("volumes/labels/mito", data=_instances())
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f.create_dataset("anything", data=_instances())

    reads: list[int] = []
    original = open_source

    def spy(spec: str):  # record slab depths: the converter must never read a whole volume
        source = original(spec)
        read = source.read
        source.read = lambda start, stop: reads.append(stop - start) or read(start, stop)
        return source

    monkeypatch.setattr(convert_module, "open_source", spy)
    out = convert(
        tmp_path / "h.zarr",
        f"{tmp_path / 'vol.h5'}:/volumes/raw",
        {"mito": str(tmp_path / "one.h5")},  # a file with one dataset needs no dataset name
        mask=f"{tmp_path / 'vol.h5'}:volumes/labels/mito",
    )
    group = zarr.open_group(out, mode="r")
    assert group["raw"].dtype == np.uint16
    np.testing.assert_array_equal(group["raw"][:], raw)
    np.testing.assert_array_equal(group["labels/mask"][:], _instances() > 0)
    _, _, valid = ZarrVolume(out, class_names=("mito",)).read(2, 0, 0, (40, 56))
    np.testing.assert_array_equal(valid[0], _instances()[2] > 0)  # joenet reads the mask
    assert group.attrs["labels_available"] == ["mito"]
    assert group.attrs["source"]["raw"].endswith("vol.h5:/volumes/raw")
    assert max(reads) == 3  # whole input chunks along z, not the whole volume

    with pytest.raises(SourceError, match=r"no dataset 'missing'.*volumes/raw"):
        open_source(f"{tmp_path / 'vol.h5'}:/missing")
    with pytest.raises(SourceError, match="several datasets"):
        open_source(str(tmp_path / "vol.h5"))


@pytest.mark.parametrize(
    ("values", "mode", "threshold", "expected", "described"),
    [
        ("01", "auto", None, "fg", "0/1 mask kept"),
        ("0255", "auto", None, "fg", "0/255 mask -> 0/1"),
        ("ids", "auto", None, "fg", "instance ids (max 700)"),
        ("0255", "binary", None, "fg", "nonzero -> 1"),
        ("ids", "instances", None, "fg", "instance ids (max 700)"),
        ("ids", "threshold", 100, "big", "value > 100 -> 1"),
    ],
)
def test_label_modes(
    tmp_path: Path,
    values: str,
    mode: str,
    threshold: float | None,
    expected: str,
    described: str,
) -> None:
    ids = _instances()
    label = {"01": (ids > 0).astype(np.uint8), "0255": (ids > 0) * np.uint8(255), "ids": ids}
    out = convert(
        tmp_path / "l.zarr",
        _tif(tmp_path / "raw.tif", _raw()),
        {"mito": _tif(tmp_path / "mito.tif", label[values])},
        label_mode=mode,  # type: ignore[arg-type]
        label_threshold=threshold,
    )
    group = zarr.open_group(out, mode="r")
    want = ids > 0 if expected == "fg" else ids > 100
    assert group["labels/mito"].dtype == np.uint8
    np.testing.assert_array_equal(group["labels/mito"][:], want)
    assert group.attrs["converter"]["label_mode"] == mode
    assert described in group.attrs["converter"]["labels"]["labels/mito"]


def test_keep_instances_stores_uint32_ids(tmp_path: Path) -> None:
    ids = _instances()
    out = convert(
        tmp_path / "i.zarr",
        _tif(tmp_path / "raw.tif", _raw()),
        {"nuclei": _tif(tmp_path / "ids.tif", ids)},
        label_mode="instances",
        keep_instances=True,
    )
    group = zarr.open_group(out, mode="r")
    assert group["labels/nuclei_instances"].dtype == np.uint32
    np.testing.assert_array_equal(group["labels/nuclei_instances"][:], ids)
    np.testing.assert_array_equal(group["labels/nuclei"][:], ids > 0)
    assert group.attrs["labels_available"] == ["nuclei"]


def test_label_values_auto_cannot_interpret(tmp_path: Path) -> None:
    raw = _tif(tmp_path / "raw.tif", _raw())
    signed = _instances().astype(np.int16)
    signed[0, 0, 0] = -1
    with pytest.raises(ConvertError, match=r"negative label value -1.*threshold"):
        convert(tmp_path / "a.zarr", raw, {"mito": _tif(tmp_path / "neg.tif", signed)})
    probability = np.linspace(0, 1, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    with pytest.raises(ConvertError, match="probability map"):
        convert(tmp_path / "b.zarr", raw, {"mito": _tif(tmp_path / "p.tif", probability)})
    assert not (tmp_path / "a.zarr").exists()
    assert not (tmp_path / "b.zarr").exists()


def test_raw_rescale_and_float_range(tmp_path: Path) -> None:
    raw = np.linspace(0, 1000, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    source = _tif(tmp_path / "f.tif", raw)
    with pytest.raises(ConvertError, match=r"values in \[0, 1000\].*--rescale"):
        convert(tmp_path / "f.zarr", source)
    out = convert(tmp_path / "f.zarr", source, rescale=(0.0, 1000.0))
    stored = zarr.open_group(out, mode="r")["raw"][:]
    assert stored.dtype == np.uint8
    np.testing.assert_allclose(stored, raw * 0.255, atol=0.51)  # rounding, float32 arithmetic
    out = convert(tmp_path / "p.zarr", source, rescale="percentile")
    stored = zarr.open_group(out, mode="r")["raw"][:]
    assert stored.min() == 0 and stored.max() == 255
    unit = convert(tmp_path / "u.zarr", _tif(tmp_path / "u.tif", raw / 1000))
    assert zarr.open_group(unit, mode="r")["raw"].dtype == np.float32


def test_shape_mismatch_names_file_and_shapes(tmp_path: Path) -> None:
    label = _tif(tmp_path / "short.tif", np.zeros((5, 40, 56), dtype=np.uint8))
    with pytest.raises(ConvertError) as err:
        convert(tmp_path / "m.zarr", _tif(tmp_path / "raw.tif", _raw()), {"mito": label})
    assert "short.tif" in str(err.value)
    assert "(5, 40, 56)" in str(err.value) and "(6, 40, 56)" in str(err.value)
    assert not (tmp_path / "m.zarr").exists() and not _leftovers(tmp_path / "m.zarr")


def test_unsupported_inputs_name_the_file_and_the_kinds(tmp_path: Path) -> None:
    (tmp_path / "vol.mrc").write_bytes(b"\0" * 64)
    with pytest.raises(SourceError, match=r"vol\.mrc: unsupported input.*tif.*png.*h5.*n5"):
        convert(tmp_path / "x.zarr", str(tmp_path / "vol.mrc"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty: no \.tif/\.tiff/\.png slices"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "missing.tif"))
    rgb = _tif(tmp_path / "rgb.tif", np.zeros((3, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(SourceError, match=r"rgb\.tif: expected 2D .* single-channel"):
        open_source(rgb)


def test_missing_package_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(SourceError, match=r"needs the 'h5py' package: pip install h5py"):
        open_source(f"{tmp_path / 'vol.h5'}:/raw")
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    (tmp_path / "slice.png").write_bytes(b"not read: the import fails first")
    with pytest.raises(SourceError, match=r"PNG needs the 'pillow' package: pip install pillow"):
        open_source(str(tmp_path / "slice.png"))


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    raw = _tif(tmp_path / "raw.tif", _raw())
    out = convert(tmp_path / "o.zarr", raw)
    with pytest.raises(ConvertError, match="already exists; pass --overwrite"):
        convert(out, raw)
    convert(out, _tif(tmp_path / "raw2.tif", _raw() // 2), overwrite=True)
    np.testing.assert_array_equal(zarr.open_group(out, mode="r")["raw"][:], _raw() // 2)
    assert not _leftovers(out)
    data_folder = tmp_path / "precious"
    data_folder.mkdir()
    (data_folder / "keep.txt").write_text("x")
    with pytest.raises(ConvertError, match="not a zarr group; refusing"):
        convert(data_folder, raw, overwrite=True)
    assert (data_folder / "keep.txt").exists()


def test_failure_mid_conversion_leaves_no_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _tif(tmp_path / "raw.tif", _raw())
    old = convert(tmp_path / "v.zarr", raw)
    calls = []
    write = convert_module._write_slab

    def failing_write(array: zarr.Array, start: int, data: np.ndarray) -> None:
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        calls.append(start)
        write(array, start, data)

    monkeypatch.setattr(convert_module, "_write_slab", failing_write)
    with pytest.raises(OSError, match="simulated"):
        convert(tmp_path / "new.zarr", raw)
    assert not (tmp_path / "new.zarr").exists()
    assert not _leftovers(tmp_path / "new.zarr")
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        convert(old, _tif(tmp_path / "raw2.tif", _raw() // 2), overwrite=True)
    np.testing.assert_array_equal(zarr.open_group(old, mode="r")["raw"][:], _raw())
    assert not _leftovers(old)


def test_signal_stops_between_slabs_and_leaves_no_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(convert_module, "_signals", [15])  # as the CLI's SIGTERM handler records
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "s.zarr", _tif(tmp_path / "raw.tif", _raw()))
    assert not (tmp_path / "s.zarr").exists() and not _leftovers(tmp_path / "s.zarr")


def test_big_endian_uint16_raw_is_kept(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py", reason="HDF5 input needs h5py")
    raw = _raw(np.uint16) * 250
    with h5py.File(tmp_path / "be.h5", "w") as f:  # tifffile would write native byte order
        f.create_dataset("raw", data=raw.astype(">u2"))
    out = convert(tmp_path / "b.zarr", str(tmp_path / "be.h5"))
    stored = zarr.open_group(out, mode="r")["raw"]
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored[:], raw)


def test_n5_dataset_axes_reversed_to_zyx(tmp_path: Path) -> None:
    ts = pytest.importorskip("tensorstore", reason="N5 input needs tensorstore")
    raw = _raw()
    # N5 stores dimensions fastest first: [x, y, z], as Java tools and zarr's N5Store write them.
    spec = {
        "driver": "n5",
        "kvstore": {"driver": "file", "path": str(tmp_path / "c.n5" / "em" / "raw")},
        "metadata": {
            "dimensions": list(SHAPE[::-1]),
            "blockSize": [32, 32, 2],
            "dataType": "uint8",
            "compression": {"type": "gzip"},
        },
        "create": True,
    }
    store = ts.open(spec).result()
    store[...] = raw.T
    out = convert(tmp_path / "n.zarr", f"{tmp_path / 'c.n5'}:/em/raw")
    np.testing.assert_array_equal(zarr.open_group(out, mode="r")["raw"][:], raw)
    assert open_source(str(tmp_path / "c.n5" / "em" / "raw")).shape == SHAPE


def _run_cli(*args: str, module: str = "joenet.convert") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("module", ["joenet.convert", "joenet.data.convert"])  # the first name
def test_cli(module: str, tmp_path: Path) -> None:
    raw = _tif(tmp_path / "raw.tif", _raw())
    mito = _tif(tmp_path / "mito.tif", _instances())
    options = ["--voxel-size", "8", "4", "4", "--chunks", "1", "32", "32", "--no-progress"]
    ok = _run_cli(
        str(tmp_path / "c.zarr"), "--raw", raw, "--label", f"mito={mito}", *options, module=module
    )
    assert ok.returncode == 0, ok.stderr
    assert "labels/mito: instance ids (max 700) -> 0/1 foreground (auto)" in ok.stderr
    group = zarr.open_group(tmp_path / "c.zarr", mode="r")
    assert group["raw"].chunks == (1, 32, 32)
    assert group.attrs["voxel_size_nm"] == [8, 4, 4]

    missing = tmp_path / "nowhere.tif"
    bad = _run_cli(str(tmp_path / "d.zarr"), "--raw", str(missing), module=module)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"error: {missing}: no such file or directory"]
    assert not (tmp_path / "d.zarr").exists()
