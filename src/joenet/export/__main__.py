"""``python -m joenet.export``: see :mod:`joenet.export.cli`."""

from joenet.export.cli import main

main()
