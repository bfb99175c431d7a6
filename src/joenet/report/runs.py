"""Read what a training run left in its directory: summary, overrides, validation curves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from joenet.run_summary import SUMMARY_FILE

CURVE_TAGS = ("val/dice", "val/iou")


@dataclass
class RunRecord:
    """One training run, as the report shows it.

    Attributes:
        path: the run directory.
        name: its path relative to the report's root.
        overrides: the command-line overrides of the run (Hydra's ``overrides.yaml``).
        config: the resolved config (``config.yaml``).
        summary: ``summary.json`` of a finished run, or one derived from its events.
        curves: per tag, ``(minutes since the first event, patches seen, value)`` per validation.
        finished: whether the run wrote ``summary.json`` (it ended, rather than was killed).
    """

    path: Path
    name: str
    overrides: list[str]
    config: dict[str, Any]
    summary: dict[str, Any]
    curves: dict[str, list[tuple[float, int, float]]] = field(default_factory=dict)
    finished: bool = True


def find_runs(root: Path) -> list[Path]:
    """Run directories under ``root`` (``root`` itself included): those with a ``config.yaml``
    beside TensorBoard events. Multirun jobs come in job order."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (expected a multirun or runs folder)")
    candidates = [root, *sorted(p.parent for p in root.rglob("config.yaml"))]
    runs = {p for p in candidates if (p / "config.yaml").is_file() and _event_files(p)}

    def order(path: Path) -> tuple:
        rel = path.relative_to(root).parts
        return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in rel)

    return sorted(runs, key=order)


def _event_files(run: Path) -> list[Path]:
    return sorted(run.glob("tensorboard/**/events.out.tfevents.*"))


def _scalars(run: Path) -> dict[str, list[tuple[float, int, float]]]:
    """Every scalar of the run's events: tag -> [(wall time, step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[float, int, float]]] = {}
    for events_file in _event_files(run):
        events = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            series.setdefault(tag, []).extend(
                (e.wall_time, e.step, e.value) for e in events.Scalars(tag)
            )
    return {tag: sorted(values) for tag, values in series.items()}


def _patches_per_step(config: dict[str, Any], summary: dict[str, Any]) -> float:
    if summary.get("patches") and summary.get("steps"):
        return summary["patches"] / summary["steps"]
    data, trainer = config.get("data", {}), config.get("trainer", {})
    return float(data.get("batch_size", 1)) * float(trainer.get("accumulate_grad_batches", 1))


def _derived_summary(config: dict[str, Any], scalars: dict[str, list]) -> dict[str, Any]:
    """What ``summary.json`` would hold, from the events of a run that did not finish."""
    monitor = config.get("monitor", "val/dice")
    points = scalars.get(monitor, [])
    if not points:
        return {"monitor": monitor, "best": None, "best_metrics": {}}
    maximise = config.get("monitor_mode", "max") == "max"
    _, step, best = (max if maximise else min)(points, key=lambda p: p[2])
    metrics = {
        tag: next(v for w, s, v in values if s == step)
        for tag, values in scalars.items()
        if tag.startswith("val/") and any(s == step for _, s, _ in values)
    }
    epochs = [v for _, s, v in scalars.get("epoch", []) if s == step]
    first = min(p[0] for values in scalars.values() for p in values)
    last = max(p[0] for values in scalars.values() for p in values)
    steps = max(p[1] for values in scalars.values() for p in values)
    return {
        "monitor": monitor,
        "best": best,
        "best_epoch": int(epochs[0]) if epochs else None,
        "best_step": step,
        "best_metrics": metrics,
        "steps": steps,
        "wall_seconds": round(last - first, 1),
    }


def _network_cost(config: dict[str, Any]) -> dict[str, Any]:
    """Parameters and GFLOPs of the run's network, rebuilt from its config (no weights read)."""
    from joenet.model import UNet2d
    from joenet.model.cost import count_gflops, count_parameters

    model = config.get("model") or {}
    patch = int((config.get("data") or {}).get("patch_size") or 256)
    try:
        net = UNet2d(
            out_channels=len(model.get("class_names") or [0, 0]), **(model.get("net") or {})
        )
    except (TypeError, ValueError):  # a config of another joenet version: leave the cells empty
        return {}
    return {
        "parameters": count_parameters(net),
        "gflops_per_patch": round(count_gflops(net, False, (1, 1, patch, patch)), 3),
        "patch_size": patch,
    }


def _yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def read_run(path: Path, root: Path) -> RunRecord:
    """A :class:`RunRecord` of the run directory ``path``."""
    config = _yaml(path / "config.yaml") or {}
    overrides = _yaml(path / ".hydra" / "overrides.yaml") or []
    scalars = _scalars(path)
    summary_file = path / SUMMARY_FILE
    finished = summary_file.is_file()
    summary = (
        json.loads(summary_file.read_text()) if finished else _derived_summary(config, scalars)
    )
    if summary.get("parameters") is None:
        summary |= _network_cost(config)
    per_step = _patches_per_step(config, summary)
    first = min((p[0] for values in scalars.values() for p in values), default=0.0)
    curves = {
        tag: [((w - first) / 60, round(s * per_step), v) for w, s, v in scalars[tag]]
        for tag in CURVE_TAGS
        if tag in scalars
    }
    name = str(path.relative_to(root)) if path != root else path.name
    return RunRecord(path, name, list(overrides or []), config, summary, curves, finished)
