"""``python -m joenet.predict``: see :mod:`joenet.predict.cli`."""

from joenet.predict.cli import main

main()
