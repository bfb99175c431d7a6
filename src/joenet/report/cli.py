"""``python -m joenet.report <multirun or runs dir> [--out DIR]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from joenet.cli import DEBUG_VARIABLE, describe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m joenet.report",
        description="Compare training runs: report.md, report.csv and curves.png.",
    )
    parser.add_argument("runs", type=Path, help="a multirun directory, or a folder of runs")
    parser.add_argument("--out", type=Path, help="where to write the report (default: runs)")
    args = parser.parse_args(argv)
    from joenet.report.outputs import write_report

    try:
        written = write_report(args.runs, args.out or args.runs)
    except Exception as err:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        sys.exit(1)
    for path in written:
        print(f"wrote {path}")
