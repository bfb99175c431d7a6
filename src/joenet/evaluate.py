"""Evaluate a prediction against labels: ``python -m joenet.evaluate prediction=... truth=...``.

The prediction is a zarr group with one (z, y, x) array per class at its top level (what
``joenet.predict`` writes): uint8 levels ``u = round(255 p)`` of the probability ``p``, or 0/1
masks when it was written with a threshold (its ``joenet.values`` attribute says which; without
it, a uint8 array holding no value above 1 is taken as masks), bool masks or float
probabilities. ``<class>_instances`` arrays are ignored. A prediction made for a z range only
holds zeros elsewhere: evaluate it with the same ``z_range``.

The truth is a joenet volume group with ``labels/<class>`` (nonzero is foreground) and, for the
figures, ``raw``. A class is evaluated when it is in both; otherwise it is listed under
``skipped`` with the reason, never reported as 0.

Thresholds: a pixel is positive at threshold ``t`` iff ``u / 255 >= t``, i.e. ``u >=
ceil(255 t)`` (``joenet.evaluation.counts.threshold_to_level``). ``best_threshold`` and the
``*_at_best`` metrics are tuned on the evaluated data itself: optimistic, not a held-out figure.

Pixel metrics are accumulated block by block over z, so the volume is never loaded whole for
them; the object statistics hold both masks of the evaluated z range in memory (see
``joenet.evaluation.instances``), which ``instances=false`` switches off.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import zarr
from omegaconf import DictConfig, OmegaConf

from joenet.cli import exit_on_error
from joenet.config import config_dir, register_resolvers
from joenet.data.volume import intensity_sample
from joenet.evaluation import counts, figures
from joenet.evaluation.instances import instance_metrics

THRESHOLD_RULE = (
    "positive iff u / 255 >= threshold, i.e. u >= ceil(255 * threshold), where u = round(255 p)"
)


register_resolvers()


def _open_group(path: str | Path, role: str) -> zarr.Group:
    if not Path(path).exists():
        raise FileNotFoundError(f"{role} {path}: no such file or directory (expected a zarr group)")
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as err:  # zarr raises several types for "not a group"
        raise ValueError(f"{role} {path}: not a zarr group ({err})") from None


def _prediction_classes(group: zarr.Group, path: str | Path) -> list[str]:
    """Class arrays of a prediction group, in the order its metadata lists them.

    ``joenet.predict`` names them in ``attrs["joenet"]["class_names"]`` and in the NGFF
    multiscales; a group without either gives its (z, y, x) arrays, except ``*_instances``.
    """
    meta = dict(group.attrs.get("joenet") or {})
    names = meta.get("class_names") or group.attrs.get("class_names")
    if not names:
        multiscales = dict(group.attrs.get("ome") or {}).get("multiscales") or []
        names = [entry["name"] for entry in multiscales if entry.get("name")]
    if not names:
        names = sorted(name for name, array in group.arrays()
                       if array.ndim == 3 and not name.endswith("_instances"))  # fmt: skip
    if not names:
        raise ValueError(f"prediction {path}: no (z, y, x) arrays at the top level (one per class)")
    missing = [name for name in names if name not in group]
    if missing:
        raise ValueError(f"prediction {path}: its metadata lists {missing} but has no such array")
    return list(names)


def _binary_from_attrs(group: zarr.Group) -> bool | None:
    """Whether ``joenet.predict`` wrote 0/1 masks (True) or levels (False); None if unsaid."""
    values = dict(group.attrs.get("joenet") or {}).get("values")
    return {"mask 0/1": True, "probability x 255": False}.get(values)


def _check_prediction_values(pred: zarr.Array, where: str) -> None:
    """Refuse values that would be misread: floats outside [0, 1], integers other than uint8.

    Float probabilities are clipped to [0, 1]; logits or a 0..255 scale would be clipped to
    almost all 0 or 1 and give wrong metrics with no sign of it, so a sample is checked first.
    """
    if pred.dtype == bool or pred.dtype == np.uint8:
        return
    if pred.dtype.kind != "f":
        raise ValueError(
            f"prediction {where}: dtype {pred.dtype} (expected uint8 levels round(255 p), "
            "bool/0-1 masks or float probabilities in [0, 1])"
        )
    sample = intensity_sample(pred, where, what="prediction")
    low, high = float(sample.min()), float(sample.max())
    if low < -0.01 or high > 1.01:
        hint = "divide by 255" if low >= 0 and high <= 255 else "apply a sigmoid to logits"
        raise ValueError(
            f"prediction {where}: float values span [{low:.4g}, {high:.4g}], expected "
            f"probabilities in [0, 1] ({hint} first)"
        )


def _check_z_range(z_range: Sequence[int] | None, depth: int) -> tuple[int, int]:
    if z_range is None:
        return 0, depth
    if len(z_range) != 2 or not 0 <= int(z_range[0]) < int(z_range[1]) <= depth:
        raise ValueError(f"z_range must be [start, stop) with 0 <= start < stop <= {depth}, "
                         f"got {list(z_range)}")  # fmt: skip
    return int(z_range[0]), int(z_range[1])


def evaluate_class(
    pred: zarr.Array,
    truth: zarr.Array,
    z_range: tuple[int, int],
    threshold: float = 0.5,
    iou_match: float = 0.5,
    instances: bool = True,
    binary: bool | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Pixel and object metrics of one class over ``z_range``.

    Args:
        pred: (z, y, x) prediction array (see the module docstring for the accepted values).
        truth: (z, y, x) labels of the same shape; nonzero is foreground.
        z_range: half-open ``(start, stop)`` of the evaluated slices.
        threshold: probability threshold of the reported operating point.
        iou_match: minimum IoU of a matched object.
        instances: compute object statistics (holds the masks of the range in memory).
        binary: whether a uint8 ``pred`` holds 0/1 masks; None to infer it from the values
            (no value above 1 and some 1s).

    Returns:
        ``(metrics, histogram)``: a flat ``{metric: number}`` and the (2, 256) level histogram.
    """
    histogram, levels, labels = counts.accumulate_histogram(pred, truth, z_range, instances)
    if pred.dtype == bool:
        binary = True  # to_levels already mapped it to 0/255
    elif binary is None:
        binary = bool(histogram[:, 2:].sum() == 0 and histogram[:, 1].sum() > 0)
    if binary and pred.dtype == np.uint8:  # 0/1 masks: 1 means positive at every threshold
        if histogram[:, 2:].sum() > 0:
            raise ValueError(f"prediction array {pred.path!r} is declared 0/1 masks "
                             "(values: mask 0/1) but holds values above 1")  # fmt: skip
        histogram[:, 255] += histogram[:, 1]
        histogram[:, 1] = 0
        if levels is not None:
            levels *= 255
    level = counts.threshold_to_level(threshold)
    best = counts.best_level(histogram, prefer=level)
    at_best = counts.metrics_at_level(histogram, best)
    metrics: dict[str, Any] = {
        "threshold": threshold,
        "level": level,
        **counts.metrics_at_level(histogram, level),
        "best_threshold": best / 255,
        "best_level": best,
        **{f"{name}_at_best": at_best[name] for name in counts.METRIC_NAMES},
        "truth_fraction": float(histogram[1].sum() / max(histogram.sum(), 1)),
        "binary_prediction": bool(binary),
    }
    if levels is not None and labels is not None:
        pred_mask = levels >= level
        del levels
        metrics.update(instance_metrics(labels, pred_mask, iou_threshold=iou_match))
    return metrics, histogram


