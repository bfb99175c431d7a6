"""Time to accuracy on Lucchi: joenet's U-Net against MONAI's BasicUNet, same patches, same budget.

Run: ``python benchmarks/time_to_accuracy.py [--minutes 15] [--patch-size 128] [--batch-size 4]``
(needs ``../shared/data/lucchi_train.zarr`` or ``--data``; skips with a reason when it is absent).

Both networks are trained one after the other in this process by the same loop: the same stream
of windows from z [0, 132) (joenet's ``EMDataModule``: a third centred on a mitochondrion, the
same seed), the same on-the-batch augmentation, loss (joenet's BCE + Dice, nuclei masked out as
Lucchi has no nuclei labels), AdamW (lr 1e-3, weight decay 1e-4) with a cosine decay over the
*wall-time* budget, fp32. Only training time counts against the budget: every ``--eval-every``
seconds the clock stops and mito IoU (threshold 0.5, from global counts) is measured on every
8th validation slice of z [132, 165) (5 slices), whole 768 x 1024 slices. At the end both are
measured on all 33 validation slices. Written: a CSV of the curves and a PNG plot (``--out``), and a
Markdown table on stdout with the time each first reaches ``--target`` IoU.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import nn

from joenet.data.datamodule import EMDataModule
from joenet.losses import BCEDiceLoss
from joenet.model import UNet2d

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lucchi_train.zarr"
TRAIN_Z, VAL_Z = (0, 132), (132, 165)


def models(joenet_net: dict, names: list[str]) -> dict[str, Callable[[], nn.Module]]:
    """The networks to train, by name; ``joenet_net``: keyword arguments of joenet's UNet2d."""
    from monai.networks.nets import BasicUNet

    label = "joenet UNet2d" + (f" {json.dumps(joenet_net)}" if joenet_net else "")
    table = {
        "joenet": (label, lambda: UNet2d(**joenet_net)),
        "monai": ("MONAI BasicUNet", lambda: BasicUNet(
            spatial_dims=2, in_channels=1, out_channels=2, features=(32, 32, 64, 128, 256, 32)
        )),
    }  # fmt: skip
    return dict(table[name] for name in names)


