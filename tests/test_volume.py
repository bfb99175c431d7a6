"""ZarrVolume on OME-Zarr (NGFF 0.4/zarr v2, 0.5/zarr v3), CellMap crops, normalisation, URLs."""

from __future__ import annotations

import functools
import http.server
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

from joenet.synthetic.stores import SyntheticStore
from joenet.volume import VolumeError, ZarrVolume, normalize, to_unit_range

RAW = "recon-1/em/fibsem-uint8"
CROPS = "recon-1/labels/groundtruth"


def _multiscale(axes: list[str], unit: str | None, levels: list[tuple[str, list, list]]) -> dict:
    return {
        "axes": [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in axes],
        "datasets": [
            {
                "path": path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": shift},
                ],
            }
            for path, scale, shift in levels
        ],
    }


def _write_ome(
    group: zarr.Group,
    key: str,
    levels: list[tuple[np.ndarray, list, list]],
    attrs: dict | None = None,
    unit: str | None = "nanometer",
) -> None:
    """A multiscale group at ``key`` with levels s0, s1, ... (0.5 on zarr v3, 0.4 on v2)."""
    axes = ["c", "z", "y", "x"][-levels[0][0].ndim :]
    meta = _multiscale(axes, unit, [(f"s{i}", sc, tr) for i, (_, sc, tr) in enumerate(levels)])
    v3 = group.metadata.zarr_format == 3
    ome = (
        {"ome": {"version": "0.5", "multiscales": [meta]}}
        if v3
        else {"multiscales": [{"version": "0.4", **meta}]}
    )
    sub = group.create_group(key, attributes={**ome, **(attrs or {})})
    for i, (data, _, _) in enumerate(levels):
        sub.create_array(f"s{i}", data=data, chunks=(1,) * (data.ndim - 2) + (16, 16))


@pytest.fixture(scope="module")
def cellmap(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """Raw 8x64x64 at 8 nm (+ s1 at 16 nm) and one crop at 4/8 nm covering z 2:4, y 10:26, x 20:36.

    The crop's 8 nm level ``s1`` lines up with raw s0 voxels; its 4 nm ``s0`` has the same labels
    at twice the resolution, with a physical origin half a 4 nm voxel before raw voxel (2, 10, 20).
    """
    path = tmp_path_factory.mktemp("cellmap") / "jrc_test.zarr"
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (8, 64, 64), dtype=np.uint8)
    group = zarr.open_group(str(path), mode="w")
    _write_ome(group, RAW, [(raw, [8, 8, 8], [0, 0, 0]), (raw[::2, ::2, ::2], [16] * 3, [4] * 3)])
    mito = rng.integers(0, 2, (2, 16, 16), dtype=np.uint8)
    nuc = np.zeros((2, 16, 16), dtype=np.uint8)
    nuc[:, :4] = 1
    nuc[:, -3:] = 255  # "unknown" in CellMap's encoding
    encoding = {
        "cellmap": {
            "annotation": {
                "annotation_type": {
                    "type": "semantic_segmentation",
                    "encoding": {"absent": 0, "unknown": 255},
                }
            }
        }
    }
    for key, labels in (("mito", mito), ("nuc", nuc)):
        fine = labels.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        _write_ome(
            group,
            f"{CROPS}/crop1/{key}",
            [(fine, [4] * 3, [14, 78, 158]), (labels, [8] * 3, [16, 80, 160])],
            attrs=encoding,
        )
    return path, mito, nuc


def _cellmap_volume(path: Path, **kwargs) -> ZarrVolume:
    return ZarrVolume(
        path,
        ("nuclei", "mito"),
        raw_key=RAW,
        label_crops=CROPS,
        label_keys={"nuclei": "nuc"},
        **kwargs,
    )


