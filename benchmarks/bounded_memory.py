"""Prediction of a volume larger than the memory it may use: the peak follows the blocks in flight.

Run (Linux; the cap needs a writable memory cgroup, v1 or v2, e.g. as root in a container)::

    python benchmarks/bounded_memory.py [--gib 2] [--limit-gib 1] [--out docs/bounded_memory]

It writes a (z, 8192, 8192) uint8 zarr volume of ``--gib`` GiB (noise, chunks (1, 256, 256)) and
one an eighth of its depth, a random checkpoint of a small network (channels 4-8-16: the network's
cost is not what is measured here, and 24 GiB of forward passes of the default one would take
this CPU days), and runs ``python -m joenet.predict`` on each in a child process confined to a
memory cgroup of ``--limit-gib`` GiB (no swap on this machine), with the defaults a user gets
(viewer levels included) except ``compile=false`` (the compiler's own memory is a one-off, not a
block's). It reports each run's peak resident memory (psutil, every 20 ms, the child and its
threads) and the cgroup's own peak (page cache included), and checks that the output is complete.
Without a writable cgroup it runs uncapped and says so. Written: ``<out>.md`` (the table).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
from networks import write_random_checkpoint

SLICE = 8192
CGROUP = Path("/sys/fs/cgroup")


class MemoryCap:
    """A memory cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) for one child."""

    def __init__(self, limit: int) -> None:
        self.path: Path | None = None
        self.v2 = (CGROUP / "cgroup.controllers").exists()
        base = CGROUP if self.v2 else CGROUP / "memory"
        path = base / f"joenet_bounded_{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
            (path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
        except OSError as err:
            print(f"no memory cgroup ({err}): running without a cap")
            return
        self.path = path

    def prefix(self) -> list[str]:
        """A shell prefix that moves the child into the cgroup before it starts Python."""
        if self.path is None:
            return []
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh"]

    def peak(self) -> int | None:
        if self.path is None:
            return None
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        file = self.path / name
        return int(file.read_text()) if file.exists() else None

    def oom_kills(self) -> int:
        """OOM kills inside the cgroup (v2 ``memory.events``, v1 ``memory.oom_control``)."""
        if self.path is None:
            return 0
        file = self.path / ("memory.events" if self.v2 else "memory.oom_control")
        if not file.exists():
            return 0
        counts = dict(line.split()[:2] for line in file.read_text().splitlines() if " " in line)
        return int(counts.get("oom_kill", 0))

    def remove(self) -> None:
        if self.path is not None:
            self.path.rmdir()


def write_volume(path: Path, depth: int) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="w")
    group.attrs["voxel_size_nm"] = [8, 8, 8]
    raw = group.create_array(
        "raw", shape=(depth, SLICE, SLICE), chunks=(1, 256, 256), dtype="uint8"
    )
    rng = np.random.default_rng(0)
    for z in range(depth):  # one slice in memory at a time
        raw[z] = rng.integers(0, 256, (SLICE, SLICE), dtype=np.uint8)


def predict_capped(ckpt: Path, volume: Path, output: Path, limit: int) -> dict:
    """``python -m joenet.predict`` in a capped child: seconds, peak RSS and cgroup peak."""
    cap = MemoryCap(limit)
    command = [sys.executable, "-m", "joenet.predict", f"ckpt_path={ckpt}", f"input={volume}"]
    command += [f"output={output}", "compile=false", "progress=false", "hydra.run.dir=."]
    start, peak_rss = time.perf_counter(), 0
    child = subprocess.Popen(
        [*cap.prefix(), *command],
        cwd=output.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    process = psutil.Process(child.pid)
    while child.poll() is None:
        with contextlib.suppress(psutil.Error):  # the child may end between poll and read
            peak_rss = max(peak_rss, process.memory_info().rss)
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    stderr = child.stderr.read() if child.stderr else ""
    cgroup_peak, oom = cap.peak(), cap.oom_kills()
    cap.remove()
    if child.returncode:
        reason = "killed by the memory cap" if child.returncode in (-9, 137) or oom else "failed"
        raise SystemExit(f"prediction of {volume} {reason}:\n{stderr[-3000:]}")
    return {
        "seconds": seconds,
        "peak_rss": peak_rss,
        "cgroup_peak": cgroup_peak,
        "capped": cap.path is not None,
    }


def check_complete(output: Path, depth: int) -> None:
    """Every slice written: the last slice's chunks are there and not all fill value."""
    import zarr

    mito = zarr.open_group(str(output), mode="r")["mito"]
    assert mito.shape == (depth, SLICE, SLICE), mito.shape
    for z in (0, depth - 1):
        if not np.asarray(mito[z, ::512, ::512]).any():
            raise SystemExit(f"{output}/mito slice {z} is empty: the prediction is incomplete")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="size of the large volume")
    parser.add_argument("--limit-gib", type=float, default=1.0, help="memory cap of each run")
    parser.add_argument("--out", type=Path, help="write the table to <out>.md")
    parser.add_argument("--dir", type=Path, help="where to write the volumes (default: a temp dir)")
    args = parser.parse_args()
    gib, limit = 2**30, int(args.limit_gib * 2**30)
    depth = max(8, round(args.gib * gib / SLICE**2))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckpt = Path(tmp) / "small.ckpt"
        write_random_checkpoint(ckpt, {"channels": [4, 8, 16], "norm": "batch"})
        for z in (depth // 8, depth):
            volume, output = Path(tmp) / f"volume_{z}.zarr", Path(tmp) / f"pred_{z}.zarr"
            started = time.perf_counter()
            write_volume(volume, z)
            took = time.perf_counter() - started
            print(f"wrote {volume} ({z * SLICE**2 / gib:.2f} GiB) in {took:.0f} s", flush=True)
            result = predict_capped(ckpt, volume, output, limit)
            check_complete(output, z)
            rows.append((z, result))
            print(f"predicted {z} slices in {result['seconds']:.0f} s", flush=True)
            subprocess.run(["rm", "-rf", str(volume), str(output)], check=True)
    cap = f"{args.limit_gib:g} GiB cgroup cap" if rows[0][1]["capped"] else "no cap (no cgroup)"
    lines = [
        f"`python benchmarks/bounded_memory.py --gib {args.gib:g} --limit-gib {args.limit_gib:g}`"
        f" ({cap}; {os.cpu_count()} CPUs, {psutil.virtual_memory().total / gib:.0f} GiB RAM)",
        "",
        "| volume (z, y, x) uint8 | GiB | vs the cap | s | Mvox/s | peak RSS MiB "
        "| cgroup peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for z, r in rows:
        size = z * SLICE**2
        peak = "" if r["cgroup_peak"] is None else f"{r['cgroup_peak'] / 2**20:.0f}"
        lines.append(
            f"| ({z}, {SLICE}, {SLICE}) | {size / gib:.2f} | {size / limit:.2f}x | "
            f"{r['seconds']:.0f} | {size / r['seconds'] / 1e6:.2f} | "
            f"{r['peak_rss'] / 2**20:.0f} | {peak} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
