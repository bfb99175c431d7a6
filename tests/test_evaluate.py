"""Evaluation: metrics against hand-computed values, thresholds, objects, report files, CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from joenet.evaluate import (
    best_level,
    default_slices,
    evaluate,
    evaluate_volume,
    format_table,
    instance_metrics,
    level_histogram,
    match_objects,
    metrics_from_counts,
    threshold_to_level,
    to_levels,
)

# Minimal NGFF attributes, as joenet.predict writes them beside the per-class arrays.
_OME = {
    "ome": {
        "version": "0.5",
        "multiscales": [{"axes": [{"name": a, "type": "space"} for a in "zyx"]}],
    }
}


def _write_volume(path: Path, labels: dict[str, np.ndarray], raw: np.ndarray | None = None) -> Path:
    group = zarr.open_group(str(path), mode="w")
    shape = next(iter(labels.values())).shape
    raw = np.full(shape, 128, np.uint8) if raw is None else raw
    group.create_array("raw", data=raw)
    for name, mask in labels.items():
        group.create_array(f"labels/{name}", data=mask.astype(np.uint8))
    return path


def _write_prediction(
    path: Path, arrays: dict[str, np.ndarray], values: str | None = "probability x 255"
) -> Path:
    """A group shaped like joenet.predict's output (``values=None``: no joenet metadata)."""
    group = zarr.open_group(str(path), mode="w")
    group.attrs.update(_OME)
    if values is not None:
        group.attrs["joenet"] = {"class_names": list(arrays), "values": values}
    for name, data in arrays.items():
        group.create_array(name, data=data)
        # joenet.predict's connected components (instances=true): not a class.
        group.create_array(f"{name}_instances", data=data.astype(np.uint32))
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# A 1 x 4 x 4 case with tp = 3, fp = 2, fn = 1, tn = 10. Prediction levels straddle the 0.5 cut:
# 128 (= ceil(127.5)) is positive, 127 is not.
_TRUTH = np.array([[[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]], np.uint8)
_LEVELS = np.array([[[255, 128, 200, 128], [127, 0, 0, 0], [0, 0, 50, 0], [0, 0, 0, 140]]])
_LEVELS = _LEVELS.astype(np.uint8)


def test_threshold_rule_matches_stored_probabilities() -> None:
    assert [threshold_to_level(t) for t in (0.0, 0.2, 0.3, 0.5, 1 / 255, 1.0)] == [
        0,
        51,
        77,
        128,
        1,
        255,
    ]
    levels = np.arange(256)
    for percent in range(101):  # integer arithmetic: u / 255 >= percent / 100
        expected = 100 * levels >= 255 * percent
        assert np.array_equal(levels >= threshold_to_level(percent / 100), expected), percent
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_to_level(1.5)
    # Float probabilities are stored as round(255 p) and bool masks as 0/255.
    assert to_levels(np.array([0.0, 0.5, 0.498, 1.0])).tolist() == [0, 128, 127, 255]
    assert to_levels(np.array([True, False])).tolist() == [255, 0]


def test_pixel_metrics_against_hand_computed_values(tmp_path: Path) -> None:
    truth = _write_volume(tmp_path / "truth.zarr", {"mito": _TRUTH})
    pred = _write_prediction(tmp_path / "pred.zarr", {"mito": _LEVELS})
    m = evaluate_volume(pred, truth, instances=False)["metrics"]["mito"]
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 2, 1, 10)
    assert m["level"] == 128
    expected = {
        "iou": 3 / 6,
        "dice": 6 / 9,
        "precision": 3 / 5,
        "recall": 3 / 4,
        "accuracy": 13 / 16,
        "iou_background": 10 / 13,
        "miou": (0.5 + 10 / 13) / 2,
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(value), name
    assert m["truth_fraction"] == pytest.approx(4 / 16)


def test_zero_denominators_follow_training_metrics() -> None:
    empty = metrics_from_counts(tp=0, fp=0, fn=0, tn=16)  # absent in both: perfect, not 0/0
    assert all(float(value) == 1.0 for value in empty.values())
    false_alarm = metrics_from_counts(tp=0, fp=2, fn=0, tn=14)
    assert float(false_alarm["iou"]) == 0.0 and float(false_alarm["recall"]) == 0.0
    assert float(false_alarm["iou_background"]) == pytest.approx(14 / 16)


def test_best_threshold_on_constructed_case(tmp_path: Path) -> None:
    # Positives at levels 200, 150, 100; negatives at 120, 50, 0. IoU per cut k:
    # k in 121..150 -> 2/3, 101..120 -> 1/2, 51..100 -> 3/4 (best), 1..50 -> 3/5.
    truth = np.array([[[1, 1, 1], [0, 0, 0]]], np.uint8)
    levels = np.array([[[200, 150, 100], [120, 50, 0]]], np.uint8)
    histogram = level_histogram(levels, truth)
    assert best_level(histogram, prefer=128) == 100  # ties go to the level nearest 0.5
    assert best_level(histogram, prefer=10) == 51
    pred = _write_prediction(tmp_path / "pred.zarr", {"nuclei": levels})
    m = evaluate_volume(pred, _write_volume(tmp_path / "t.zarr", {"nuclei": truth}))
    m = m["metrics"]["nuclei"]
    assert m["iou"] == pytest.approx(2 / 3)
    assert m["best_threshold"] == pytest.approx(100 / 255)
    assert m["iou_at_best"] == pytest.approx(3 / 4)
    assert m["precision_at_best"] == pytest.approx(3 / 4) and m["recall_at_best"] == 1.0


@pytest.mark.parametrize("values", ["mask 0/1", None])  # declared, or inferred from the values
def test_binary_prediction_is_recognised(values: str | None, tmp_path: Path) -> None:
    truth = _write_volume(tmp_path / "truth.zarr", {"mito": _TRUTH})
    mask = (_LEVELS >= 128).astype(np.uint8)  # written with threshold=0.5: 0/1
    pred = _write_prediction(tmp_path / "p.zarr", {"mito": mask}, values=values)
    results = evaluate_volume(pred, truth)
    assert list(results["metrics"]) == ["mito"] and not results["skipped"]  # no mito_instances
    m = results["metrics"]["mito"]
    assert m["binary_prediction"]
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 2, 1, 10)
    assert m["best_threshold"] == pytest.approx(128 / 255)  # every cut ties; nearest 0.5 wins
    assert m["true_objects"] == 1 and m["pred_objects"] == 2 and m["matched_objects"] == 1


