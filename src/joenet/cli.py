"""Errors of the command-line entry points: one clear line and a non-zero exit, no traceback."""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

T = TypeVar("T")
DEBUG_VARIABLE = "JOENET_DEBUG"


def _root_cause(err: BaseException) -> BaseException:
    # Hydra wraps constructor errors ("Error in call to target ..."); the cause says what is wrong.
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def describe(err: BaseException) -> str:
    """A one-line explanation of ``err`` for the terminal."""
    cause = _root_cause(err)
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return f"no space left on the device while writing {cause.filename or 'output'}"
    if isinstance(cause, PermissionError):
        return f"permission denied: {cause.filename or cause} (is the output directory writable?)"
    if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
        return f"{cause}: check the spelling of that config key"
    message = str(cause).strip() or type(cause).__name__
    if isinstance(cause, ValueError | FileNotFoundError | KeyError | RuntimeError):
        return message
    return f"{type(cause).__name__}: {message}"


class Preempted(Exception):
    """Training stopped by a scheduler's signal; ``checkpoint`` is where it can resume from."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        self.signum, self.checkpoint = int(signum), checkpoint
        name = signal.Signals(self.signum).name
        if checkpoint:
            where = f"last.ckpt written at this step: resume with ckpt_path={checkpoint}"
        else:
            where = "no step finished since the last checkpoint: resume from its last.ckpt"
        super().__init__(f"stopped by {name}; {where}")


def exit_on_error(task: Callable[..., T]) -> Callable[..., T]:
    """Decorate a Hydra task function: an exception becomes ``error: ...`` on stderr and exit 1.

    ``JOENET_DEBUG=1`` re-raises instead, so Hydra prints the full traceback (with
    ``HYDRA_FULL_ERROR=1`` for Hydra's own frames too).
    """

    @functools.wraps(task)
    def wrapper(*args, **kwargs) -> T:
        try:
            return task(*args, **kwargs)
        except Preempted as stop:  # not an error: say where to resume, exit as a signal would
            print(f"joenet: {stop}", file=sys.stderr)
            sys.exit(128 + stop.signum)
        except Exception as err:
            if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
                raise
            print(f"error: {describe(err)}", file=sys.stderr)
            print(f"(set {DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr)
            sys.exit(1)

    return wrapper


class CheckOutputDir(Callback):
    """Hydra callback: refuse a run directory that cannot be created, before Hydra tries.

    Hydra creates the run directory before calling joenet, so its failure would surface as a
    traceback; this check turns it into one line naming the directory and the key to change.
    """

    def _check(self, directory: str, key: str) -> None:
        # Creating it is the only reliable test (root passes os.access on read-only mounts).
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            probe = Path(directory) / f".joenet-write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            print(
                f"error: cannot create the run directory {directory} ({err.strerror}). "
                f"Set {key} or paths.log_dir to a writable place",
                file=sys.stderr,
            )
            sys.exit(1)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
