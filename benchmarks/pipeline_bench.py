"""Does the data pipeline keep up? Read + augment patches/s against the model's training rate.

Run: ``python benchmarks/pipeline_bench.py [--data PATH] [--lazy] [--batch-size 16] [--steps 3]``.

The data are joenet's training path itself: ``EMDataModule`` windows (a third centred on an
object) from the built-in synthetic volume (or ``--data``, e.g. the Lucchi zarr; ``--lazy``
reads chunks from disk per window instead of holding the volume in memory), collated with their
augmentation parameters, then ``BatchAugment`` on the device. Measured in one run:

* read: DataLoader batches in the main process (``num_workers=0``), i.e. one core's rate;
* augment: ``BatchAugment.apply`` on the batches, default settings and with elastic + noise;
* model: joenet's training step (fp32 on a CPU, bf16 autocast on a GPU) on a fixed batch;
* end to end: the same training steps fed by the DataLoader with one worker and on-device
  augmentation, against the fixed-batch steps: the share of time the model waited for data.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from networks import net_kwargs
from train_step_bench import seconds_per_step, sync

from joenet.data.datamodule import EMDataModule
from joenet.losses import BCEDiceLoss
from joenet.model import UNet2d
from joenet.synthetic import ensure_synthetic_volume


def make_data(args: argparse.Namespace, workers: int, augment: dict) -> EMDataModule:
    data = EMDataModule(
        path=str(args.data),
        train_z=args.train_z,
        val_z=args.val_z,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        patches_per_epoch=10**6,
        num_workers=workers,
        seed=0,
        augment=augment,
        foreground_fraction=0.33,
        cache_bytes=0 if args.lazy else 2**30,
    )
    data.setup("fit")
    return data


def batches_per_s(data: EMDataModule, count: int, device: torch.device) -> tuple[float, float]:
    """(read + collate, augment) batches/s, each timed on its own."""
    loader = iter(data.train_dataloader())
    batches = [next(loader)]  # warm-up: workers start, volume opens
    start = time.perf_counter()
    batches = [next(loader) for _ in range(count)]
    read_s = time.perf_counter() - start
    on_device = [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        for b in batches
    ]
    params = [b.pop("augment_params") for b in on_device]
    data.augment.apply(on_device[0], params[0])
    start = time.perf_counter()
    for batch, p in zip(on_device, params, strict=True):
        data.augment.apply(batch, p)
    sync(device)
    return count / read_s, count / (time.perf_counter() - start)


def training_s(
    data: EMDataModule | None, steps: int, args: argparse.Namespace, device: torch.device
) -> float:
    """Seconds per training step, fed by ``data`` (None: one fixed batch, no data work)."""
    torch.manual_seed(0)
    net = UNet2d(**net_kwargs("default")).to(device)  # the network the default config trains
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    criterion = BCEDiceLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    size = (args.batch_size, 1, args.patch_size, args.patch_size)
    targets = (torch.rand(size[0], 2, *size[2:], device=device) > 0.9).float()
    fixed = {"image": torch.rand(size, device=device), "target": targets}
    loader = iter(data.train_dataloader()) if data is not None else None

    def step() -> None:
        batch = fixed
        if loader is not None:
            batch = next(loader)
            params = batch.pop("augment_params")
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch = data.augment.apply(batch, params)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = criterion(net(batch["image"]), batch["target"])
        loss.backward()
        optimizer.step()

    return seconds_per_step(step, steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="a zarr volume (default: synthetic)")
    parser.add_argument("--train-z", type=int, nargs=2, default=None)
    parser.add_argument("--val-z", type=int, nargs=2, default=None)
    parser.add_argument("--lazy", action="store_true", help="read chunks per window from disk")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=10, help="batches read and augmented")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per setting")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data = Path(tmp) / "synthetic_em.zarr"
            ensure_synthetic_volume(args.data, shape=(48, 512, 512), seed=0)
            args.train_z, args.val_z = args.train_z or (0, 40), args.val_z or (40, 48)
        if args.train_z is None:  # e.g. Lucchi: 165 slices
            raise SystemExit("--train-z and --val-z are needed with --data")
        print(
            f"{device} ({platform.processor() or platform.machine()}), torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads; {args.data.name}"
            f"{' (lazy)' if args.lazy else ' (in memory)'}, batch {args.batch_size}, "
            f"{args.patch_size} px"
        )
        augments = {
            "default (rotate, flip, brightness, contrast)": {},
            "+ elastic + noise": {"elastic": True, "noise": True},
        }
        rates = {
            name: batches_per_s(make_data(args, 0, a), args.batches, device)
            for name, a in augments.items()
        }
        model_s = training_s(None, args.steps, args, device)
        fed_s = training_s(make_data(args, 1, {}), args.steps, args, device)
    model_rate = args.batch_size / model_s
    print(f"\nmodel training step: {model_rate:.2f} patches/s\n")
    print(
        "| augmentation | read patches/s (1 core) | augment patches/s | read + augment "
        "patches/s | x model's rate |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, (read, augment) in rates.items():
        read, augment = read * args.batch_size, augment * args.batch_size
        both = 1 / (1 / read + 1 / augment)
        print(f"| {name} | {read:.0f} | {augment:.0f} | {both:.0f} | {both / model_rate:.0f}x |")
    print(
        f"\nend to end (1 worker, default augmentation): {args.batch_size / fed_s:.2f} "
        f"patches/s against {model_rate:.2f} on a fixed batch: "
        f"{100 * max(fed_s - model_s, 0) / fed_s:.1f} % of the time spent on data"
    )


if __name__ == "__main__":
    main()