def test_instance_counts_and_matched_f1() -> None:
    truth = np.zeros((4, 20, 20), np.uint8)
    truth[:, 1:7, 1:7] = 1  # A: 144 voxels
    truth[:, 1:7, 12:18] = 1  # B
    truth[:, 12:18, 1:7] = 1  # C
    pred = np.zeros_like(truth)
    pred[:, 2:7, 1:7] = 1  # inside A, IoU 120 / 144 = 0.83: a match
    pred[:, 1:4, 12:15] = 1  # a quarter of B, IoU 0.25: no match
    stats = instance_metrics(truth, pred, iou_threshold=0.5)
    assert stats["true_objects"] == 3 and stats["pred_objects"] == 2
    assert stats["matched_objects"] == 1
    assert stats["object_precision"] == pytest.approx(1 / 2)
    assert stats["object_recall"] == pytest.approx(1 / 3)
    assert stats["object_f1"] == pytest.approx(2 * 1 / (3 + 2))
    assert stats["matched_mean_iou"] == pytest.approx(120 / 144)
    assert instance_metrics(truth, pred, iou_threshold=0.2)["matched_objects"] == 2
    empty = instance_metrics(np.zeros_like(truth), np.zeros_like(truth))
    assert empty["object_f1"] == 1.0 and empty["true_objects"] == 0