def test_cellmap_crop_is_placed_by_its_physical_offset(cellmap: tuple) -> None:
    path, mito, nuc = cellmap
    volume = _cellmap_volume(path)
    assert volume.shape == (8, 64, 64) and volume.voxel_size_nm == [8.0, 8.0, 8.0]
    assert volume.labelled == (True, True)
    assert volume.annotated_boxes() == [(2, 4, 10, 26, 20, 36)]
    image, target, valid = volume.read(3, 6, 16, 24)  # overlaps the crop's top-left corner
    raw = zarr.open_group(str(path), mode="r")[f"{RAW}/s0"]
    np.testing.assert_allclose(image[0] * 255, raw[3, 6:30, 16:40], atol=1e-4)
    inside = (slice(4, 20), slice(4, 20))  # crop y 10..26, x 20..36 in this window
    np.testing.assert_array_equal(target[1][inside], mito[1])
    np.testing.assert_array_equal(target[0][inside], nuc[1] == 1)
    expected_valid = np.zeros((24, 24), bool)
    expected_valid[4:17, 4:20] = True  # minus the 3 rows where nuc is "unknown"
    np.testing.assert_array_equal(valid[0], expected_valid)
    target[(slice(None), *inside)] = 0
    assert not target.any()  # outside the crop nothing is labelled
    assert volume.read(5, 10, 20, 16)[2].sum() == 0  # z 5 is outside the crop


def test_scale_level_by_voxel_size_maps_crops_to_that_level(cellmap: tuple) -> None:
    path, mito, _ = cellmap
    volume = _cellmap_volume(path, voxel_size_nm=[15, 16, 17])  # within 10 % of s1
    assert volume.shape == (4, 32, 32) and volume.voxel_size_nm == [16.0, 16.0, 16.0]
    # Crop y covers 76..204 nm; s1 voxel i is centred at 16 i + 4 nm, so i = 5..12.
    assert volume.annotated_boxes() == [(1, 2, 5, 13, 10, 18)]
    _, target, valid = volume.read(1, 5, 10, 8)
    assert valid[0, :6].all() and not valid[0, 6:].any()  # rows on unknown nuc crop rows 13, 15
    np.testing.assert_array_equal(target[1], mito[1, 1::2, 1::2])  # nearest 8 nm voxel
    assert _cellmap_volume(path, scale_level=1).shape == (4, 32, 32)
    with pytest.raises(VolumeError, match="no level within 10%"):
        _cellmap_volume(path, voxel_size_nm=[12, 12, 12])
    with pytest.raises(VolumeError, match="is an array, so scale_level"):
        ZarrVolume(path, raw_key=f"{RAW}/s0", scale_level=1)


