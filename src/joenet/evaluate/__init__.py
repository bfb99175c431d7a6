"""Evaluate a prediction against labels: ``python -m joenet.evaluate prediction=... truth=...``.

``evaluation`` (metrics of a whole prediction volume, block by block), ``counts`` (confusion
counts per probability level and the metrics from them), ``objects`` (3D object matching),
``figures`` and ``report`` (what is written), ``cli`` (the Hydra command).
"""

from joenet.evaluate.counts import (
    best_level,
    confusion_at_levels,
    level_histogram,
    metrics_at_level,
    precision_recall_curve,
    threshold_to_level,
    to_levels,
)
from joenet.evaluate.evaluation import THRESHOLD_RULE, evaluate_class, evaluate_volume
from joenet.evaluate.objects import INSTANCE_METRIC_NAMES, instance_metrics, match_objects
from joenet.evaluate.report import (
    default_slices,
    evaluate,
    format_table,
    write_figures,
    write_report,
)
from joenet.metrics import METRIC_NAMES, metrics_from_counts
from joenet.volume.components import label_components

__all__ = [
    "INSTANCE_METRIC_NAMES",
    "METRIC_NAMES",
    "THRESHOLD_RULE",
    "best_level",
    "confusion_at_levels",
    "default_slices",
    "evaluate",
    "evaluate_class",
    "evaluate_volume",
    "format_table",
    "instance_metrics",
    "label_components",
    "level_histogram",
    "match_objects",
    "metrics_at_level",
    "metrics_from_counts",
    "precision_recall_curve",
    "threshold_to_level",
    "to_levels",
    "write_figures",
    "write_report",
]