def test_matching_is_one_to_one_and_3d() -> None:
    truth_labels = np.zeros((3, 4, 8), np.int32)
    truth_labels[:, :, :4], truth_labels[:, :, 4:] = 1, 2  # two touching truth objects
    pred_labels = np.ones((3, 4, 8), np.int32)  # one prediction covering both: IoU 0.5 each
    assert len(match_objects(truth_labels, pred_labels, iou_threshold=0.5)) == 1
    # Two blobs of slice 1 joined only through slice 0 form one object: components are 3D.
    mask = np.zeros((2, 6, 6), np.uint8)
    mask[0, 0:2, 0:6] = mask[1, 0:2, 0:2] = mask[1, 0:2, 4:6] = 1
    assert instance_metrics(mask, mask)["true_objects"] == 1


def test_class_without_truth_labels_is_skipped(tmp_path: Path) -> None:
    truth = _write_volume(tmp_path / "truth.zarr", {"mito": _TRUTH})
    pred = _write_prediction(tmp_path / "pred.zarr", {"nuclei": _LEVELS, "mito": _LEVELS})
    results = evaluate(pred, truth, tmp_path / "out", slices=[0])
    assert list(results["metrics"]) == ["mito"]
    assert set(results["skipped"]) == {"nuclei"}
    assert "labels/nuclei" in results["skipped"]["nuclei"]
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    assert [row["class"] for row in rows] == ["mito"]
    assert not list((tmp_path / "out" / "figures").glob("nuclei*"))
    assert "skipped nuclei" in format_table(results)


def test_z_range_is_respected(tmp_path: Path) -> None:
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[:, 2:6, 2:6] = 1
    levels = truth * 255
    levels[0] = 255 - levels[0]  # slices 0 and 5 are all wrong, 1..4 perfect
    levels[5] = 0
    paths = (
        _write_prediction(tmp_path / "p.zarr", {"mito": levels}),
        _write_volume(tmp_path / "t.zarr", {"mito": truth}),
    )
    inner = evaluate_volume(*paths, z_range=[1, 5])
    m = inner["metrics"]["mito"]
    assert inner["z_range"] == [1, 5]
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == 4 * 64
    assert m["iou"] == 1.0 and m["true_objects"] == 1 and m["matched_objects"] == 1
    assert evaluate_volume(*paths)["metrics"]["mito"]["iou"] < 1.0
    with pytest.raises(ValueError, match="z_range"):
        evaluate_volume(*paths, z_range=[4, 9])
    assert default_slices((1, 5)) == [1, 2, 4]


def _eroded_prediction(volume_path: Path, out: Path) -> Path:
    """Truth eroded by one pixel in each slice: no false positives, known false negatives."""
    group = zarr.open_group(str(volume_path), mode="r")
    arrays = {}
    for name in ("nuclei", "mito"):
        mask = group[f"labels/{name}"][...] > 0
        eroded = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), bool))
        arrays[name] = np.where(eroded, np.uint8(230), np.uint8(20))
    return _write_prediction(out, arrays)


def test_report_files(volume_path: Path, tmp_path: Path) -> None:
    pred = _eroded_prediction(volume_path, tmp_path / "pred.zarr")
    out = tmp_path / "report"
    results = evaluate(pred, volume_path, out, z_range=[2, 10])
    report = json.loads((out / "metrics.json").read_text())
    assert report["z_range"] == [2, 10] and report["threshold"] == 0.5
    assert report["prediction"] == str(pred) and report["truth"] == str(volume_path)
    assert report["config"]["z_range"] == [2, 10]
    truth = zarr.open_group(str(volume_path), mode="r")["labels/mito"][2:10] > 0
    eroded = ndimage.binary_erosion(truth, structure=np.ones((1, 3, 3), bool))
    mito = report["metrics"]["mito"]
    assert mito["fp"] == 0 and mito["precision"] == 1.0
    assert mito["tp"] == eroded.sum() and mito["fn"] == truth.sum() - eroded.sum()
    assert mito["iou"] == pytest.approx(eroded.sum() / truth.sum())
    assert np.asarray(report["histograms"]["mito"]).sum() == 8 * 96 * 96
    assert report == json.loads(json.dumps(results))
    rows = {row["class"]: row for row in csv.DictReader((out / "metrics.csv").open())}
    assert set(rows) == {"nuclei", "mito"}
    for name, row in rows.items():
        assert float(row["iou"]) == pytest.approx(report["metrics"][name]["iou"])
        assert float(row["object_f1"]) == pytest.approx(report["metrics"][name]["object_f1"])
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs == sorted(
        f"{c}_{s}.png" for c in ("mito", "nuclei") for s in ("z0002", "z0006", "z0009", "pr_curve")
    )
    for png in (out / "figures").glob("*.png"):
        width, height = _png_size(png)
        assert width >= 300 and height >= 200 and png.stat().st_size > 5000, png
    with pytest.raises(ValueError, match="slices"):
        evaluate(pred, volume_path, tmp_path / "bad", z_range=[2, 10], slices=[11])


