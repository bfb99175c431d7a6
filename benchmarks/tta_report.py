"""The outputs of ``time_to_accuracy.py``: curves CSV, plot and summary table."""

from __future__ import annotations

import csv
from pathlib import Path


def write_curves(curves: dict[str, list[dict]], path: Path) -> None:
    """All models' curves in one CSV (rewritten after each model, so a crash keeps the rest)."""
    with open(path, "w", newline="") as f:
        fields = list(dict.fromkeys(k for curve in curves.values() for r in curve for k in r))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for curve in curves.values():
            writer.writerows(curve)


def first_reaching(curve: list[dict], target: float) -> float | None:
    return next((row["train_s"] for row in curve if row["val_iou"] >= target), None)


def plot(curves: dict[str, list[dict]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in curves.items():
        ax.plot(
            [r["train_s"] / 60 for r in curve],
            [r["val_iou"] for r in curve],
            "o-",
            markersize=3,
            label=name,
        )
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"IoU {target}")
    ax.set(
        xlabel="training wall time (min)",
        ylabel="val mito IoU (every 8th slice)",
        title="Lucchi, same patches, same budget, 2-core CPU",
        ylim=(0, 1),
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summary_table(
    curves: dict[str, list[dict]],
    final: dict[str, float],
    tiled: dict[str, dict[str, float]],
    minutes: float,
    target: float,
) -> str:
    """The Markdown table: patches, time to ``target``, best, largest drop, final (and tiled)."""
    lines = [
        f"| model | patches in {minutes:g} min | time to IoU {target} | best IoU "
        "(every 8th slice) | largest drop after 0.70 | final IoU (all 33 slices) |"
        + (" final IoU, tiled prediction | mean abs prob. tiled - whole |" if tiled else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if tiled else ""),
    ]
    for name, curve in curves.items():
        reached = first_reaching(curve, target)
        when = f"{reached / 60:.1f} min" if reached is not None else "not reached"
        values = [r["val_iou"] for r in curve]
        start = next((i for i, v in enumerate(values) if v >= 0.70), len(values))
        drops = [a - b for a, b in zip(values[start:], values[start + 1 :], strict=False)]
        row = (
            f"| {name} | {curve[-1]['patches']} | {when} | {max(values):.3f} "
            f"| {max([0.0, *drops]):.3f} | {final[name]:.4f} |"
        )
        if name in tiled:
            row += f" {tiled[name]['tiled_iou']:.4f} | {tiled[name]['mean_abs_prob_diff']:.4f} |"
        lines.append(row)
    return "\n".join(lines)
