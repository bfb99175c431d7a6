"""Training-style reading from ever larger volumes: patches/s and peak memory stay flat when lazy.

Run: ``python benchmarks/data_bench.py [--sizes 1GiB,100GiB,1TiB] [--patches 400] [--workers 0]``.

Each volume is a ``SyntheticStore`` (``raw`` uint8 + ``labels/mito``, 8192 x 8192 slices,
zstd chunks of (1, 256, 256) like the real data) whose chunks are made up on read, so a 1 TiB
volume costs neither disk nor RAM. ``ZarrVolume`` reads random 364 x 364 windows (what training
reads for 256 px patches with rotation) either lazily (``cache_bytes=0``) or, for volumes that
fit ``--max-memory``, from memory after loading raw + labels once. Each run is a fresh process,
so its peak resident memory (process plus DataLoader workers, sampled every 10 ms with psutil)
is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

from joenet.synthetic.stores import SyntheticStore
from joenet.volume import ZarrVolume

SLICE = 8192  # slice side: 64 MiB per uint8 slice
UNITS = {"MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_size(text: str) -> int:
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise SystemExit(f"--sizes: {text!r} needs a unit ({', '.join(UNITS)}), e.g. 100GiB")


class PeakMemory:
    """Peak of (own RSS + children's RSS), sampled in a thread; children share pages with us
    after fork, so the sum over-counts: an upper bound."""

    def __init__(self, interval: float = 0.01):
        self.peak = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                total = self._process.memory_info().rss + sum(
                    child.memory_info().rss for child in self._process.children(recursive=True)
                )
            except psutil.Error:  # a worker exiting mid-sample
                continue
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def positions(shape: tuple[int, int, int], count: int, window: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack(
        [
            rng.integers(0, shape[0], count),
            rng.integers(0, shape[1] - window, count),
            rng.integers(0, shape[2] - window, count),
        ],
        axis=1,
    )


class _Windows:
    """A map-style dataset of fixed windows, for the DataLoader runs."""

    def __init__(self, volume: ZarrVolume, starts: np.ndarray, window: int):
        self.volume, self.starts, self.window = volume, starts, window

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z, y, x = (int(v) for v in self.starts[index])
        return self.volume.read(z, y, x, self.window)


def run_one(size: int, mode: str, args: argparse.Namespace) -> dict:
    """One (size, mode) measurement in this process."""
    memory = PeakMemory()
    chunks = tuple(int(c) for c in args.chunks.split(","))
    store = SyntheticStore(shape=(max(1, size // SLICE**2), SLICE, SLICE), chunks=chunks)
    start = time.perf_counter()
    volume = ZarrVolume(store, cache_bytes=2**62 if mode == "in-memory" else 0)
    volume.read(0, 0, 0, args.window)  # in memory: loads raw + labels here
    open_s = time.perf_counter() - start
    starts = positions(volume.shape, args.patches, args.window)
    store.gets = 0
    start = time.perf_counter()
    if args.workers:
        import torch.utils.data  # only for worker runs: keeps the plain run free of torch

        loader = torch.utils.data.DataLoader(
            _Windows(volume, starts, args.window), batch_size=16, num_workers=args.workers
        )
        for _ in loader:
            pass
    else:
        for z, y, x in starts:
            volume.read(int(z), int(y), int(x), args.window)
    seconds = time.perf_counter() - start
    return {
        "size_gib": size / 2**30,
        "mode": mode,
        "patches_per_s": args.patches / seconds,
        "open_s": open_s,
        "chunks_per_patch": store.gets / args.patches if not args.workers else None,
        "peak_rss_mib": memory.stop() / 2**20,
        "maxrss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1GiB,100GiB,1TiB", help="raw volume sizes")
    parser.add_argument("--patches", type=int, default=400, help="windows read per run")
    parser.add_argument("--window", type=int, default=364, help="window side in pixels")
    parser.add_argument("--chunks", default="1,256,256", help="chunk shape (z,y,x)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: none)")
    parser.add_argument("--max-memory", default="4GiB", help="in-memory runs up to this raw+labels")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(int(args.child[0]), args.child[1], args)))
        return
    rows = []
    for text in args.sizes.split(","):
        size = parse_size(text)
        modes = ["in-memory", "lazy"] if 2 * size <= parse_size(args.max_memory) else ["lazy"]
        for mode in modes:
            command = [
                sys.executable,
                __file__,
                "--child",
                str(size),
                mode,
                "--patches",
                str(args.patches),
                "--window",
                str(args.window),
                "--chunks",
                args.chunks,
                "--workers",
                str(args.workers),
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append((text, json.loads(out.strip().splitlines()[-1])))
            print(f"done {text} {mode}", file=sys.stderr)
    print(
        f"\n{args.window}x{args.window} windows, chunks {args.chunks}, workers {args.workers}, "
        f"{args.patches} patches per run\n"
    )
    print("| raw volume | mode | open + load s | patches/s | chunks/patch | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for text, row in rows:
        per_patch = "-" if row["chunks_per_patch"] is None else f"{row['chunks_per_patch']:.1f}"
        print(
            f"| {text} | {row['mode']} | {row['open_s']:.1f} | {row['patches_per_s']:.0f} | "
            f"{per_patch} | {row['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
