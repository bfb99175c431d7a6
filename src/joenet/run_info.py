"""Record what a run was: its resolved config, command line, code version and environment."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from joenet.config import source_root

_PACKAGES = (
    "joenet",
    "torch",
    "lightning",
    "torchmetrics",
    "hydra-core",
    "omegaconf",
    "zarr",
    "numpy",
    "tensorboard",
)


def git_state() -> dict[str, str | bool | None]:
    """Commit and dirtiness of the checkout joenet runs from (None outside a git checkout)."""
    root = source_root()
    state: dict[str, str | bool | None] = {"commit": None, "dirty": None}
    if root is None:
        return state
    try:
        git = ["git", "-C", str(root)]
        state["commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        state["dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def environment() -> dict:
    """Package versions, Python, platform and accelerator."""
    versions: dict[str, str | None] = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_run_info(output_dir: str | Path, cfg: DictConfig, entry: str = "joenet.train") -> None:
    """Write ``config.yaml``, ``command.txt`` and ``run_info.json`` into the run directory.

    ``entry`` is the module that was run (``python -m <entry>``), for ``command.txt``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    command = shlex.join([sys.executable, "-m", entry, *sys.argv[1:]])
    (output_dir / "command.txt").write_text(command + "\n")
    info = {"git": git_state(), **environment()}
    (output_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