def test_ngff_04_on_zarr_v2_squeezes_channel_axis_and_converts_units(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    data = np.arange(2 * 32 * 32, dtype=np.uint16).reshape(1, 2, 32, 32)
    levels = [(data, [1, 0.05, 0.004, 0.004], [0, 0, 0, 0])]
    _write_ome(group, "img", levels, unit="micrometer")
    volume = ZarrVolume(tmp_path / "img.zarr", raw_key="img/s0")  # an array inside the group
    assert volume.shape == (2, 32, 32) and volume.voxel_size_nm == pytest.approx([50, 4, 4])
    image, target, _ = volume.read(1, 0, 0, 8)
    # Values 0..2047 fill 12 of uint16's 16 bits: read as 12-bit (docs/errors.md).
    assert volume.normalization == {"kind": "dtype_range", "bit_depth": 12}
    np.testing.assert_allclose(image[0], data[0, 1, :8, :8] / 4095, rtol=1e-6)
    assert volume.labelled == (False, False) and not target.any()
    _write_ome(group, "two_channels", [(np.zeros((2, 2, 32, 32), np.uint8), [1] * 4, [0] * 4)])
    with pytest.raises(VolumeError, match=r"3 axes \(z, y, x\) after leading axes of size 1"):
        ZarrVolume(tmp_path / "img.zarr", raw_key="two_channels")
    with pytest.raises(VolumeError, match="unit 'furlong' not supported"):
        _write_ome(group, "odd", [(data, [1] * 4, [0] * 4)], unit="furlong")
        ZarrVolume(tmp_path / "img.zarr", raw_key="odd")
    with pytest.raises(VolumeError, match="an OME-Zarr image, use raw_key=''"):
        ZarrVolume(tmp_path / "img.zarr" / "img")  # the multiscale group itself, default raw_key
    assert ZarrVolume(tmp_path / "img.zarr" / "img", raw_key="").shape == (2, 32, 32)


def test_normalization_kinds_and_their_resolved_form(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "n.zarr"), mode="w")
    raw = np.random.default_rng(1).integers(1000, 3000, (4, 64, 64)).astype(np.int16)
    group.create_array("raw", data=raw, chunks=(1, 32, 32))
    with pytest.raises(VolumeError, match="use kind 'fixed' or 'percentile'"):
        ZarrVolume(tmp_path / "n.zarr")  # int16 has no dtype range to map
    fixed = ZarrVolume(
        tmp_path / "n.zarr", normalization={"kind": "fixed", "min": 1000, "max": 3000}
    )
    assert fixed.normalization == {"kind": "fixed", "min": 1000.0, "max": 3000.0}
    image = fixed.read(0, 0, 0, 64)[0]
    np.testing.assert_allclose(image[0], (raw[0] - 1000) / 2000, atol=1e-6)
    spec = {"kind": "percentile", "low": 1, "high": 99}
    resolved = ZarrVolume(tmp_path / "n.zarr", normalization=spec).normalization
    assert resolved == ZarrVolume(tmp_path / "n.zarr", normalization=spec).normalization
    assert resolved["kind"] == "fixed" and 1000 <= resolved["min"] < 1100 < 2900 < resolved["max"]
    assert resolved["percentile"] == [1.0, 99.0]
    out = normalize(np.array([0, 2000, 5000], np.int16), resolved)  # what prediction calls
    assert out.dtype == np.float32 and out[0] == 0 and out[2] == 1 and 0 < out[1] < 1
    np.testing.assert_allclose(to_unit_range(np.array([0, 255], np.uint8)), [0, 1])
    with pytest.raises(ValueError, match="resolved to 'fixed'"):
        normalize(raw, spec)


def test_non_finite_raw_names_file_and_slice(tmp_path: Path) -> None:
    raw = np.full((3, 32, 32), 0.5, dtype=np.float32)
    raw[2, 20, 5] = np.nan
    zarr.open_group(str(tmp_path / "f.zarr"), mode="w").create_array("raw", data=raw)
    volume = ZarrVolume(tmp_path / "f.zarr")
    assert volume.read(1, 0, 0, 32)[0].max() == pytest.approx(0.5)
    with pytest.raises(VolumeError, match=r"f\.zarr/raw: NaN or Inf in raw slice z=2, y=16:32"):
        volume.read(2, 16, 0, 16)


class _KeyLog(WrapperStore):
    """Records the keys read, to count chunks."""

    keys: list[str]

    async def get(self, key, prototype, byte_range=None):  # type: ignore[no-untyped-def]
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)


