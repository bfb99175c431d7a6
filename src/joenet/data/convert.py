"""``python -m joenet.data.convert``: the converter's first command name, kept for users' scripts.

The converter lives in :mod:`joenet.convert`; ``python -m joenet.convert`` is the same command.
"""

import sys

from joenet.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
