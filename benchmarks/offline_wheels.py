"""Wheels of what joenet needs beyond a GPU machine's own image, for a machine without network.

The GPU machine the project is lent (the ``device`` tool's H200) starts bare from an image that
holds torch, lightning, torchmetrics, numpy, scipy, matplotlib and more, but not hydra-core,
omegaconf, zarr or MONAI, and it reaches no package index, so ``make bench-gpu`` cannot install
there. This script, run here (where PyPI is reachable), walks joenet's requirements (and
MONAI's, the benchmarks' peer) down to what the image lacks and downloads those wheels, in the
versions installed in this venv (the ones the tests ran with), for the image's Python; sdist-only
packages (antlr4-python3-runtime) are built into wheels here. Then, on the GPU machine, in one
command (``benchmarks/gpu_check_offline.sh``)::

    python benchmarks/offline_wheels.py --dest .whl          # here; .whl/ is git-ignored
    sh benchmarks/gpu_check_offline.sh .whl gpu_check         # there: installs, then gpu_check

The image's package list is the device tool's (KINDS.md, read 2026-11-17, Python 3.12); a
package missing from it fails the install there with its name, and belongs in ``IMAGE_HAS`` no
more.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

# What the GPU image holds among joenet's (transitive) requirements, by normalised name.
IMAGE_HAS = frozenset(
    {
        "torch", "lightning", "pytorch-lightning", "torchmetrics", "lightning-utilities",
        "numpy", "scipy", "matplotlib", "tensorboard", "tqdm", "pyyaml", "packaging",
        "typing-extensions", "psutil", "fsspec", "aiohttp", "filelock", "jinja2", "networkx",
        "sympy", "setuptools", "triton", "pillow", "contourpy", "cycler", "fonttools",
        "kiwisolver", "pyparsing", "python-dateutil", "six", "protobuf", "grpcio", "absl-py",
        "markdown", "werkzeug", "tensorboard-data-server", "mpmath", "markupsafe",
    }
)  # fmt: skip
# The benchmarks' peer, beside joenet's own requirements.
PEERS = ("monai",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed(python_version: str = "3.12", peers: tuple[str, ...] = PEERS) -> dict[str, str]:
    """Name -> installed version of every requirement of joenet and ``peers``, transitively,
    that the GPU image lacks (markers evaluated for ``python_version`` on Linux, no extras).

    Raises ``LookupError`` naming a needed package that is not installed here (its version is
    what would be carried).
    """
    environment = {"python_version": python_version, "sys_platform": "linux", "extra": ""}
    todo = [Requirement(text) for text in metadata.requires("joenet") or []]
    todo += [Requirement(peer) for peer in peers]
    found: dict[str, str] = {}
    while todo:
        requirement = todo.pop()
        name = normalise(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue  # an extra's requirement, or for another Python or platform
        if name in IMAGE_HAS or name in found:
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise LookupError(
                f"{name} is needed on the GPU machine but not installed here, so its version is "
                "unknown: pip install -e '.[bench]' (make gpu-wheels does) and run this again"
            ) from None
        todo += [Requirement(text) for text in metadata.requires(name) or []]
    return dict(sorted(found.items()))


def download(packages: dict[str, str], dest: Path, python_version: str) -> None:
    """Binary wheels for the image's Python from PyPI; a wheel built here where there is none."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    for name, version in packages.items():
        pinned = f"{name}=={version}"
        command = [*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
        command += ["--python-version", python_version, "--implementation", "cp"]
        command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        if subprocess.run([*command, pinned], capture_output=True).returncode != 0:
            # No binary for that Python: an sdist, built here (pure Python, as antlr4's is).
            build = [*pip, "wheel", "--quiet", "--no-deps", "-w", str(dest), pinned]
            subprocess.run(build, check=True)
        print(f"{pinned}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    parser.add_argument("--python-version", default="3.12", help="the GPU image's Python")
    parser.add_argument("--list", action="store_true", help="print what is needed, download none")
    args = parser.parse_args()
    packages = needed(args.python_version)
    if args.list:
        print("\n".join(f"{name}=={version}" for name, version in packages.items()))
        return
    download(packages, args.dest, args.python_version)
    size = sum(path.stat().st_size for path in args.dest.glob("*.whl")) / 2**20
    print(f"{len(packages)} wheels in {args.dest} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
