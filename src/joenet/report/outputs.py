"""Write the comparison: ``report.csv`` (every figure), ``report.md`` (the table to read) and
``curves.png`` (validation Dice and IoU of every run against time and against patches)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from joenet.metrics import LOGGED_METRICS
from joenet.report.runs import CURVE_TAGS, RunRecord, find_runs, read_run


def _classes(runs: list[RunRecord]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for name in (run.config.get("model") or {}).get("class_names") or []:
            if name not in names:
                names.append(name)
    return names


def common_overrides(runs: list[RunRecord]) -> list[str]:
    """The overrides every run shares (a sweep's fixed settings), in the first run's order."""
    shared = set.intersection(*(set(run.overrides) for run in runs)) if len(runs) > 1 else set()
    return [o for o in runs[0].overrides if o in shared]


def _rows(runs: list[RunRecord], classes: list[str]) -> list[dict[str, Any]]:
    rows = []
    shared = set(common_overrides(runs))
    for run in runs:
        s, best = run.summary, run.summary.get("best_metrics") or {}
        row: dict[str, Any] = {
            "run": run.name,
            "overrides": " ".join(o for o in run.overrides if o not in shared),
            "finished": run.finished,
            "monitor": s.get("monitor"),
            "best": s.get("best"),
        }
        for name in classes:
            for metric in LOGGED_METRICS:
                row[f"{metric}_{name}"] = best.get(f"val/{metric}_{name}")
        row |= {
            "best_epoch": s.get("best_epoch"),
            "epochs": s.get("epochs"),
            "steps": s.get("steps"),
            "patches": s.get("patches"),
            "wall_minutes": None if s.get("wall_seconds") is None else s["wall_seconds"] / 60,
            "patches_per_second": s.get("patches_per_second"),
            "parameters": s.get("parameters"),
            "gflops_per_patch": s.get("gflops_per_patch"),
            "patch_size": s.get("patch_size"),
        }
        rows.append(row)
    return rows


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no (killed)"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _markdown(rows: list[dict[str, Any]], classes: list[str], root: Path, shared: list[str]) -> str:
    metric = rows[0]["monitor"] or "val/dice"
    columns = [("run", "run"), ("overrides", "overrides"), ("best", f"best {metric}")]
    for name in classes:
        if all(row[f"dice_{name}"] is None for row in rows):
            continue  # a class no run has labels for (Lucchi: nuclei); report.csv keeps it
        columns += [(f"dice_{name}", f"Dice {name}"), (f"iou_{name}", f"IoU {name}")]
    columns += [
        ("best_epoch", "epoch of best"),
        ("epochs", "epochs"),
        ("wall_minutes", "minutes"),
        ("patches_per_second", "patches/s"),
        ("parameters", "parameters"),
        ("gflops_per_patch", "GFLOPs/patch"),
    ]
    lines = [
        f"# Runs under {root}",
        "",
        "Best validation metrics of each run (at its best validation by the monitor, the one "
        "`best.ckpt` holds). GFLOPs: one forward pass of a patch of the run's `data.patch_size`. "
        "Written by `python -m joenet.report`; every figure is in `report.csv`, the curves in "
        "`curves.png`.",
        "",
        *([f"Every run: `{' '.join(shared)}`", ""] if shared else []),
        "| " + " | ".join(title for _, title in columns) + " |",
        "|"
        + "|".join("---" if key in ("run", "overrides") else "---:" for key, _ in columns)
        + "|",
    ]
    for row in rows:
        cells = [_cell(row[key], 1 if key == "wall_minutes" else 3) for key, _ in columns]
        if row["overrides"]:
            cells[1] = f"`{row['overrides']}`"
        lines.append("| " + " | ".join(cells) + " |")
    killed = [row["run"] for row in rows if not row["finished"]]
    if killed:
        lines += ["", f"Not finished (figures from their TensorBoard events): {', '.join(killed)}."]
    return "\n".join(lines) + "\n"


def _curves(runs: list[RunRecord], path: Path) -> None:
    figure = Figure(figsize=(11, 8), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(CURVE_TAGS), 2, squeeze=False)
    shared = set(common_overrides(runs))
    for row, tag in enumerate(CURVE_TAGS):
        for col, (index, label) in enumerate(((0, "minutes of training"), (1, "patches seen"))):
            ax = axes[row][col]
            for run in runs:
                points = run.curves.get(tag, [])
                if points:
                    title = " ".join(o for o in run.overrides if o not in shared) or run.name
                    ax.plot(
                        [p[index] for p in points],
                        [p[2] for p in points],
                        marker=".",
                        label=title[:60],
                    )
            ax.set_xlabel(label)
            ax.set_ylabel(tag)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    figure.suptitle("Validation metrics per run (mean over labelled classes)")
    figure.savefig(path, dpi=110)


def write_report(root: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Read every run under ``root`` and write ``report.md``, ``report.csv`` and ``curves.png``.

    Returns:
        The paths written.
    """
    root = Path(root)
    paths = find_runs(root)
    if not paths:
        raise FileNotFoundError(
            f"{root}: no joenet training runs under it (expected run directories holding "
            "config.yaml and tensorboard/, as python -m joenet.train writes)"
        )
    runs = [read_run(path, root) for path in paths]
    classes = _classes(runs)
    rows = _rows(runs, classes)
    out = Path(out_dir or root)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "report.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "report.md").write_text(_markdown(rows, classes, root, common_overrides(runs)))
    _curves(runs, out / "curves.png")
    return [out / "report.md", out / "report.csv", out / "curves.png"]
