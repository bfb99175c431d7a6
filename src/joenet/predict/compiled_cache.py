"""Ahead-of-time compiled networks, cached on disk so that only the first run pays the compile.

``torch.compile`` compiles again in every process (7-34 s on this project's CPU, and the
inductor cache does not cover frozen graphs), so on a short prediction it costs more than it
saves. AOTInductor (``torch.export`` then ``torch._inductor.aoti_compile_and_package``, the
documented ahead-of-time path) writes the compiled network, weights frozen in, to one ``.pt2``
file. Measured on the default network, 256 px tiles, batch 1, 2 AVX-512 cores: compile 20-65 s
once; a new process then loads the package in ~0.01 s (through the loader, not
``torch._inductor.aoti_load_package``, whose import and loading cost ~4.5 s, see
:func:`load_package`) and runs ~80 ms faster per tile than eager (logits within 1e-5).

A package is only valid for the exact weights, architecture, input shape, memory format, torch
version and CPU instruction set it was compiled for, so all of them are in its file name: a
cache directory shared by cluster nodes with other CPUs or torch versions never hands one a
package it cannot run (an AVX-512 build on an AVX2 node would crash, not fail politely).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Bump when what a package holds changes meaning (how it is exported or what it is keyed by).
_FORMAT = 1


def default_cache_dir() -> Path:
    """``$JOENET_CACHE_DIR``, else ``$XDG_CACHE_HOME/joenet``, else ``~/.cache/joenet``;
    packages go to its ``compiled/`` folder."""
    if os.environ.get("JOENET_CACHE_DIR"):
        return Path(os.environ["JOENET_CACHE_DIR"]) / "compiled"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "joenet" / "compiled"


def resolve_cache_dir(compile_cache: bool | str | os.PathLike | None) -> Path | None:
    """The directory packages are cached in, or None for no cache (compile in each process).

    ``compile_cache``: ``auto``/true (the default directory), false/None (none), or a path.
    """
    if compile_cache is None or compile_cache is False:
        return None
    if compile_cache is True or str(compile_cache).lower() in ("auto", "true"):
        return default_cache_dir()
    if str(compile_cache).lower() in ("false", "none", "null", ""):
        return None
    return Path(compile_cache).expanduser().resolve()


def _device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"


def package_path(
    net: nn.Module, input_shape: tuple[int, ...], channels_last: bool, cache_dir: Path
) -> Path:
    """Where the package of ``net`` (the inference form: folded, in its memory format) for
    ``input_shape`` lies in ``cache_dir``, present or not."""
    digest = hashlib.sha256()
    digest.update(repr(net).encode())  # the architecture, as the modules describe themselves
    for name, tensor in net.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # bf16 too
        digest.update(raw.numpy().tobytes())  # the same bytes as numpy's for fp32 (keys kept)
    first = next(net.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    digest.update(f"{input_shape}:{channels_last}:{_FORMAT}".encode())
    tag = f"torch{torch.__version__}-{_device_tag(device)}".replace("+", "_")
    return cache_dir / f"{digest.hexdigest()[:24]}-{tag}.pt2"


def load_or_compile(
    net: nn.Module, input_shape: tuple[int, int, int, int], channels_last: bool, cache_dir: Path
) -> Callable[[Tensor], Tensor]:
    """``net`` compiled ahead of time for ``input_shape``: from the cache, or compiled into it.

    Raises whatever export or compile raises (no C++ compiler, an unexportable network): the
    caller falls back to eager. A package that no longer loads is compiled again.
    """
    path = package_path(net, input_shape, channels_last, cache_dir)
    if path.exists():
        try:
            compiled = load_package(path)
            log.info("compiled network loaded from %s", path)
            return compiled
        except Exception as err:  # a truncated or foreign file: compile it again over it
            log.warning("compiled network %s does not load (%s); compiling it again", path, err)
    start = time.perf_counter()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    first = next(net.parameters())
    example = torch.zeros(input_shape, device=first.device, dtype=first.dtype)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(net, (example.contiguous(memory_format=memory_format),))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside its final name and renamed into place: two processes compiling the same
    # network at once (Dask workers) each rename a whole file, and a reader never sees half.
    fd, partial = tempfile.mkstemp(prefix=".partial-", suffix=".pt2", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)  # mkstemp's 0600 would hide it from a shared cache's group
    try:
        from torch import _inductor  # only compiling needs it (loading does not: load_package)

        # Freezing applies only with autograd off (as prediction calls this, under
        # inference_mode); said here too, so that no caller gets an unfrozen package.
        with torch.no_grad():
            _inductor.aoti_compile_and_package(
                program, package_path=partial, inductor_configs={"freezing": True}
            )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("network compiled in %.0f s, cached at %s", time.perf_counter() - start, path)
    return load_package(path)


def load_package(path: Path) -> Callable[[Tensor], Tensor]:
    """The network in the ``.pt2`` at ``path``, called with one tile batch.

    ``torch._inductor.aoti_load_package`` imports inductor (~1.9 s here) and reads the archive
    through ``torch.export``'s pt2 loader (~2.6 s) before it builds the same C++ loader that is
    used here directly (0.01 s, outputs bit-identical: tests/test_compiled_cache.py). That loader
    is what ``aoti_load_package`` wraps, but it is not public API: if a torch release moves it,
    the documented function is used instead (the key holds the torch version, so a package never
    outlives the torch that wrote it).
    """
    loader_class = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader_class is None:
        from torch import _inductor

        return _inductor.aoti_load_package(str(path))
    loader = loader_class(str(path), "model", False, 1, -1)

    def run(tiles: Tensor) -> Tensor:
        (logits,) = loader.boxed_run([tiles])  # one input, one output: the network's signature
        return logits

    return run
