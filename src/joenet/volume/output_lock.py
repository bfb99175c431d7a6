"""One writer per output: a second prediction or conversion into the same path refuses at once.

The lock is an advisory ``flock`` on ``<output>.lock`` beside the output. The kernel releases it
when the process ends, ``kill -9`` included, so a dead run never blocks the next one; the file is
removed on a normal exit. Hand-written rather than the ``filelock`` package: the refusal names
who holds the output (pid, host, start time), which ``filelock`` does not record. Object-store
URLs have no such lock and are not guarded.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputBusy(ValueError):
    """Another process is writing the same output; the message says which."""


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of ``output``: ``<output>.lock`` in the same folder."""
    path = Path(os.path.abspath(output))
    return path.with_name(f"{path.name}.lock")


def _open_locked(path: Path, command: str, output: str | os.PathLike) -> int:
    """Open ``path`` and lock it; retry when the file was replaced while we waited for it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputBusy(
                f"output {output} is being written by another {command} ({owner}); wait for "
                "it to finish, or choose another output"
            ) from None
        # The holder before us may have removed the file after we opened it: then our lock is
        # on a file nobody else can find, and we must lock the one at the path instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def exclusive_output(output: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold ``output``'s lock for the block; :class:`OutputBusy` at once if another holds it.

    Args:
        output: the folder about to be written (it need not exist; its parent must).
        command: what writes it, for the message (``joenet.predict``).
    """
    if "://" in str(output):
        yield
        return
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, command, output)
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        owner = f"pid {os.getpid()} on {socket.gethostname()}, since {started}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode(), 0)
        yield
    finally:
        # Unlink while still holding the lock: whoever opened the old file re-checks the path.
        path.unlink(missing_ok=True)
        os.close(fd)
