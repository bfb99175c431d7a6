"""Outputs that viewers open: scale levels, NGFF label images, validated with ome-zarr-models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from joenet.predict import predict_volume, viewer_levels
from joenet.predict.viewer_levels import halve, level_count, write_levels
from tests.test_predict import FAST


def _reference_levels(volume: np.ndarray, levels: int, labels: bool) -> list[np.ndarray]:
    """Each level from the whole previous one in memory (no boxes)."""
    out = [volume]
    for _ in range(levels):
        out.append(halve(out[-1], labels))
    return out[1:]


def _random_volume(
    path: Path,
    shape: tuple[int, int, int],
    seed: int,
    chunks: tuple[int, int, int] = (1, 128, 128),
) -> Path:
    """A uint8 raw volume at 8 nm."""
    group = zarr.open_group(str(path), mode="w")
    group.attrs["voxel_size_nm"] = [8, 8, 8]
    raw = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    group.create_array("raw", data=raw, chunks=chunks)
    return path


@pytest.mark.parametrize("labels", [False, True])
def test_levels_written_box_by_box_equal_the_whole_volume_halved(
    labels: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(viewer_levels, "_BOX", 16)  # many boxes, odd edges at every level
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, (3, 37, 45), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "v.zarr"), mode="w")
    source = group.create_array("a", data=volume, chunks=(1, 8, 8))
    shapes = [(3, 19, 23), (3, 10, 12), (3, 5, 6)]
    targets = [
        group.create_array(f"a{k}", shape=s, dtype="uint8", chunks=(1, 8, 8))
        for k, s in enumerate(shapes)
    ]
    write_levels(source, targets, labels, (0, 3))
    for target, expected in zip(targets, _reference_levels(volume, 3, labels), strict=True):
        np.testing.assert_array_equal(target[...], expected)
    # Means of 2 x 2, rounded; labels keep ids that exist (every second pixel).
    assert halve(np.array([[[0, 255], [255, 255]]], dtype=np.uint8), False)[0, 0, 0] == 191
    assert halve(np.array([[[7, 0], [0, 0]]], dtype=np.uint32), True)[0, 0, 0] == 7
    assert level_count((1, 1024, 768)) == 2 and level_count((1, 256, 100)) == 0


def test_prediction_validates_as_ome_ngff_with_levels_and_labels(
    ckpt_path: Path, tmp_path: Path
) -> None:
    models = pytest.importorskip("ome_zarr_models.v05", reason="pip install ome-zarr-models")
    volume = _random_volume(tmp_path / "in.zarr", (2, 600, 520), seed=1)
    output = tmp_path / "pred.zarr"
    options = {"threshold": 0.5, "instances": True, "tile": 128, "overlap": 32, **FAST}
    predict_volume(ckpt_path, volume, output, **options)

    root = zarr.open_group(str(output), mode="r")
    image = models.Image.from_zarr(root)  # raises on anything the spec does not allow
    entries = root.attrs["ome"]["multiscales"]
    assert [e["name"] for e in entries] == ["nuclei", "mito"]
    assert [d["path"] for d in entries[1]["datasets"]] == ["mito", "mito_s1", "mito_s2"]
    assert root["mito_s1"].shape == (2, 300, 260) and root["mito_s2"].shape == (2, 150, 130)
    level2 = entries[1]["datasets"][2]["coordinateTransformations"]
    assert level2 == [
        {"type": "scale", "scale": [8.0, 32.0, 32.0]},
        {"type": "translation", "translation": [0.0, 12.0, 12.0]},
    ]
    np.testing.assert_array_equal(root["mito_s1"][...], root["mito"][:, ::2, ::2])  # a mask

    names = ["nuclei", "mito", "nuclei_instances", "mito_instances"]
    assert root["labels"].attrs["ome"]["labels"] == names
    assert image.labels is not None
    for name in names:
        label = models.ImageLabel.from_zarr(root[f"labels/{name}"])
        assert label.ome_attributes.image_label.source.image == "../../"
        np.testing.assert_array_equal(root[f"labels/{name}/0"][...], root[name][...])
        assert root[f"labels/{name}/2"].shape == (2, 150, 130)
    assert root["labels/mito_instances/0"].dtype == np.uint32
    np.testing.assert_array_equal(
        root["labels/mito_instances/1"][...], root["mito_instances"][:, ::2, ::2]
    )
    # overwrite=true knows the levels and label images as its own and replaces them all.
    predict_volume(ckpt_path, volume, output, overwrite=True, **options)
    assert models.Image.from_zarr(zarr.open_group(str(output), mode="r")) is not None


def test_probability_levels_are_means_and_can_be_left_out(ckpt_path: Path, tmp_path: Path) -> None:
    volume = _random_volume(tmp_path / "in.zarr", (1, 320, 300), seed=2)
    options = {"tile": 128, "overlap": 32, **FAST}
    root = zarr.open_group(str(predict_volume(ckpt_path, volume, tmp_path / "a.zarr", **options)))
    np.testing.assert_array_equal(root["nuclei_s1"][...], halve(root["nuclei"][...], False))
    assert "labels" not in root  # no threshold, no instances: nothing is a label
    plain = predict_volume(ckpt_path, volume, tmp_path / "b.zarr", viewer_levels=False, **options)
    assert sorted(zarr.open_group(str(plain)).keys()) == [".joenet", "mito", "nuclei"]


@pytest.mark.parametrize("shape", [(2, 64, 96), (1, 33, 17), (1, 1, 1)])
def test_uint8_halving_rounds_2x2_means_as_float_rint_does(shape: tuple[int, int, int]) -> None:
    # The integer path (sums of 4, halves to even) must write what the float means wrote, so
    # levels of a prediction resumed across versions match; odd sides repeat their edge.
    block = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    even = np.pad(block, [(0, 0), (0, shape[1] % 2), (0, shape[2] % 2)], mode="edge")
    z, y, x = even.shape
    means = even.astype(np.float64).reshape(z, y // 2, 2, x // 2, 2).mean(axis=(2, 4))
    halved = halve(block, labels=False)
    assert halved.dtype == np.uint8
    np.testing.assert_array_equal(halved, np.rint(means).astype(np.uint8))


def test_uint8_halving_rounds_quarters_to_nearest_and_halves_to_even() -> None:
    # 2 x 2 sums 5, 6, 10, 14, 7: means 1.25, 1.5, 2.5, 3.5, 1.75
    pairs = [[1, 1, 1, 2], [1, 2, 1, 2], [2, 2, 3, 3], [3, 3, 4, 4], [1, 2, 2, 2]]
    block = np.array(pairs, dtype=np.uint8).reshape(1, 10, 2)  # five 2 x 2 squares along y
    np.testing.assert_array_equal(halve(block, labels=False)[0, :, 0], [1, 2, 2, 4, 2])


@pytest.mark.parametrize(
    ("chunks", "threshold", "by_block"),
    [((1, 128, 128), None, True), ((1, 128, 128), 0.5, True), ((1, 90, 90), None, False)],
)
def test_levels_written_block_by_block_equal_the_whole_array_halved(
    chunks: tuple[int, int, int],
    threshold: float | None,
    by_block: bool,
    ckpt_path: Path,
    tmp_path: Path,
) -> None:
    # 256 px blocks of 128 px chunks start on multiples of 4 (2 levels for 600 px): each block
    # writes its own levels in the writer thread and is flagged. 90 px chunks make 270 px
    # blocks, which start off that grid: nothing is flagged, and the levels are computed from
    # the written arrays after the run, as for a Dask run. The bytes are the same either way.
    volume = _random_volume(tmp_path / "in.zarr", (2, 600, 540), seed=4, chunks=chunks)
    options = {"tile": 128, "overlap": 32, "block_size": 256, "threshold": threshold, **FAST}
    output = predict_volume(ckpt_path, volume, tmp_path / "pred.zarr", **options)
    root = zarr.open_group(str(output), mode="r")
    flags = root[".joenet/levels"][...]
    assert flags.shape == root[".joenet/done"].shape and flags.size > 4
    assert flags.all() if by_block else not flags.any()
    for name in ("nuclei", "mito"):
        expected = _reference_levels(root[name][...], 2, labels=threshold is not None)
        for level, array in enumerate(expected, start=1):
            np.testing.assert_array_equal(root[f"{name}_s{level}"][...], array)


def test_levels_of_blocks_without_flags_are_computed_after_the_run(
    ckpt_path: Path, tmp_path: Path
) -> None:
    # An output whose blocks were all written but whose levels were not (an earlier version's,
    # or a run killed before its last step): a rerun writes them, from the arrays on disk.
    volume = _random_volume(tmp_path / "in.zarr", (1, 600, 540), seed=4)
    options = {"tile": 128, "overlap": 32, "block_size": 256, **FAST}
    output = predict_volume(ckpt_path, volume, tmp_path / "pred.zarr", **options)
    root = zarr.open_group(str(output), mode="r+")
    expected = root["mito_s2"][...]
    assert expected.any()
    root["mito_s1"][...] = 0
    root["mito_s2"][...] = 0
    root[".joenet/levels"][...] = False
    record = root[".joenet"]
    record.attrs.update({"viewer_levels_z_ranges": []})
    predict_volume(ckpt_path, volume, output, **options)
    root = zarr.open_group(str(output), mode="r")
    np.testing.assert_array_equal(root["mito_s2"][...], expected)
    np.testing.assert_array_equal(root["mito_s1"][...], halve(root["mito"][...], False))