def load_validation(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation images in [0, 1] (S, 1, H, W) and mito masks (S, H, W), as the training reads."""
    group = zarr.open_group(str(path), mode="r")
    raw = np.asarray(group["raw"][VAL_Z[0] : VAL_Z[1]], dtype=np.float32) / 255.0
    mito = np.asarray(group["labels/mito"][VAL_Z[0] : VAL_Z[1]]) > 0
    return torch.from_numpy(raw)[:, None], torch.from_numpy(mito)


@torch.inference_mode()
def mito_iou(net: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    """IoU of channel 1 (mito) at probability 0.5 over all the given slices."""
    net.eval()
    intersection = union = 0
    for image, mask in zip(images, masks, strict=True):
        predicted = net(image[None])[0, 1] > 0  # logit > 0 <=> probability > 0.5
        intersection += int((predicted & mask).sum())
        union += int((predicted | mask).sum())
    net.train()
    return intersection / max(union, 1)


def train_for(
    name: str,
    net: nn.Module,
    data: EMDataModule,
    seconds: float,
    eval_every: float,
    val: tuple[torch.Tensor, torch.Tensor],
    lr: float,
) -> list[dict]:
    """Train ``net`` for ``seconds`` of wall time (evaluation excluded); return the curve."""
    criterion = BCEDiceLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    quick = (val[0][::8], val[1][::8])
    curve = [{"model": name, "train_s": 0.0, "patches": 0, "val_iou": mito_iou(net, *quick)}]
    elapsed, patches, next_eval = 0.0, 0, eval_every
    net.train()
    loader = iter(data.train_dataloader())
    start = time.perf_counter()
    while elapsed < seconds:
        batch = next(loader)
        batch = data.augment.apply(batch, batch.pop("augment_params"))
        for group in optimizer.param_groups:  # cosine over the wall-time budget
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * min(elapsed / seconds, 1.0)))
        optimizer.zero_grad(set_to_none=True)
        logits = net(batch["image"])
        loss = criterion(logits, batch["target"], batch["labelled"], batch["valid"])
        loss.backward()
        optimizer.step()
        patches += batch["image"].shape[0]
        elapsed = time.perf_counter() - start
        if elapsed >= next_eval or elapsed >= seconds:
            iou = mito_iou(net, *quick)
            curve.append({"model": name, "train_s": elapsed, "patches": patches, "val_iou": iou})
            print(f"{name}: {elapsed / 60:5.1f} min, {patches} patches, loss {loss.item():.3f}, "
                  f"val mito IoU {iou:.3f}", flush=True)  # fmt: skip
            next_eval += eval_every
            start = time.perf_counter() - elapsed  # the clock does not run while evaluating
    return curve


def first_reaching(curve: list[dict], target: float) -> float | None:
    return next((row["train_s"] for row in curve if row["val_iou"] >= target), None)


def plot(curves: dict[str, list[dict]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([r["train_s"] / 60 for r in curve], [r["val_iou"] for r in curve], "o-", label=name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"IoU {target}")
    ax.set(xlabel="training wall time (min)", ylabel="val mito IoU (every 8th slice)",
           title="Lucchi, same patches and budget", ylim=(0, 1))  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--eval-every", type=float, default=150.0, help="seconds of training")
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target", type=float, default=0.80)
    parser.add_argument("--out", type=Path, default=Path("time_to_accuracy"))
    parser.add_argument("--models", nargs="+", default=["joenet", "monai"],
                        choices=["joenet", "monai"])  # fmt: skip
    parser.add_argument("--skip-final", action="store_true", help="no all-slice evaluation")
    example = '{"norm": "group"}'
    parser.add_argument("--joenet-net", type=json.loads, default={},
                        help=f"UNet2d keyword arguments as JSON, e.g. '{example}'")  # fmt: skip
    args = parser.parse_args()
    if not (args.data / "raw").exists():
        print(f"skipped: {args.data} not found (the Lucchi volume of ../shared/data; see --data)")
        sys.exit(0)
    torch.set_flush_denormal(True)
    val = load_validation(args.data)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.minutes} min each, {args.patch_size} px, "
          f"batch {args.batch_size}, lr {args.lr}")  # fmt: skip
    curves, final = {}, {}
    for name, make in models(args.joenet_net, args.models).items():
        torch.manual_seed(0)
        data = EMDataModule(
            path=str(args.data), train_z=TRAIN_Z, val_z=VAL_Z, patch_size=args.patch_size,
            batch_size=args.batch_size, patches_per_epoch=10**7, num_workers=0, seed=0,
            foreground_fraction=0.33,
        )  # fmt: skip
        data.setup("fit")
        net = make()
        curves[name] = train_for(name, net, data, 60 * args.minutes, args.eval_every, val, args.lr)
        final[name] = mito_iou(net, *val) if not args.skip_final else float("nan")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "train_s", "patches", "val_iou"])
        writer.writeheader()
        for curve in curves.values():
            writer.writerows(curve)
    plot(curves, args.target, args.out.with_suffix(".png"))
    print(f"\n| model | patches in {args.minutes:g} min | best IoU (every 8th slice) "
          f"| final IoU (all 33 slices) | time to IoU {args.target} |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for name, curve in curves.items():
        reached = first_reaching(curve, args.target)
        when = f"{reached / 60:.1f} min" if reached is not None else "not reached"
        print(f"| {name} | {curve[-1]['patches']} | {max(r['val_iou'] for r in curve):.3f} "
              f"| {final[name]:.3f} | {when} |")  # fmt: skip
    print(f"curves: {args.out.with_suffix('.csv')}, plot: {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
