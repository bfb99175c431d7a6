"""``python -m joenet.report <runs dir>``: compare the runs of a sweep, one table and one figure.

``runs`` reads each run directory (its ``summary.json``, configs and TensorBoard events);
``outputs`` writes ``report.md``, ``report.csv`` and ``curves.png``.
"""

from joenet.report.outputs import write_report
from joenet.report.runs import RunRecord, find_runs, read_run

__all__ = ["RunRecord", "find_runs", "read_run", "write_report"]
