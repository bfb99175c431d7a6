"""Prediction throughput and peak memory: joenet's local executor against MONAI's sliding window.

Same model (a default ``UNet2d`` with random weights), same tile (256), same overlap (64 px, MONAI's
fraction 0.25), Gaussian blending, fp32 on the CPU; each tool with its default tiles per forward
pass (joenet: 1 on a CPU, MONAI: ``sw_batch_size=1``) and both with 8. Each side runs in its own
subprocess so that its peak RSS (``ru_maxrss``) is its own:

* joenet: ``predict_volume`` from a zarr volume on disk to an OME-Zarr on disk (reads, blends,
  quantises to uint8 and writes chunk by chunk);
* MONAI: ``sliding_window_inference`` on each whole slice held in memory as a tensor (what a user
  would do), probabilities quantised into an in-memory uint8 volume; reading the volume is not
  timed.

``forward`` is the time spent inside the network's forward pass (a forward hook), so the rest is
the tool's own overhead (tiling, blending, I/O). Run::

    python benchmarks/predict_bench.py                      # (2, 1024, 1024) uint8
    python benchmarks/predict_bench.py --shape 8 1024 1024 --repeat 2  # longer, steadier
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _make_inputs(directory: Path, shape: tuple[int, int, int]) -> tuple[Path, Path]:
    """A random default UNet2d saved as a joenet checkpoint, and a random uint8 zarr volume."""
    import lightning
    import zarr

    from joenet.lit_module import SegmentationLitModule

    torch.manual_seed(0)
    module = SegmentationLitModule()
    ckpt = directory / "random.ckpt"
    data_state = {
        "class_names": ["nuclei", "mito"],
        "patch_size": 256,
        "voxel_size_nm": [8, 8, 8],
        "normalization": {"kind": "dtype_range"},
    }
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "EMDataModule": data_state,  # what EMDataModule.state_dict() saves in a real checkpoint
    }
    torch.save(checkpoint, ckpt)
    volume = directory / "volume.zarr"
    group = zarr.open_group(str(volume), mode="w")
    group.attrs["voxel_size_nm"] = [8, 8, 8]
    rng = np.random.default_rng(0)
    group.create_array(
        "raw", data=rng.integers(0, 256, shape, dtype=np.uint8), chunks=(1, 256, 256)
    )
    return ckpt, volume


class _ForwardTimer:
    """Seconds spent in a module's forward passes, via hooks."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.seconds, self.tiles, self._start = 0.0, 0, 0.0
        net.register_forward_pre_hook(self._pre)
        net.register_forward_hook(self._post)

    def _pre(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.tiles += inputs[0].shape[0]
        self._start = time.perf_counter()

    def _post(self, *args: object) -> None:
        self.seconds += time.perf_counter() - self._start


def _warm_up(net: torch.nn.Module) -> None:
    with torch.inference_mode():
        net(torch.rand(1, 1, 256, 256))


def _run_joenet(ckpt: Path, volume: Path, args: argparse.Namespace, batch_size: int | None) -> dict:
    from joenet.checkpoint import cached_model
    from joenet.predict import predict_volume, work_units

    net = cached_model(ckpt, "cpu").net  # predict_volume reuses this cached model
    _warm_up(net)
    # Prediction runs a copy with its BatchNorms folded (fold_batchnorms=true): time that one.
    fold, timers = work_units.fold_batchnorms, []

    def fold_and_time(module: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
        folded, names = fold(module)
        timers.append(_ForwardTimer(folded))
        return folded, names

    work_units.fold_batchnorms = fold_and_time  # type: ignore[assignment]
    output = Path(tempfile.mkdtemp()) / "pred.zarr"
    start = time.perf_counter()
    predict_volume(
        ckpt,
        volume,
        output,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=batch_size,
        device="cpu",
        progress=False,
    )
    (timer,) = timers
    return {"seconds": time.perf_counter() - start, "forward": timer.seconds, "tiles": timer.tiles}


def _run_monai(ckpt: Path, volume: Path, args: argparse.Namespace, sw_batch_size: int) -> dict:
    import zarr
    from monai.inferers import sliding_window_inference

    from joenet.lit_module import SegmentationLitModule
    from joenet.volume import to_unit_range

    net = SegmentationLitModule.load_from_checkpoint(ckpt, weights_only=True).net.eval()
    _warm_up(net)
    timer = _ForwardTimer(net)
    raw = zarr.open_group(str(volume), mode="r")["raw"][...]  # the whole volume in memory
    out = np.zeros((2, *raw.shape), dtype=np.uint8)
    start = time.perf_counter()
    with torch.inference_mode():
        for z in range(raw.shape[0]):
            image = torch.from_numpy(to_unit_range(raw[z]))[None, None]  # (1, 1, H, W)
            probs = sliding_window_inference(
                image,
                roi_size=(args.tile, args.tile),
                sw_batch_size=sw_batch_size,
                predictor=lambda x: net(x).sigmoid(),
                overlap=args.overlap / args.tile,
                mode="gaussian",
            )
            out[:, z] = (probs[0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return {"seconds": time.perf_counter() - start, "forward": timer.seconds, "tiles": timer.tiles}


def _child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt, volume = Path(args.ckpt), Path(args.volume)
    tool, _, batch = args.side.partition(":batch=")
    if tool == "joenet":
        result = _run_joenet(ckpt, volume, args, None if batch == "default" else int(batch))
    else:
        result = _run_monai(ckpt, volume, args, 1 if batch == "default" else int(batch))
    # ru_maxrss is in KiB on Linux: the whole process, imports and model included.
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(2, 1024, 1024))
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="the non-default batch")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        _child(args)
        return
    batch = args.batch_size
    sides = [
        "joenet:batch=default",
        "monai:batch=default",
        f"joenet:batch={batch}",
        f"monai:batch={batch}",
    ]
    try:
        import monai  # noqa: F401
    except ImportError:
        print("monai is not installed (pip install monai): measuring joenet only")
        sides = sides[::2]
    voxels = int(np.prod(args.shape))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, volume = _make_inputs(Path(tmp), tuple(args.shape))
        results: dict[str, dict] = {}
        for side in [side for _ in range(args.repeat) for side in sides]:  # interleaved
            command = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--ckpt",
                str(ckpt),
                "--volume",
                str(volume),
                "--tile",
                str(args.tile),
                "--overlap",
                str(args.overlap),
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if side not in results or result["seconds"] < results[side]["seconds"]:
                results[side] = result  # the fastest repeat: the least disturbed by other load
    print(
        f"volume {tuple(args.shape)} uint8, tile {args.tile}, overlap {args.overlap}, "
        f"{torch.get_num_threads()} torch threads; default batch: joenet 1 on a CPU, "
        "MONAI sw_batch_size=1"
    )
    print(
        f"1-min load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        f"({os.cpu_count()} CPUs; other processes slow both sides)"
    )
    print(f"{'side':<26}{'s':>8}{'Mvox/s':>9}{'tiles':>7}{'forward %':>11}{'peak RSS MiB':>14}")
    for side, r in results.items():
        print(
            f"{side:<26}{r['seconds']:>8.1f}{voxels / r['seconds'] / 1e6:>9.3f}{r['tiles']:>7}"
            f"{100 * r['forward'] / r['seconds']:>11.1f}{r['peak_rss_mib']:>14.0f}"
        )
    for joenet_side, monai_side in zip(sides[::2], sides[1::2], strict=False):
        ratio = results[monai_side]["seconds"] / results[joenet_side]["seconds"]
        print(f"{joenet_side} throughput / {monai_side}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
