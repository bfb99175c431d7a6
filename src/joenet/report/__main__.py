"""``python -m joenet.report``: see :mod:`joenet.report.cli`."""

from joenet.report.cli import main

main()
