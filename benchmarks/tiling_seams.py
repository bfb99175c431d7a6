"""Tiled against whole-slice prediction of a trained checkpoint on Lucchi's validation slices.

Run: ``python benchmarks/tiling_seams.py <run>/checkpoints/last.ckpt [--data D] [--out F]``
(needs ``../shared/data/lucchi_train.zarr`` or ``--data``; skips with a reason when it is absent).

With BatchNorm in eval mode a tile on the network's grid computes what the whole slice computes
(``joenet/predict/tiling.py``). A network that normalises per sample (InstanceNorm, GroupNorm)
normalises each *tile* by its own statistics, so its tiled prediction depends on the tile size.
This measures by how much: mito IoU on all 33 validation slices (z 132-165, threshold 0.5) of
whole-slice prediction and of joenet's tiled predictor (Gaussian blending, overlap 64) at several
tile sizes, and how far the tiled probabilities are from the whole-slice ones. For per-sample
norms it adds ``frozen statistics`` rows: each InstanceNorm given the mean of the statistics it
saw on 256 px tiles of training slices (z 0-130, every 13th), so that it normalises every input
alike, as BatchNorm in eval mode does, and tiles compute what the whole slice computes.
Written by this one run: ``<out>.csv`` and ``<out>.md`` (the table, also on stdout).
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curve_diagnosis import eval_mode, mask_iou, mito_logits, tiled_against_whole
from time_to_accuracy import DEFAULT_DATA, TRAIN_Z, load_validation

TILES = (256, 384, 512)


def instance_norms(net: nn.Module) -> list[nn.InstanceNorm2d]:
    return [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]


@torch.inference_mode()
def freeze_instance_statistics(net: nn.Module, images: torch.Tensor, tile: int = 256) -> nn.Module:
    """A copy of ``net`` whose InstanceNorms use the mean statistics of ``images``' tiles."""
    frozen = copy.deepcopy(net).eval()
    for norm in instance_norms(frozen):
        norm.track_running_stats = True
        norm.momentum = None  # a cumulative average over every forward call
        norm.register_buffer("running_mean", torch.zeros(norm.num_features))
        norm.register_buffer("running_var", torch.ones(norm.num_features))
        norm.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        norm.train()  # normalise by the input's statistics and record them
    _, _, height, width = images.shape
    for image in images:
        for y in range(0, height - tile + 1, tile):
            for x in range(0, width - tile + 1, tile):
                frozen(image[None, :, y : y + tile, x : x + tile])
    return frozen.eval()


def measure(net: nn.Module, images: torch.Tensor, masks: torch.Tensor, name: str) -> list[dict]:
    with eval_mode(net):
        whole = mito_logits(net, images)
    rows = [
        {"network": name, "prediction": "whole slice", "iou": round(mask_iou(whole > 0, masks), 4)}
    ]
    for tile in TILES:
        seams = tiled_against_whole(net, images, masks, tile, overlap=64, whole=whole)
        rows.append(
            {
                "network": name,
                "prediction": f"tiles {tile}, overlap 64",
                "iou": seams["tiled_iou"],
                "mean_abs_prob_diff": seams["mean_abs_prob_diff"],
                "pixels_flipped": seams["flipped_pixels"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("tiling_seams"))
    args = parser.parse_args()
    if not (args.data / "raw").exists():
        print(f"skipped: {args.data} not found (the Lucchi volume of ../shared/data; see --data)")
        sys.exit(0)
    from joenet.checkpoint import load_model

    torch.set_flush_denormal(True)
    net = load_model(args.checkpoint).net
    images, masks = load_validation(args.data)
    rows = measure(net, images, masks, "as trained")
    if instance_norms(net):
        train_images, _ = load_validation(args.data, TRAIN_Z, step=13)
        frozen = freeze_instance_statistics(net, train_images)
        rows += measure(frozen, images, masks, "frozen statistics")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| network | prediction | mito IoU (all 33) | mean abs prob. vs whole | pixels flipped |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        diff, flipped = row.get("mean_abs_prob_diff"), row.get("pixels_flipped")
        lines.append(
            f"| {row['network']} | {row['prediction']} | {row['iou']:.3f} | "
            f"{'' if diff is None else f'{diff:.4f}'} | "
            f"{'' if flipped is None else f'{100 * flipped:.2f} %'} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