def evaluate_volume(
    prediction: str | Path,
    truth: str | Path,
    z_range: Sequence[int] | None = None,
    threshold: float = 0.5,
    iou_match: float = 0.5,
    instances: bool = True,
) -> dict[str, Any]:
    """Metrics of every class present in both the prediction and ``truth/labels``.

    Args:
        prediction: prediction zarr group (one array per class).
        truth: volume zarr group with ``labels/<class>``.
        z_range: half-open ``[start, stop)`` of slices to evaluate; None for all.
        threshold: probability threshold of the reported operating point.
        iou_match: minimum IoU of a matched object.
        instances: compute object statistics.

    Returns:
        ``{"metrics": {class: {metric: value}}, "histograms": {class: (2, 256) list},
        "skipped": {class: reason}, "z_range": [start, stop], ...}``.
    """
    pred_group, truth_group = _open_group(prediction, "prediction"), _open_group(truth, "truth")
    classes = _prediction_classes(pred_group, prediction)
    labelled = list(truth_group["labels"].array_keys()) if "labels" in truth_group else []
    binary = _binary_from_attrs(pred_group)
    depth = pred_group[classes[0]].shape[0]
    start, stop = _check_z_range(z_range, depth)
    results: dict[str, Any] = {"metrics": {}, "histograms": {}, "skipped": {}}
    for name in classes:
        if name not in labelled:
            results["skipped"][name] = f"no labels/{name} in {truth}: not evaluated"
            continue
        pred, labels = pred_group[name], truth_group[f"labels/{name}"]
        if pred.shape != labels.shape:
            raise ValueError(f"{prediction}/{name} has shape {pred.shape} but {truth}/labels/"
                             f"{name} has {labels.shape}; they must match (z, y, x)")  # fmt: skip
        _check_prediction_values(pred, f"{prediction}/{name}")
        metrics, histogram = evaluate_class(
            pred, labels, (start, stop), threshold, iou_match, instances, binary
        )
        results["metrics"][name] = metrics
        results["histograms"][name] = histogram.tolist()
    for name in labelled:
        if name not in classes:
            results["skipped"][name] = f"labelled in truth but not in {prediction}: not evaluated"
    results.update({
        "prediction": str(prediction), "truth": str(truth), "z_range": [start, stop],
        "threshold": threshold, "threshold_rule": THRESHOLD_RULE, "iou_match": iou_match,
        "best_threshold_note": "best_threshold and *_at_best maximise IoU on this data: optimistic",
    })  # fmt: skip
    return results


