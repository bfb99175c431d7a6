"""One command for a new machine (``make bench-gpu``): is joenet fast on it, and what waits?

Runs, on CUDA when there is a GPU (else on the CPU, where ``--tiny`` makes it a smoke test),
cheapest first, so that a run stopped at a time limit keeps the parts it finished:

1. the data pipeline against the model: training steps fed by ``EMDataModule`` with 0, 2, 4 and
   8 DataLoader workers, against steps on one fixed batch, and the GPU's utilisation
   (``torch.cuda.utilization``, sampled every 0.1 s) while fed: does the GPU wait for data?
2. tiled prediction against MONAI's ``sliding_window_inference`` on the same device
   (``predict_bench.py``, each side in its own process);
3. the training step, joenet's default network, bf16 autocast on a GPU (fp32 on a CPU), at two
   batch sizes, eager / channels_last / ``torch.compile`` (``train_step_bench.measure``), as a
   fraction of the same run's matmul peak in that precision;
4. ``python -m joenet.train`` in one process (Lightning's training path on the device) and
   two-process DDP (``trainer=ddp``) against it when there are two GPUs (or with
   ``--ddp-on-cpu``: two gloo processes, to check the path).

It prints one table (and writes it as ``<out>.md`` and ``<out>.csv`` with ``--out``)::

    python benchmarks/gpu_check.py --out docs/gpu_check          # on the GPU machine
    python benchmarks/gpu_check.py --tiny --ddp-on-cpu           # a minute on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from check_table import Result, failure_row, run_parts, table_lines
from networks import net_kwargs
from pipeline_bench import make_data, training_s
from train_step_bench import Row, matmul_peak, measure

from joenet.model import UNet2d
from joenet.synthetic import ensure_synthetic_volume

ROOT = Path(__file__).resolve().parents[1]


def training_steps(args: argparse.Namespace, device: torch.device) -> list[Result]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = device.type == "cuda"
    # An 8192^2 bf16 product takes ~1.4 ms on an H200: 50 of them after warm-ups, not 20 of 4096^2.
    sizes = {"size": 8192, "repeats": 50, "warmups": 3} if gpu else {"size": 1024, "repeats": 3}
    peak = matmul_peak(device, dtype=dtype, **sizes)
    results = [("train step", f"matmul peak ({dtype})", f"{peak:.0f} GFLOP/s", "")]
    default = partial(UNet2d, **net_kwargs("default"))  # what python -m joenet.train builds
    variants = [
        Row("eager", default),
        Row("channels_last", default, channels_last=True),
        Row("torch.compile", default, compile=True),
        Row("channels_last + compile", default, channels_last=True, compile=True),
    ]
    for batch in args.batch_sizes:
        for row in variants:
            if row.compile and args.no_compile:
                continue
            setting = f"batch {batch}, {row.name}"
            try:
                r = measure(row, batch, args.patch_size, args.steps, device)
            except Exception as err:  # one failing row (a compile, memory) keeps the others
                results.append(failure_row("train step", err, setting))
                continue
            results.append(
                (
                    "train step",
                    setting,
                    f"{r['train_patches_s']:.1f} patches/s",
                    f"{100 * r['train_gflop_s'] / peak:.0f} % of peak; inference "
                    f"{r['infer_patches_s']:.1f} patches/s; first step {r['first_step_s']:.1f} s",
                )
            )
    return results


class UtilisationSampler:
    """The GPU's utilisation (percent, from NVML) sampled in a thread while a block runs."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples = device, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(torch.cuda.utilization(self.device))

    def __enter__(self) -> UtilisationSampler:
        if self.device.type == "cuda":
            try:
                torch.cuda.utilization(self.device)  # needs pynvml (nvidia-ml-py)
                self._thread.start()
            except Exception as err:  # no NVML: the wait share below still says it
                print(f"GPU utilisation not sampled ({type(err).__name__}: {err})")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self) -> str:
        return f"{sum(self.samples) / len(self.samples):.0f} %" if self.samples else "n/a"


def data_pipeline(args: argparse.Namespace, device: torch.device, data_dir: Path) -> list[Result]:
    data_args = argparse.Namespace(
        data=data_dir / "synthetic_em.zarr",
        train_z=(0, args.depth - 8),
        val_z=(args.depth - 8, args.depth),
        patch_size=args.patch_size,
        batch_size=args.batch_sizes[0],
        lazy=False,
    )
    ensure_synthetic_volume(data_args.data, shape=(args.depth, args.side, args.side), seed=0)
    model_s = training_s(None, args.steps, data_args, device)
    rate = data_args.batch_size / model_s
    results = [("data pipeline", "fixed batch (no data work)", f"{rate:.1f} patches/s", "")]
    for workers in args.workers:
        data = make_data(data_args, workers, {})
        # The loader holds 2 batches per worker made ahead: time enough steps past that stock
        # for a pipeline slower than the model to show as waiting.
        steps = max(args.steps, 4 * 2 * workers)
        with UtilisationSampler(device) as sampler:
            fed_s = training_s(data, steps, data_args, device)
        waiting = 100 * max(fed_s - model_s, 0) / fed_s
        results.append(
            (
                "data pipeline",
                f"{workers} workers",
                f"{data_args.batch_size / fed_s:.1f} patches/s",
                f"model waits {waiting:.0f} % of the time; GPU utilisation {sampler.mean()}",
            )
        )
    return results


