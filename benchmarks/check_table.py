"""The GPU check's table: parts run in turn, each one's rows written as soon as it ends.

On a lent GPU machine (minutes of device time, a command stopped at its time limit) a part that
fails, or one stopped by the limit, must not take the figures of the others with it.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path

Result = tuple[str, str, str, str]  # section, setting, value, note


def failure_row(part: str, err: Exception, setting: str = "failed") -> Result:
    """A table row for an error: its type and the first line of its message."""
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    return (part, setting, "failed", f"{type(err).__name__}: {first_line}")


def run_parts(
    parts: dict[str, Callable[[], list[Result]]], header: str, out: Path | None
) -> tuple[list[Result], list[str]]:
    """Run each part in turn; the table so far is rewritten to ``out`` after each one.

    A part that fails is a row of the table, not the end of the run: on a lent GPU machine
    (minutes of device time, a command stopped at its time limit) the parts measured before and
    after it still come back. Returns the rows and the names of the parts that failed.
    """
    results: list[Result] = []
    failed = []
    for name, part in parts.items():
        start = time.perf_counter()
        try:
            results += part()
        except Exception as err:  # reported in the table: the run goes on
            failed.append(name)
            results.append(failure_row(name, err))
        print(f"{name}: measured in {time.perf_counter() - start:.0f} s", flush=True)
        if out is not None:
            write_table(results, header, out)
    return results, failed


def table_lines(results: list[Result], header: str) -> list[str]:
    lines = [header, "", "| part | setting | value | note |", "|---|---|---:|---|"]
    return lines + [f"| {' | '.join(row)} |" for row in results]


def write_table(results: list[Result], header: str, out: Path) -> None:
    """``<out>.md`` and ``<out>.csv`` of the rows so far."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(table_lines(results, header)) + "\n")
    with out.with_suffix(".csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["part", "setting", "value", "note"])
        writer.writerows(results)
