"""``python -m joenet.convert``: see :mod:`joenet.convert.cli`."""

import sys

from joenet.convert.cli import main

sys.exit(main())