def prediction(args: argparse.Namespace, device: torch.device) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "predict.json"
        command = [
            sys.executable,
            str(ROOT / "benchmarks" / "predict_bench.py"),
            "--shape",
            *map(str, args.predict_shape),
            "--tile",
            str(args.tile),
            "--overlap",
            str(args.tile // 4),
            "--device",
            device.type,
            "--json",
            str(out),
            "--batch-size",  # the non-default batch: joenet's default is 8 tiles on a GPU already
            "32" if device.type == "cuda" else "8",
            "--pairs",
            "default"
            if args.tiny
            else "default,batch"
            if args.no_compile
            else "default,compile,batch",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"predict_bench failed:\n{done.stderr[-3000:]}")
        report = json.loads(out.read_text())
    voxels = int(torch.tensor(args.predict_shape).prod())
    results = []
    for side, r in report["sides"].items():
        note = f"forward {100 * r['forward'] / r['seconds']:.0f} % of the time"
        if r.get("compile_failed"):
            note += ", COMPILING FAILED: ran eager (see predict_bench's log)"
        elif r["compile"]:
            note += f", compiled in {r['compile']:.1f} s (not counted)"
        results.append(("prediction", side, f"{voxels / r['seconds'] / 1e6:.3f} Mvox/s", note))
    for pair, ratio in report["ratios"].items():
        results.append(("prediction", pair, f"{ratio:.2f}x", "throughput ratio"))
    return results


def ddp(args: argparse.Namespace, device: torch.device, data_dir: Path) -> list[Result]:
    """``python -m joenet.train`` on one process and with ``trainer=ddp`` on two; with one GPU
    only the first (Lightning's own training path on the GPU: bf16, layout, augmentation)."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus == 0 and not args.ddp_on_cpu:
        return [("DDP", "2 processes", "skipped", "no GPU; --ddp-on-cpu checks the path")]
    accelerator = "gpu" if gpus >= 1 and not args.ddp_on_cpu else "cpu"
    counts = (1,) if accelerator == "gpu" and gpus < 2 else (1, 2)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for devices in counts:
            run = Path(tmp) / f"ddp{devices}"
            overrides = [
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={run}",
                f"hydra.run.dir={run}/hydra",
                f"data.synthetic.shape=[{args.depth},{args.side},{args.side}]",
                f"data.train_z=[0,{args.depth - 8}]",
                f"data.val_z=[{args.depth - 8},{args.depth}]",
                f"data.patch_size={args.patch_size}",
                f"data.batch_size={args.batch_sizes[0]}",
                f"data.patches_per_epoch={args.batch_sizes[0] * args.steps * 4}",
                f"data.num_workers={0 if args.tiny else 2}",  # each worker imports torch
                f"trainer.accelerator={accelerator}",
                f"trainer.devices={devices}",
                f"trainer.max_epochs={1 if args.tiny else 2}",
                "+trainer.enable_progress_bar=false",
            ]
            if devices == 2:
                overrides.insert(0, "trainer=ddp")
            if accelerator == "cpu":
                overrides += ["trainer.precision=32", "trainer.accumulate_grad_batches=1"]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            done = subprocess.run(
                [sys.executable, "-m", "joenet.train", *overrides],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if done.returncode:
                raise RuntimeError(f"DDP run on {devices} failed:\n{done.stderr[-3000:]}")
            summary = json.loads((run / "summary.json").read_text())
            rates[devices] = summary["patches_per_second"]
    results = [
        ("DDP", f"{n} {accelerator} process(es)", f"{rates[n]:.1f} patches/s", "wall, val included")
        for n in counts
    ]
    if 2 not in rates:
        return [*results, ("DDP", "2 processes", "skipped", f"{gpus} GPU")]
    return [*results, ("DDP", "2 / 1 processes", f"{rates[2] / rates[1]:.2f}x", "")]


# Cheapest first: on a lent machine a run stopped at its time limit keeps the parts done.
PARTS = ("data pipeline", "prediction", "train step", "DDP")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--ddp-on-cpu", action="store_true", help="run the DDP part on 2 CPUs")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile rows")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated, run in this order (default: {','.join(PARTS)})",
    )
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.csv (after each part)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.parts.split(",")]
    if unknown := [name for name in chosen if name not in PARTS]:
        parser.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    if args.tiny:
        args.batch_sizes, args.patch_size, args.steps, args.workers = (2, 4), 64, 1, (0, 1)
        args.depth, args.side, args.tile, args.predict_shape = 16, 128, 64, (1, 128, 128)
    else:
        args.batch_sizes, args.patch_size, args.steps, args.workers = (
            (16, 32),
            256,
            10,
            (0, 2, 4, 8),
        )
        args.depth, args.side, args.tile, args.predict_shape = 48, 512, 256, (16, 2048, 2048)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    header = f"{device} ({name or platform.machine()}), torch {torch.__version__}"
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as data_dir:
        every: dict[str, Callable[[], list[Result]]] = {
            "train step": lambda: training_steps(args, device),
            "data pipeline": lambda: data_pipeline(args, device, Path(data_dir)),
            "prediction": lambda: prediction(args, device),
            "DDP": lambda: ddp(args, device, Path(data_dir)),
        }
        results, failed = run_parts({name: every[name] for name in chosen}, header, args.out)
    print("\n".join(table_lines(results, header)[1:]))
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their errors are rows of the table)")


if __name__ == "__main__":
    main()
