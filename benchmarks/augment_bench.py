"""Throughput of ``BatchAugment`` against a kornia pipeline doing the same job.

Run: ``python benchmarks/augment_bench.py [--batch-size 16] [--patch-size 256] [--repeats 10]``.

Both sides get the same batch of windows (image + 2 target channels + valid, side
``BatchAugment.window``) and return patches: joenet with one composed grid per sample and the
masks resampled with it; kornia with one ``grid_sample`` per geometric transform followed by a
centre crop. kornia's elastic transform runs with its defaults (63 x 63 Gaussian kernel,
sigma 32): its cost does not depend on the displacement scale. The peer is skipped, with a message,
when kornia does not import (``pip install kornia``: it needs torch only).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch

from joenet.data.augment import BatchAugment

CONFIGS = {
    "geometry+intensity": {},
    "+elastic+noise": {"elastic": True, "noise": True},
}


def make_batch(num: int, side: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(num, 1, side, side, generator=gen),
        "target": (torch.rand(num, 2, side, side, generator=gen) > 0.5).float(),
        "valid": torch.ones(num, 1, side, side),
        "seed": torch.arange(num, dtype=torch.int64),
    }
    return {k: v.to(device) for k, v in batch.items()}


def throughput(augment: Callable[[dict], object], batch: dict, repeats: int) -> float:
    """Patches per second of ``augment(batch)``: the fastest of ``repeats`` timed calls.

    The fastest call, not the mean, because other processes may share the CPU: it is the
    estimate least disturbed by them.
    """
    device = batch["image"].device
    augment(batch)  # warm-up: allocator, kernels, kornia's lazy set-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        augment(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return len(batch["image"]) / min(times)


def kornia_pipeline(patch_size: int, elastic: bool, noise: bool, std: float) -> Callable | None:
    try:
        import kornia.augmentation as K
    except ImportError as error:
        print(f"kornia peer skipped: `import kornia` failed ({error}); pip install kornia")
        return None
    transforms = [K.RandomRotation(360.0, p=1.0), K.RandomHorizontalFlip(), K.RandomVerticalFlip()]
    if elastic:
        transforms.append(K.RandomElasticTransform(p=1.0))
    transforms += [K.CenterCrop(patch_size), K.RandomBrightness((0.9, 1.1))]
    transforms.append(K.RandomContrast((0.8, 1.2)))
    if noise:
        transforms.append(K.RandomGaussianNoise(std=std, p=1.0))
    # kornia 0.9's elastic transform calls affine_grid/grid_sample without align_corners.
    warnings.filterwarnings("ignore", "Default grid_sample and affine_grid", UserWarning)
    sequence = K.AugmentationSequential(*transforms, data_keys=["input", "mask"])

    def run(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        masks = torch.cat([batch["target"], batch["valid"]], dim=1)
        return sequence(batch["image"], masks)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    header = f"{'config':<20} {'device':<6} {'window':>6} {'joenet/s':>9} {'kornia/s':>9} ratio"
    print(header)
    print("-" * len(header))
    for name, kwargs in CONFIGS.items():
        aug = BatchAugment(args.patch_size, **kwargs)
        peer = kornia_pipeline(args.patch_size, aug.elastic, aug.noise, aug.noise_std)
        for device in devices:
            batch = make_batch(args.batch_size, aug.window, device)
            ours = throughput(aug, batch, args.repeats)
            theirs, ratio = float("nan"), float("nan")
            if peer is not None:
                theirs = throughput(peer, batch, args.repeats)
                ratio = ours / theirs
            row = f"{name:<20} {device.type:<6} {aug.window:>6} {ours:>9.1f} {theirs:>9.1f}"
            print(f"{row} {ratio:>5.2f}")
    print(f"(patches/s, fastest of {args.repeats} calls; ratio = joenet / kornia)")


if __name__ == "__main__":
    main()
