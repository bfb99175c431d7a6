"""Evaluation of predictions against labels: confusion counts, object matching, figures.

``joenet.evaluate`` is the command that ties them together.
"""

from __future__ import annotations

from joenet.evaluation.counts import (
    METRIC_NAMES,
    best_level,
    confusion_at_levels,
    level_histogram,
    metrics_at_level,
    metrics_from_counts,
    precision_recall_curve,
    threshold_to_level,
    to_levels,
)
from joenet.evaluation.instances import (
    INSTANCE_METRIC_NAMES,
    instance_metrics,
    label_components,
    match_objects,
)

__all__ = [
    "INSTANCE_METRIC_NAMES",
    "METRIC_NAMES",
    "best_level",
    "confusion_at_levels",
    "instance_metrics",
    "label_components",
    "level_histogram",
    "match_objects",
    "metrics_at_level",
    "metrics_from_counts",
    "precision_recall_curve",
    "threshold_to_level",
    "to_levels",
]
