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
ceil(255 t)`` (``joenet.evaluate.counts.threshold_to_level``). ``best_threshold`` and the
``*_at_best`` metrics are tuned on the evaluated data itself: optimistic, not a held-out figure.

Pixel metrics are accumulated block by block over z, so the volume is never loaded whole for
them; the object statistics hold both masks of the evaluated z range in memory (see
``joenet.evaluate.objects``), which ``instances=false`` switches off.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from joenet.evaluate import counts
from joenet.evaluate.objects import instance_metrics
from joenet.metrics import METRIC_NAMES
from joenet.volume import check_z_range, intensity_sample, open_zarr

THRESHOLD_RULE = (
    "positive iff u / 255 >= threshold, i.e. u >= ceil(255 * threshold), where u = round(255 p)"
)


def open_prediction_group(path: str | Path, role: str) -> zarr.Group:
    """The prediction or truth group, read-only; a clear error when it is not one."""
    group = open_zarr(path, f"the {role}, a zarr group")
    assert isinstance(group, zarr.Group)  # open_zarr(group=True) opens groups only
    return group


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
        names = sorted(
            name
            for name, array in group.arrays()
            if array.ndim == 3 and not name.endswith("_instances")
        )
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


def _check_something_to_evaluate(
    classes: list[str],
    labelled: list[str],
    pred_group: zarr.Group,
    prediction: str | Path,
    truth: str | Path,
) -> None:
    """Refuse a run that would evaluate no class (and write an empty ``metrics.json``)."""
    if set(classes) & set(labelled):
        return
    has = f"labels {labelled}" if labelled else "no labels/ group"
    hint = (
        ": prediction= looks like a volume (it holds raw or labels/): are prediction= and "
        "truth= swapped?"
        if "raw" in pred_group or "labels" in pred_group
        else ": truth= must be the volume with labels/<class> masks"
    )
    raise ValueError(
        f"nothing to evaluate: prediction {prediction} holds classes {classes} and truth "
        f"{truth} has {has}, none in common{hint}"
    )


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
            raise ValueError(
                f"prediction array {pred.path!r} is declared 0/1 masks "
                "(values: mask 0/1) but holds values above 1"
            )
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
        **{f"{name}_at_best": at_best[name] for name in METRIC_NAMES},
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
    # Checked before any reading: the keys as the command line spells them.
    counts.threshold_to_level(threshold)  # its check: a probability in [0, 1]
    if not 0.0 < iou_match <= 1.0:
        raise ValueError(f"iou_match must be an IoU in (0, 1], got {iou_match}")
    pred_group, truth_group = (
        open_prediction_group(prediction, "prediction"),
        open_prediction_group(truth, "truth"),
    )
    classes = _prediction_classes(pred_group, prediction)
    labelled = list(truth_group["labels"].array_keys()) if "labels" in truth_group else []
    _check_something_to_evaluate(classes, labelled, pred_group, prediction, truth)
    binary = _binary_from_attrs(pred_group)
    depth = pred_group[classes[0]].shape[0]
    start, stop = check_z_range(z_range, depth, str(prediction), "z_range")
    results: dict[str, Any] = {"metrics": {}, "histograms": {}, "skipped": {}}
    for name in classes:
        if name not in labelled:
            results["skipped"][name] = f"no labels/{name} in {truth}: not evaluated"
            continue
        pred, labels = pred_group[name], truth_group[f"labels/{name}"]
        if pred.shape != labels.shape:
            raise ValueError(
                f"{prediction}/{name} has shape {pred.shape} but {truth}/labels/"
                f"{name} has {labels.shape}; they must match (z, y, x)"
            )
        _check_prediction_values(pred, f"{prediction}/{name}")
        metrics, histogram = evaluate_class(
            pred, labels, (start, stop), threshold, iou_match, instances, binary
        )
        results["metrics"][name] = metrics
        results["histograms"][name] = histogram.tolist()
    for name in labelled:
        if name not in classes:
            results["skipped"][name] = f"labelled in truth but not in {prediction}: not evaluated"
    results.update(
        {
            "prediction": str(prediction),
            "truth": str(truth),
            "z_range": [start, stop],
            "threshold": threshold,
            "threshold_rule": THRESHOLD_RULE,
            "iou_match": iou_match,
            "best_threshold_note": (
                "best_threshold and *_at_best maximise IoU on this data: optimistic"
            ),
        }
    )
    return results
