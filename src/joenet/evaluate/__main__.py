"""``python -m joenet.evaluate``: see :mod:`joenet.evaluate.cli`."""

from joenet.evaluate.cli import main

main()
