"""Put a finished folder in place in one step: nobody sees a half-written volume at its path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def staging_path(path: Path) -> Path:
    """Where to write the folder for ``path`` first: beside it (same filesystem), per process."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def replace_dir(staged: Path, path: Path) -> None:
    """Rename ``staged`` to ``path``, replacing what is there.

    Two renames: the old folder aside, then the new one in place (a directory cannot be renamed
    over a non-empty one). Between them ``path`` is briefly absent, never half written. Raises
    ``OSError`` when the second rename fails (another process renamed its folder in first); the
    old folder is then deleted only if ``path`` holds something again.
    """
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(staged, path)
    finally:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
