"""DDP inside a Hydra multirun: each rank must run the job's parameters in the job's directory.

Lightning starts ranks 1.. by re-running the command line (``sys.argv``) with
``hydra.run.dir=<HydraConfig run.dir>``. In a multirun that command is the whole sweep (``-m``,
``lr=1e-3,2e-3`` or an Optuna search), so each rank would sweep, or sample its own parameters,
and write to the single-run directory pattern instead of the job's: the known Hydra + DDP trap.
Here the child runs exactly this job: its resolved overrides, single-run mode, the job's output
directory. And after a job, :func:`ddp_scope_per_job` undoes the launch, so that the next job
of the sweep starts its own ranks instead of waiting for the last job's, which have exited.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

# What Lightning's launcher sets in the launching process's environment for its ranks.
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def ddp_child_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command and working directory of DDP rank ``local_rank`` under Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    if hydra.mode == RunMode.MULTIRUN:
        # This job's overrides, the swept values among them, as Hydra resolved them.
        command += [*hydra.overrides.task, "hydra.mode=RUN"]
        run_dir = hydra.runtime.output_dir
    else:
        command += sys.argv[1:]
        run_dir = hydra.run.dir
    # As Lightning's own: one directory for all ranks, and only rank 0 writes .hydra/.
    command += [
        f'hydra.run.dir="{run_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def use_job_command_for_ddp_ranks() -> None:
    """Make Lightning's DDP launcher start ranks with :func:`ddp_child_command`.

    Lightning has no option for this; its launcher calls a module-level function, replaced here
    (tests/test_sweeps.py fails if a Lightning release renames it).
    """
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = ddp_child_command  # type: ignore[assignment]


@contextmanager
def ddp_scope_per_job() -> Iterator[None]:
    """Around one training job: afterwards, no process group and no launch variables remain.

    Lightning's launcher leaves ``LOCAL_RANK`` and friends in ``os.environ``; the next fit in the
    same process (the next job of a multirun) then takes its ranks to exist already and waits for
    them. Processes started by an outside launcher (torchrun, SLURM) are left as they are.
    """
    launched_here = "LOCAL_RANK" not in os.environ
    saved = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}
    try:
        yield
    finally:
        if launched_here:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
