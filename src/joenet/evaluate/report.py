"""The evaluation's outputs: ``metrics.json`` and ``.csv``, slice figures, the printed table."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from joenet.evaluate import counts, figures
from joenet.evaluate.evaluation import evaluate_volume, open_prediction_group


def _check_slices(slices: Sequence[int], z_range: Sequence[int]) -> None:
    start, stop = z_range
    if any(not start <= int(z) < stop for z in slices):
        raise ValueError(
            f"slices {list(slices)} must lie in the evaluated z range [{start}, {stop})"
        )


def default_slices(z_range: Sequence[int], count: int = 3) -> list[int]:
    """``count`` evenly spaced slices of a half-open z range, ends included."""
    start, stop = z_range
    return sorted({int(z) for z in np.linspace(start, stop - 1, count).round()})


def write_figures(
    results: Mapping[str, Any], out_dir: str | Path, slices: Sequence[int] | None = None
) -> list[Path]:
    """Slice panels (raw | truth | prediction | errors) and a PR curve per evaluated class.

    Args:
        results: output of ``evaluate_volume``.
        out_dir: directory; figures go to ``<out_dir>/figures``.
        slices: absolute z indices inside the evaluated range; None for 3 evenly spaced.

    Returns:
        The PNG files written.
    """
    start, stop = results["z_range"]
    slices = default_slices((start, stop)) if slices is None else [int(z) for z in slices]
    _check_slices(slices, (start, stop))
    pred_group = open_prediction_group(results["prediction"], "prediction")
    truth_group = open_prediction_group(results["truth"], "truth")
    directory = Path(out_dir) / "figures"
    directory.mkdir(parents=True, exist_ok=True)
    has_raw = "raw" in truth_group  # without it the panels show the masks on black
    written = []
    for name, metrics in results["metrics"].items():
        histogram = np.asarray(results["histograms"][name])
        for z in slices:
            levels = counts.to_levels(np.asarray(pred_group[name][z]), metrics["binary_prediction"])
            truth = np.asarray(truth_group[f"labels/{name}"][z])
            raw = np.asarray(truth_group["raw"][z]) if has_raw else np.zeros_like(truth)
            title = f"{name}, z = {z}, threshold {metrics['threshold']:g}"
            written.append(
                figures.save_slice_figure(
                    directory / f"{name}_z{z:04d}.png", raw, truth, levels, metrics["level"], title
                )
            )
        written.append(
            figures.save_pr_curve(
                directory / f"{name}_pr_curve.png",
                histogram,
                metrics["threshold"],
                metrics["best_threshold"],
                f"{name}: precision-recall, z [{start}, {stop})",
            )
        )
    return written


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.json`` (everything) and ``metrics.csv`` (one row per evaluated class)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "metrics.json", out_dir / "metrics.csv"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    rows = [{"class": name, **metrics} for name, metrics in results["metrics"].items()]
    with csv_path.open("w", newline="") as f:
        columns = list(dict.fromkeys(key for row in rows for key in row)) or ["class"]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def format_table(results: Mapping[str, Any]) -> str:
    """A compact text table of the main metrics per class, plus the skipped classes."""
    columns = (
        "iou",
        "dice",
        "precision",
        "recall",
        "accuracy",
        "miou",
        "best_threshold",
        "iou_at_best",
        "object_f1",
    )
    lines = [f"{'class':<10}" + "".join(f"{c:>15}" for c in columns)]
    for name, metrics in results["metrics"].items():
        cells = (f"{metrics[c]:>15.4f}" if c in metrics else f"{'-':>15}" for c in columns)
        lines.append(f"{name:<10}" + "".join(cells))
    lines += [f"skipped {name}: {reason}" for name, reason in results["skipped"].items()]
    start, stop = results["z_range"]
    lines.append(
        f"z [{start}, {stop}), threshold {results['threshold']:g}; best_threshold and "
        "*_at_best are tuned on this data (optimistic)"
    )
    return "\n".join(lines)


def evaluate(
    prediction: str | Path,
    truth: str | Path,
    out_dir: str | Path,
    z_range: Sequence[int] | None = None,
    threshold: float = 0.5,
    slices: Sequence[int] | None = None,
    iou_match: float = 0.5,
    instances: bool = True,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole evaluation without Hydra: metrics, ``metrics.json``/``.csv`` and figures.

    Args are those of ``evaluate_volume`` and ``write_figures``; ``config`` (e.g. the resolved
    Hydra config) is stored in ``metrics.json`` under ``config``, the arguments when None.

    Returns:
        The results written to ``metrics.json``.
    """
    if slices is not None and z_range is not None:  # fail before the long part
        _check_slices(slices, z_range)
    results = evaluate_volume(prediction, truth, z_range, threshold, iou_match, instances)
    results["config"] = (
        dict(config)
        if config is not None
        else {
            "prediction": str(prediction),
            "truth": str(truth),
            "z_range": z_range,
            "threshold": threshold,
            "slices": slices,
            "iou_match": iou_match,
            "instances": instances,
        }
    )
    results["out_dir"] = str(out_dir)
    write_report(results, out_dir)
    write_figures(results, out_dir, slices)
    return results
