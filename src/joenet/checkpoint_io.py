"""The trainer's checkpoint plugin: every checkpoint is written atomically.

Apart from :mod:`joenet.checkpoint` because it needs Lightning, which loading a model for
prediction does not.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target, fsync it, then rename it over the target.

    A kill during a save (e.g. ``kill -9`` on a shared cluster) leaves the previous ``last.ckpt``
    intact. Lightning's own save goes through an fsspec transaction, which stages the file in the
    system temp dir and *copies* it over when that is another filesystem: not atomic. The
    temporary name avoids "last", which ``ckpt_path=last`` looks for.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # object stores write whole objects: already all or nothing
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.parent / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
