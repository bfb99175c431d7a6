"""Prediction throughput and peak memory: joenet's local executor against MONAI's sliding window.

Same model (the default config's network with random weights; ``--net seed``: the seed's), same
tile (256), same overlap (64 px, MONAI's fraction 0.25), Gaussian blending, same precision
(``--precision``, default joenet's ``auto``: bf16 autocast for both on a CUDA GPU and on a CPU with
AMX, fp32 on other CPUs; joenet runs a compiled bf16 network as bf16 weights); each tool with its
default tiles per forward pass (joenet: 1 on a CPU, MONAI: ``sw_batch_size=1``), joenet also as a
later run of the same model predicts (``compile=auto`` loading the network an earlier run compiled
ahead of time into the on-disk cache, ``predict/compiled_cache.py``; that one-time compile shown
apart), and both with 8. Every run starts with an empty cache of its own. Each side runs in its own
subprocess so that its peak RSS (``ru_maxrss``) is its own:

* joenet: ``predict_volume`` from a zarr volume on disk to an OME-Zarr on disk (reads, blends,
  quantises to uint8 and writes chunk by chunk);
* MONAI: ``sliding_window_inference`` on each whole slice held in memory as a tensor (what a user
  would do), probabilities quantised into an in-memory uint8 volume; reading the volume is not
  timed.

``forward`` is the time spent inside the network's forward pass (a forward hook), so the rest is
the tool's own overhead (tiling, blending, I/O). Run::

    python benchmarks/predict_bench.py                      # (4, 1024, 1024) uint8
    python benchmarks/predict_bench.py --shape 8 1024 1024 --repeat 2  # longer, steadier
    python benchmarks/predict_bench.py --precision 32,bf16  # each side in both, and their ratio
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _make_inputs(directory: Path, shape: tuple[int, int, int], net: str) -> tuple[Path, Path]:
    """A random ``net`` network saved as a joenet checkpoint, and a random uint8 zarr volume."""
    import zarr
    from networks import net_kwargs, write_random_checkpoint

    ckpt = directory / "random.ckpt"
    write_random_checkpoint(ckpt, net_kwargs(net))
    volume = directory / "volume.zarr"
    group = zarr.open_group(str(volume), mode="w")
    group.attrs["voxel_size_nm"] = [8, 8, 8]
    rng = np.random.default_rng(0)
    group.create_array(
        "raw", data=rng.integers(0, 256, shape, dtype=np.uint8), chunks=(1, 256, 256)
    )
    return ckpt, volume


class _CallTimer:
    """A network wrapped so that the seconds spent in its forward passes add up."""

    def __init__(self, net: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.net, self.seconds, self.tiles = net, 0.0, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.net(x)
        if out.is_cuda:  # kernels run asynchronously: wait for them to count their time
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.tiles += x.shape[0]
        return out


def _warm_up(net: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """One forward pass under the timed run's autocast: CUDA's context and its bf16 kernels are
    loaded before either side's clock starts."""
    device = next(net.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    with torch.inference_mode(), autocast:
        net(torch.rand(1, 1, 256, 256, device=device))


class _CompileFailures(logging.Handler):
    """Counts fast_path's "torch.compile failed" warnings: a compiled side that fell back to
    eager must not be reported as compiled."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "torch.compile failed" in record.getMessage()


def _run_joenet(
    ckpt: Path, volume: Path, args: argparse.Namespace, batch_size: int | None, compile: str
) -> dict:
    from joenet.checkpoint import cached_model
    from joenet.predict import predict_volume, worker
    from joenet.predict.tiling import autocast_dtype

    dtype = autocast_dtype(args.precision, torch.device(args.device))
    _warm_up(cached_model(ckpt, args.device).net, dtype)  # predict_volume reuses this model
    failures = _CompileFailures()
    logging.getLogger("joenet.predict.fast_path").addHandler(failures)
    # Time the network prediction runs (folded, channels_last, maybe compiled), not the raw one.
    make, timers = worker.inference_form, []

    def timed(*a: object, **k: object) -> _CallTimer:
        timers.append(_CallTimer(make(*a, **k)))  # type: ignore[arg-type]
        return timers[-1]

    worker.inference_form = timed  # type: ignore[assignment]
    options = {
        "tile": args.tile,
        "overlap": args.overlap,
        "batch_size": batch_size,
        "device": args.device,
        "progress": False,
        "compile": compile,
        "precision": args.precision,
    }
    compile_s = 0.0
    if compile == "cached":  # an earlier process compiles into the cache; this one loads it
        start = time.perf_counter()
        command = [sys.executable, "-m", "joenet.predict", f"ckpt_path={ckpt}"]
        command += [f"input={volume}", f"output={Path(tempfile.mkdtemp()) / 'warm.zarr'}"]
        command += ["z_range=[0,1]", "compile=true", "progress=false", "hydra.run.dir=."]
        command += [f"{key}={options[key]}" for key in ("tile", "overlap", "device", "precision")]
        if batch_size:
            command.append(f"batch_size={batch_size}")
        subprocess.run(command, check=True, capture_output=True, cwd=tempfile.mkdtemp())
        compile_s = time.perf_counter() - start
        options["compile"] = "auto"  # which picks the package up from CPU_CACHED_MIN_TILES (100)
    if compile == "true":  # compile in a one-slice run first; the network is kept for the next
        start = time.perf_counter()
        predict_volume(
            ckpt,
            volume,
            Path(tempfile.mkdtemp()) / "warm.zarr",
            z_range=[0, 1],
            **options | {"compile": "true"},
        )
        compile_s = time.perf_counter() - start
        timers[-1].seconds, timers[-1].tiles = 0.0, 0
    output = Path(tempfile.mkdtemp()) / "pred.zarr"
    start = time.perf_counter()
    predict_volume(ckpt, volume, output, **options)
    seconds = time.perf_counter() - start
    timer = timers[-1]
    if compile_s:  # the warm-up run less the steady time of its one slice (and, for a cached
        # side, its process start: a conservative cold-compile figure either way)
        compile_s -= seconds / zarr_depth(volume)
    return {
        "seconds": seconds,
        "forward": timer.seconds,
        "tiles": timer.tiles,
        "compile": compile_s,
        "compile_failed": failures.count > 0,  # compiling raised: the side ran eager
    }


def zarr_depth(volume: Path) -> int:
    import zarr

    return zarr.open_group(str(volume), mode="r")["raw"].shape[0]


def _run_monai(ckpt: Path, volume: Path, args: argparse.Namespace, sw_batch_size: int) -> dict:
    import zarr
    from monai.inferers import sliding_window_inference

    from joenet.lit_module import SegmentationLitModule
    from joenet.predict.tiling import autocast_dtype
    from joenet.volume import to_unit_range

    device = torch.device(args.device)
    net = SegmentationLitModule.load_from_checkpoint(ckpt, weights_only=True).net.eval().to(device)
    dtype = autocast_dtype(args.precision, device)  # what joenet's side runs under
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    _warm_up(net, dtype)
    timer = _CallTimer(net)
    raw = zarr.open_group(str(volume), mode="r")["raw"][...]  # the whole volume in memory
    out = np.zeros((2, *raw.shape), dtype=np.uint8)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for z in range(raw.shape[0]):
            image = torch.from_numpy(to_unit_range(raw[z]))[None, None].to(device)
            probs = sliding_window_inference(
                image,
                roi_size=(args.tile, args.tile),
                sw_batch_size=sw_batch_size,
                predictor=lambda x: timer(x).float().sigmoid(),
                overlap=args.overlap / args.tile,
                mode="gaussian",
            )
            out[:, z] = (probs[0] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "forward": timer.seconds, "tiles": timer.tiles, "compile": 0.0}


def _child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt, volume = Path(args.ckpt), Path(args.volume)
    side, _, _ = args.side.partition("@")  # its precision came as --precision
    tool, _, batch = side.partition(":batch=")
    tool, _, compile = tool.partition("+compile=")
    if tool == "joenet":
        batch_size = None if batch == "default" else int(batch)
        result = _run_joenet(ckpt, volume, args, batch_size, compile or "auto")
    else:
        result = _run_monai(ckpt, volume, args, 1 if batch == "default" else int(batch))
    # ru_maxrss is in KiB on Linux: the whole process, imports and model included.
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _run_sides(args: argparse.Namespace, sides: list[str]) -> dict[str, dict]:
    """Each side in its own subprocess, ``--repeat`` times interleaved; the fastest run counts."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, volume = _make_inputs(Path(tmp), tuple(args.shape), args.net)
        passed = ["--tile", str(args.tile), "--overlap", str(args.overlap)]
        passed += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        passed += ["--device", args.device, "--ckpt", str(ckpt), "--volume", str(volume)]
        for side in [side for _ in range(args.repeat) for side in sides]:
            precision = side.partition("@")[2] or args.precision
            command = [sys.executable, __file__, "--side", side, *passed, "--precision", precision]
            # Each run with an empty compiled cache: a side compiles what it uses, in its time.
            env = os.environ | {"JOENET_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode:
                raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if side not in results or result["seconds"] < results[side]["seconds"]:
                results[side] = result  # the fastest repeat: the least disturbed by other load
    return results


def _report(
    args: argparse.Namespace, results: dict[str, dict], pairs: list[tuple[str, str]], load: float
) -> None:
    from joenet.predict.tiling import autocast_dtype, precision_name

    voxels = int(np.prod(args.shape))
    resolved = [
        f"{p}: {precision_name(autocast_dtype(p, torch.device(args.device)))}"
        for p in args.precision.split(",")
    ]
    print(
        f"--net {args.net}: volume {tuple(args.shape)} uint8, tile {args.tile}, "
        f"--precision {args.precision} (both sides; {', '.join(resolved)}), "
        f"overlap {args.overlap}, "
        f"{torch.get_num_threads()} torch threads; default batch: joenet 1 on a CPU, "
        "MONAI sw_batch_size=1"
    )
    print(
        f"1-min load average: {load:.2f} before, {os.getloadavg()[0]:.2f} after "
        f"({os.cpu_count()} CPUs; other processes slow both sides)"
    )
    header = f"{'side':<44}{'s':>8}{'Mvox/s':>9}{'tiles':>7}{'forward %':>11}"
    print(f"{header}{'peak RSS MiB':>14}{'compile s':>11}")
    for side, r in results.items():
        print(
            f"{side:<44}{r['seconds']:>8.1f}{voxels / r['seconds'] / 1e6:>9.3f}{r['tiles']:>7}"
            f"{100 * r['forward'] / r['seconds']:>11.1f}{r['peak_rss_mib']:>14.0f}"
            f"{r['compile']:>11.1f}"
            + ("  (compiling failed: ran eager)" if r.get("compile_failed") else "")
        )
    for joenet_side, monai_side in pairs:
        ours, peer = results[joenet_side], results[monai_side]
        line = f"{joenet_side} throughput / {monai_side}: {peer['seconds'] / ours['seconds']:.2f}x"
        if ours["compile"]:
            with_compile = peer["seconds"] / (ours["seconds"] + ours["compile"])
            line += f" ({with_compile:.2f}x counting the compile once)"
        print(line)
    ratios = {
        f"{ours} / {peer}": results[peer]["seconds"] / results[ours]["seconds"]
        for ours, peer in pairs
    }
    precisions = args.precision.split(",")
    for fast in precisions[1:]:  # each later precision against the first, side by side
        for side in [s.partition("@")[0] for s in results if s.endswith(f"@{precisions[0]}")]:
            name = f"{side}@{fast} / {side}@{precisions[0]}"
            ratios[name] = (
                results[f"{side}@{precisions[0]}"]["seconds"] / results[f"{side}@{fast}"]["seconds"]
            )
            print(f"{name.replace(' / ', ' throughput / ')}: {ratios[name]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"sides": results, "ratios": ratios}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(4, 1024, 1024))
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="the non-default batch")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both tools)")
    parser.add_argument(
        "--pairs",
        default="default,cached,batch",
        help="comparisons to run, of default, compile, cached, batch",
    )
    parser.add_argument("--net", choices=("default", "seed"), default="default")
    parser.add_argument(
        "--precision",
        default="auto",
        help="both sides', of auto, 32, bf16; a list (32,bf16) runs every side in each, in turns",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        _child(args)
        return
    batch = args.batch_size
    # (joenet side, its MONAI peer): a first run (compile=auto with an empty cache: eager below
    # 1,000 tiles); compiled (the compile timed apart, in a one-slice run first); a later run
    # of the same model (compile=auto loading what an earlier run compiled into the on-disk
    # cache; that one-time compile shown apart); and both tools at a larger batch.
    pairs = {
        "default": ("joenet:batch=default", "monai:batch=default"),
        "compile": ("joenet+compile=true:batch=default", "monai:batch=default"),
        "cached": ("joenet+compile=cached:batch=default", "monai:batch=default"),
        "batch": (f"joenet:batch={batch}", f"monai:batch={batch}"),
    }
    pairs = [pairs[name] for name in args.pairs.split(",")]
    precisions = args.precision.split(",")
    if not set(precisions) <= {"auto", "32", "bf16"}:
        parser.error(f"--precision {args.precision}: expected auto, 32 or bf16 (or a list)")
    if len(precisions) > 1:  # the same comparisons in each precision, named side@precision
        pairs = [(f"{a}@{p}", f"{b}@{p}") for p in precisions for a, b in pairs]
    sides = list(dict.fromkeys(side for pair in pairs for side in pair))
    try:
        import monai  # noqa: F401
    except ImportError:
        print("monai is not installed (pip install monai): measuring joenet only")
        sides, pairs = [side for side in sides if side.startswith("joenet")], []
    load_before = os.getloadavg()[0]
    _report(args, _run_sides(args, sides), pairs, load_before)


if __name__ == "__main__":
    main()