@pytest.mark.slow  # a subprocess
def test_cli(volume_path: Path, tmp_path: Path) -> None:
    pred = _eroded_prediction(volume_path, tmp_path / "pred.zarr")
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "joenet.evaluate",
            f"prediction={pred}",
            f"truth={volume_path}",
            f"out_dir={out}",
            "z_range=[3,9]",
            "slices=[4]",
            "threshold=0.4",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nuclei" in result.stdout and "mito" in result.stdout and "optimistic" in result.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["z_range"] == [3, 9] and report["metrics"]["mito"]["level"] == 102
    assert report["config"]["slices"] == [4] and report["config"]["task_name"] == "evaluate"
    assert (out / ".hydra" / "config.yaml").is_file()  # out_dir is the Hydra run dir
    assert sorted(p.name for p in (out / "figures").glob("mito*")) == [
        "mito_pr_curve.png",
        "mito_z0004.png",
    ]


def _bad_evaluations(tmp: Path) -> dict[str, tuple[dict, str]]:
    """Evaluations that must refuse with one line: (arguments of evaluate, expected message)."""
    truth = _write_volume(tmp / "truth.zarr", {"mito": _TRUTH})
    pred = _write_prediction(tmp / "pred.zarr", {"mito": _LEVELS})
    small = _write_volume(tmp / "small.zarr", {"mito": _TRUTH[:, :2]})
    no_labels = tmp / "no_labels.zarr"
    zarr.open_group(str(no_labels), mode="w").create_array("raw", data=_LEVELS)
    return {
        "shape mismatch": (
            {"prediction": pred, "truth": small},
            r"pred\.zarr/mito has shape \(1, 4, 4\) but .*small\.zarr/labels/mito has \(1, 2, 4\)",
        ),
        "threshold above 1": (
            {"prediction": pred, "truth": truth, "threshold": 1.5},
            r"threshold must be a probability in \[0, 1\], got 1\.5",
        ),
        "iou_match above 1": (
            {"prediction": pred, "truth": truth, "iou_match": 2.0},
            r"iou_match must be an IoU in \(0, 1\], got 2\.0",
        ),
        "z_range beyond the depth": (
            {"prediction": pred, "truth": truth, "z_range": [0, 5]},
            r"pred\.zarr: z_range=\[0, 5\] must be \[start, stop\) .* 1 slices",
        ),
        "truth without labels": (
            {"prediction": pred, "truth": no_labels},
            r"nothing to evaluate: prediction .*pred\.zarr holds classes \['mito'\] and truth "
            r".*no_labels\.zarr has no labels/ group.*truth= must be the volume",
        ),
        "prediction and truth swapped": (
            {"prediction": truth, "truth": pred},
            r"nothing to evaluate: .*are prediction= and truth= swapped\?",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "shape mismatch",
        "threshold above 1",
        "iou_match above 1",
        "z_range beyond the depth",
        "truth without labels",
        "prediction and truth swapped",
    ],
)
def test_bad_evaluation_gives_one_clear_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from joenet.cli import exit_on_error

    arguments, expected = _bad_evaluations(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        exit_on_error(evaluate)(out_dir=out, **arguments)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(expected, lines[0]), err
    assert not (out / "metrics.json").exists()  # no empty report
