"""Write the synthetic volume to disk once, atomically, shared safely by concurrent runs.

``render`` draws the scene (what it holds is described there); this module stores it.

The volume mirrors the layout of the real data groups (see ``data/README.md``): ``raw`` plus
``labels/nuclei`` and ``labels/mito`` as uint8 zarr v3 arrays. It exists so the whole pipeline can
run, and be tested, without downloads, and because no real EM volume here has nuclei labels.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

from joenet.synthetic.render import Shape3, check_shape, render_synthetic_volume
from joenet.volume.atomic import replace_dir, staging_path
from joenet.volume.layout import volume_attrs

VERSION = 1
VOXEL_SIZE_NM = (8, 8, 8)
_STALE_LOCK_S = 900.0
_STALE_TMP_S = 3600.0


def generate_synthetic_volume(
    path: str | Path,
    shape: Shape3 = (48, 512, 512),
    seed: int = 0,
    chunks: Shape3 = (1, 256, 256),
) -> Path:
    """Render a synthetic EM volume and write it atomically as a zarr v3 group.

    The group is written to ``<path>.tmp-<pid>`` and renamed to ``path`` only when complete, so an
    interrupted run never leaves something at ``path`` that looks like a valid volume. An existing
    group at ``path`` is replaced.

    Args:
        path: Directory of the zarr group to create.
        shape: Volume shape ``(z, y, x)`` in voxels.
        seed: Seed of the generator; the same seed and shape give byte-identical arrays.
        chunks: Chunk shape of every array (clipped to ``shape``).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    shape = check_shape(shape)
    raw, nuclei, mito = render_synthetic_volume(shape, seed)

    tmp = staging_path(path)
    shutil.rmtree(tmp, ignore_errors=True)  # only a dead run of a process with our pid left it
    group = zarr.open_group(tmp, mode="w")
    chunks = (min(chunks[0], shape[0]), min(chunks[1], shape[1]), min(chunks[2], shape[2]))
    # The real groups use zstd 19; on noisy raw that costs seconds and saves almost nothing.
    codec = zarr.codecs.ZstdCodec(level=3)
    for name, data in (("raw", raw), ("labels/nuclei", nuclei), ("labels/mito", mito)):
        array = group.create_array(
            name, shape=shape, chunks=chunks, dtype=np.uint8, compressors=codec, fill_value=0
        )
        array[...] = data
    group.attrs.update(
        volume_attrs(
            "synthetic_em", "joenet synthetic generator", VOXEL_SIZE_NM, ["nuclei", "mito"]
        )
    )
    # Written last: `_is_complete` treats a group without it as unfinished.
    group.attrs["generator"] = _generator_attrs(shape, seed)

    try:
        replace_dir(tmp, path)
    except OSError:
        # Another process renamed its (identical, deterministic) result into place first.
        if not _is_complete(path, shape, seed):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_synthetic_volume(
    path: str | Path, shape: Shape3 = (48, 512, 512), seed: int = 0
) -> Path:
    """Return ``path`` after making sure it holds the synthetic volume for ``shape`` and ``seed``.

    A complete group with the same generator attributes is reused; anything else (missing,
    partial, other seed, shape or generator version) is regenerated. Concurrent callers are
    serialised by a lock file next to ``path``, so only one of them generates.

    Args:
        path: Directory of the zarr group.
        shape: Volume shape ``(z, y, x)`` in voxels.
        seed: Seed of the generator.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    shape = check_shape(shape)
    if _is_complete(path, shape, seed):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(f"{path.name}.lock")):
        if not _is_complete(path, shape, seed):  # a concurrent caller may have just written it
            _remove_stale_tmp(path)
            generate_synthetic_volume(path, shape, seed)
    return path


def _generator_attrs(shape: Shape3, seed: int) -> dict:
    return {"seed": int(seed), "shape": list(shape), "version": VERSION}


def _is_complete(path: Path, shape: Shape3, seed: int) -> bool:
    """Whether ``path`` holds a fully written volume made with these generator settings."""
    try:
        group = zarr.open_group(path, mode="r")
        if group.attrs.get("generator") != _generator_attrs(shape, seed):
            return False
        return all(group[name].shape == shape for name in ("raw", "labels/nuclei", "labels/mito"))
    except (OSError, LookupError, ValueError, TypeError, AttributeError, zarr.errors.BaseZarrError):
        return False


@contextmanager
def _file_lock(lock: Path, timeout: float = 600.0) -> Iterator[None]:
    """Exclusive lock file; a lock left by a dead process on this host, or a very old one, is
    broken."""
    deadline = time.monotonic() + timeout
    owner = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _lock_is_stale(lock):
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{lock} is held by another process; delete it if none is"
                ) from None
            time.sleep(0.2)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(owner)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_is_stale(lock: Path) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
        owner = lock.read_text().split()
    except OSError:
        return False  # released meanwhile
    if age > _STALE_LOCK_S:
        return True
    if len(owner) != 2 or owner[0] != socket.gethostname():
        return False  # owner not written yet, or on another host where its pid means nothing
    _, pid = owner
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _remove_stale_tmp(path: Path) -> None:
    """Delete temp/old siblings that crashed runs left behind (old enough to be dead)."""
    for pattern in (f"{path.name}.tmp-*", f"{path.name}.old-*"):
        for leftover in path.parent.glob(pattern):
            if time.time() - leftover.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