def _check_slices(slices: Sequence[int], z_range: Sequence[int]) -> None:
    start, stop = z_range
    if any(not start <= int(z) < stop for z in slices):
        raise ValueError(f"slices {list(slices)} must lie in the evaluated z range "
                         f"[{start}, {stop})")  # fmt: skip


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
    pred_group = _open_group(results["prediction"], "prediction")
    truth_group = _open_group(results["truth"], "truth")
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
            written.append(figures.save_slice_figure(
                directory / f"{name}_z{z:04d}.png", raw, truth, levels, metrics["level"], title
            ))  # fmt: skip
        written.append(figures.save_pr_curve(
            directory / f"{name}_pr_curve.png", histogram, metrics["threshold"],
            metrics["best_threshold"], f"{name}: precision-recall, z [{start}, {stop})",
        ))  # fmt: skip
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
    columns = ("iou", "dice", "precision", "recall", "accuracy", "miou", "best_threshold",
               "iou_at_best", "object_f1")  # fmt: skip
    lines = [f"{'class':<10}" + "".join(f"{c:>15}" for c in columns)]
    for name, metrics in results["metrics"].items():
        cells = (f"{metrics[c]:>15.4f}" if c in metrics else f"{'-':>15}" for c in columns)
        lines.append(f"{name:<10}" + "".join(cells))
    lines += [f"skipped {name}: {reason}" for name, reason in results["skipped"].items()]
    start, stop = results["z_range"]
    lines.append(f"z [{start}, {stop}), threshold {results['threshold']:g}; best_threshold and "
                 "*_at_best are tuned on this data (optimistic)")  # fmt: skip
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
    results["config"] = dict(config) if config is not None else {
        "prediction": str(prediction), "truth": str(truth), "z_range": z_range,
        "threshold": threshold, "slices": slices, "iou_match": iou_match, "instances": instances,
    }  # fmt: skip
    results["out_dir"] = str(out_dir)
    write_report(results, out_dir)
    write_figures(results, out_dir, slices)
    return results


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
@exit_on_error
def main(cfg: DictConfig) -> None:
    """Hydra entry point: evaluate, write the report into the run directory, print a table."""
    out_dir = cfg.out_dir or cfg.paths.output_dir
    z_range = list(cfg.z_range) if cfg.z_range is not None else None
    slices = list(cfg.slices) if cfg.slices is not None else None
    config = OmegaConf.to_container(cfg, resolve=True)
    results = evaluate(cfg.prediction, cfg.truth, out_dir, z_range, cfg.threshold, slices,
                       cfg.iou_match, cfg.instances, config)  # fmt: skip
    print(format_table(results))
    print(f"report: {Path(out_dir) / 'metrics.json'}")


if __name__ == "__main__":
    main()