def test_window_reads_touch_only_overlapping_chunks(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    group.create_array("raw", data=np.ones((4, 128, 128), np.uint8), chunks=(1, 32, 32))
    group.create_array("labels/mito", data=np.ones((4, 128, 128), np.uint8), chunks=(1, 32, 32))
    store = _KeyLog(LocalStore(tmp_path / "c.zarr", read_only=True))
    store.keys = []
    volume = ZarrVolume(store, cache_bytes=0)  # lazy
    volume.read(0, 0, 0, 8)  # opens the arrays
    store.keys.clear()
    volume.read(2, 40, 60, 30)  # y 40..70 -> chunks 1, 2; x 60..90 -> chunks 1, 2
    expected = {f"{a}/c/2/{i}/{j}" for a in ("raw", "labels/mito") for i in (1, 2) for j in (1, 2)}
    assert set(store.keys) == expected and len(store.keys) == 8
    cached = ZarrVolume(store, cache_bytes=2**20)
    cached.read(0, 0, 0, 8)  # loads raw and labels once
    store.keys.clear()
    cached.read(3, 90, 90, 30)
    assert store.keys == []


def test_synthetic_terabyte_store_reads_lazily_and_pickles() -> None:
    store = SyntheticStore(shape=(16384, 8192, 8192))  # 1 TiB of uint8
    volume = ZarrVolume(store, cache_bytes=2**30)  # too big to cache: lazy
    assert volume.shape == (16384, 8192, 8192) and volume.labelled == (False, True)
    store.gets = 0
    image, target, _ = volume.read(9000, 300, 5100, 364)
    assert store.gets == 2 * 2 * 3  # raw + mito; y 300..664: 2 chunks, x 5100..5464: 3 chunks
    assert 0.3 < image.mean() < 0.7 and 0 < target[1].mean() < 0.5
    clone = pickle.loads(pickle.dumps(volume))  # what a spawn DataLoader worker receives
    np.testing.assert_array_equal(clone.read(9000, 300, 5100, 364)[0], image)


def test_fsspec_memory_url(tmp_path: Path) -> None:
    group = zarr.open_group("memory://joenet_test_vol.zarr", mode="w")
    group.create_array("raw", data=np.full((2, 16, 16), 51, np.uint8))
    group.create_array("labels/nuclei", data=np.ones((2, 16, 16), np.uint8))
    volume = ZarrVolume("memory://joenet_test_vol.zarr")
    image, target, _ = volume.read(1, 0, 0, 16)
    assert (
        image.max() == pytest.approx(0.2) and target[0].all() and volume.labelled == (True, False)
    )
    assert pickle.loads(pickle.dumps(volume)).read(1, 0, 0, 4)[0].shape == (1, 4, 4)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_http_url_reads_and_reopens_after_pickling(http_root: str, tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "vol.zarr"), mode="w")
    raw = np.arange(3 * 40 * 40, dtype=np.uint16).reshape(3, 40, 40)
    group.create_array("raw", data=raw, chunks=(1, 16, 16))
    group.attrs["voxel_size_nm"] = [5, 5, 5]
    volume = ZarrVolume(f"{http_root}/vol.zarr", cache_bytes=0)
    assert volume.voxel_size_nm == [5, 5, 5] and volume.labelled == (False, False)
    image = volume.read(2, 10, 5, 20)[0]
    np.testing.assert_allclose(image[0] * 16383, raw[2, 10:30, 5:25], rtol=1e-6)  # 14-bit
    clone = pickle.loads(pickle.dumps(volume))
    np.testing.assert_array_equal(clone.read(2, 10, 5, 20)[0], image)
    with pytest.raises(VolumeError, match=r"missing\.zarr: not a zarr group"):
        ZarrVolume(f"{http_root}/missing.zarr")


def test_datamodule_draws_windows_around_crops(cellmap: tuple) -> None:
    from joenet.data.datamodule import EMDataModule

    path, _, _ = cellmap  # one crop: z 2:4, y 10:26, x 20:36 of an 8 x 64 x 64 volume
    dm = EMDataModule(
        str(path),
        train_z=(0, 3),
        val_z=(3, 8),
        patch_size=16,
        batch_size=2,
        patches_per_epoch=40,
        num_workers=0,
        volume={"raw_key": RAW, "label_crops": CROPS, "label_keys": {"nuclei": "nuc"}},
    )
    dm.setup("fit")
    window = dm.augment.window
    for i in range(40):
        _, z, y, x = dm.train_dataset[i]["position"].tolist()
        assert z == 2  # the crop's slices within train_z
        assert y < 26 and y + window > 10 and x < 36 and x + window > 20  # overlaps the crop
    tiles = [dm.val_dataset[i]["position"].tolist() for i in range(len(dm.val_dataset))]
    assert tiles == [[0, 3, 10, 20]]  # the crop itself, in the validation slice
