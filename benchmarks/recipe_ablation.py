"""Why the seed's U-Net learns slower: one change at a time, same patches, same schedule horizon.

Run: ``python benchmarks/recipe_ablation.py [--patches 1200] [--rows seed stem ...] [--out F]``
(needs ``../shared/data/lucchi_train.zarr`` or ``--data``; skips with a reason when it is absent).

Every row trains through ``python -m joenet.train``'s own code (``joenet.train.train`` on the
composed ``data=lucchi`` config, Lightning, ``SegmentationLitModule``, ``EMDataModule``) for the
same number of patches (``--patches``, 128 px, 4 per optimizer step, cosine over exactly that
many steps) from the same seed, so all rows see the same stream of windows and augmentations.
Rows differ only in their overrides: ``seed`` is the seed's literal recipe
(``experiment=seed_literal``), ``stem`` adds ``model.net.input_norm=false``, and the rows up to
``narrow`` add one more change to ``stem``; ``recipe`` is joenet's default as it is, and each
``recipe_*`` row changes one thing of it (``custom``: the ``--custom`` overrides on the
default). After training, mito IoU (threshold 0.5) is measured on every 4th validation slice
of z [132, 165) (9 whole 768 x 1024 slices) with the weights validation would use (the EMA's,
when on). Patch counts, not seconds, fix the horizon: the IoU column does
not depend on the machine's load (the patches/s column does).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curve_diagnosis import mito_iou
from time_to_accuracy import DEFAULT_DATA, load_validation

from joenet.config import config_dir, register_resolvers

# Training only: no validation loop, logger, checkpoints, images or progress bar (the
# benchmarks measure the network themselves).
NO_OUTPUTS = [
    "+trainer.limit_val_batches=0",
    "+trainer.num_sanity_val_steps=0",
    "+trainer.enable_checkpointing=false",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "~logger",
    "~callbacks.validation_images",
    "~callbacks.model_checkpoint",
    "~callbacks.last_checkpoint",
    "~callbacks.early_stopping",
    "~callbacks.lr_monitor",
]
# The seed's rows start from experiment=seed_literal: joenet's defaults are the recipe now.
SEED = ["experiment=seed_literal"]
STEM = [*SEED, "model.net.input_norm=false"]
MICRO = ["data.batch_size=2", "trainer.accumulate_grad_batches=2"]
EMA = ["callbacks.ema={_target_:joenet.callbacks.EMA,decay:0.995}"]
# name: (what the row changes, its overrides). Rows from "stem" to "narrow" add one change to
# "stem"; "recipe" is joenet's default as it is; the "recipe_" rows change one thing of it.
ROWS: dict[str, tuple[str, list[str]]] = {
    "seed": ("the seed's recipe (BN + GELU on the raw image, lr 1e-3, no warm-up)", SEED),
    "stem": ("plain conv on the raw image (`model.net.input_norm=false`)", STEM),
    "zero_init": (
        "+ zero-initialised residual branches",
        [*STEM, "model.net.zero_init_residual=true"],
    ),
    "no_decay_norm": (
        "+ no weight decay on norms and biases",
        [*STEM, "model.decay_norm_and_bias=false"],
    ),
    "warmup": ("+ 5 % linear warm-up", [*STEM, "model.warmup=0.05"]),
    "lr2e-3": ("+ lr 2e-3 with 5 % warm-up", [*STEM, "model.lr=2e-3", "model.warmup=0.05"]),
    "lr3e-3": ("+ lr 3e-3 with 5 % warm-up", [*STEM, "model.lr=3e-3", "model.warmup=0.05"]),
    "ema": ("+ weight EMA (decay 0.995, warmed up)", [*STEM, *EMA]),
    "micro2": ("+ micro-batches of 2 accumulated to 4 (BN sees 2 patches)", [*STEM, *MICRO]),
    "micro2_group": (
        "+ micro-batches of 2 with GroupNorm",
        [*STEM, *MICRO, "model.net.norm=group"],
    ),
    "fg0.5": (
        "+ half the windows centred on a mitochondrion (0.33 before)",
        [*STEM, "data.foreground_fraction=0.5"],
    ),
    "dice2": ("+ Dice weighted 2 (BCE 1)", [*STEM, "model.dice_weight=2.0"]),
    "narrow": (
        "+ BasicUNet's widths 32-32-64-128-256 (5 levels, fewer FLOPs)",
        [*STEM, "model.net.channels=[32,32,64,128,256]"],
    ),
    "recipe": ("joenet's default recipe as it is (README, the default recipe)", []),
    "recipe_instance": ("default with InstanceNorm (BasicUNet's)", ["model.net.norm=instance"]),
    "recipe_leaky": ("default with LeakyReLU (BasicUNet's)", ["model.net.activation=leaky_relu"]),
    "recipe_maxpool": ("default with max-pool down (BasicUNet's)", ["model.net.down=maxpool"]),
    "recipe_postact": (
        "default with post-activation blocks, no shortcut (BasicUNet's)",
        ["model.net.block=postact"],
    ),
    "recipe_postact_leaky": (
        "default with BasicUNet's block: post-activation, LeakyReLU",
        ["model.net.block=postact", "model.net.activation=leaky_relu"],
    ),
    "recipe_lr1e-3": ("default with lr 1e-3", ["model.lr=1e-3"]),
    "recipe_lr3e-3": ("default with lr 3e-3", ["model.lr=3e-3"]),
    "recipe_narrow16": (
        "default with 16 channels at the finest level (16-32-64-128-256)",
        ["model.net.channels=[16,32,64,128,256]"],
    ),
    "recipe_narrow16_6": (
        "default with 6 levels 16-32-64-128-256-256",
        ["model.net.channels=[16,32,64,128,256,256]"],
    ),
    "recipe_fg0.1": (
        "default with a tenth of the windows centred on a mitochondrion",
        ["data.foreground_fraction=0.1"],
    ),
    "recipe_ema0.99": ("default with EMA decay 0.99", ["callbacks.ema.decay=0.99"]),
    "recipe_fg0": (
        "default with uniform windows (no foreground centring)",
        ["data.foreground_fraction=0.0"],
    ),
}


def compose(overrides: list[str], conf: Path) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def base_overrides(data: Path, patches: int, out_dir: Path) -> list[str]:
    """What every row shares: Lucchi, 128 px, 4 patches per step, a horizon of ``patches``."""
    return [
        "data=lucchi",
        f"paths.data_dir={data.parent}",
        f"data.path={data}",
        f"paths.output_dir={out_dir}",
        "trainer=cpu",
        "data.patch_size=128",
        "data.batch_size=4",
        "trainer.accumulate_grad_batches=1",
        "data.num_workers=0",
        "data.patches_per_epoch=1000000",
        "trainer.max_epochs=-1",
        f"+trainer.max_steps={patches // 4}",
        *NO_OUTPUTS,
    ]


def run_row(overrides: list[str], conf: Path) -> tuple[torch.nn.Module, float]:
    """Train one row; the network with the weights validation would use, and the seconds."""
    import lightning as L
    from hydra.utils import instantiate

    from joenet.train import _instantiate_all

    cfg = compose(overrides, conf)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    trainer = instantiate(
        cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")), logger=False
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return model.net, time.perf_counter() - start  # EMA: copied into the model at train end


def flops_by_part(size: int = 128) -> str:
    """Forward GFLOPs of one ``size`` px patch per part of joenet's UNet2d and of BasicUNet."""
    from monai.networks.nets import BasicUNet
    from torch.utils.flop_counter import FlopCounterMode

    from joenet.model import UNet2d

    nets = {
        "joenet 32-64-128-256": UNet2d(),
        "joenet 32-32-64-128-256": UNet2d(channels=(32, 32, 64, 128, 256)),
        "joenet 16-32-64-128-256 (default)": UNet2d(channels=(16, 32, 64, 128, 256)),
        "MONAI BasicUNet": BasicUNet(
            spatial_dims=2, in_channels=1, out_channels=2, features=(32, 32, 64, 128, 256, 32)
        ),
    }
    lines = [
        f"\nForward GFLOPs per {size} px patch, by part (finest level first)\n",
        "| network | total | parts |",
        "|---|---:|---|",
    ]
    for name, net in nets.items():
        with FlopCounterMode(display=False, depth=3) as counter:
            net(torch.rand(1, 1, size, size))
        parts = {}
        for module, ops in counter.get_flop_counts().items():
            path = module.split(".")[1:]
            depth = 2 if path and path[0] in ("encoder", "decoder", "downs", "ups") else 1
            if len(path) == depth:
                parts[".".join(path)] = sum(ops.values()) / 1e9
        shown = ", ".join(f"{part} {value:.2f}" for part, value in parts.items() if value >= 0.01)
        lines.append(f"| {name} | {counter.get_total_flops() / 1e9:.2f} | {shown} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--patches", type=int, default=1200)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=[*ROWS, "custom"])
    parser.add_argument(
        "--custom",
        nargs="*",
        default=[],
        help="overrides of the 'custom' row, on top of the default",
    )
    parser.add_argument("--out", type=Path, default=Path("recipe_ablation"))
    parser.add_argument("--flops", action="store_true", help="only the FLOPs table")
    args = parser.parse_args()
    if args.flops:
        print(flops_by_part())
        return
    if not (args.data / "raw").exists():
        print(f"skipped: {args.data} not found (the Lucchi volume of ../shared/data; see --data)")
        sys.exit(0)
    register_resolvers()
    torch.set_flush_denormal(True)
    images, masks = load_validation(args.data)
    images, masks = images[::4], masks[::4]
    # The configs as they are now: rows composed later must not see edits made meanwhile.
    conf = Path(tempfile.mkdtemp()) / "conf"
    shutil.copytree(config_dir(), conf)
    rows = {**ROWS, "custom": ("default with " + " ".join(args.custom), args.custom)}
    results = []
    print(f"{args.patches} patches per row, 128 px, 4 per step; mito IoU on 9 validation slices")
    print("\n| row | change | IoU | patches/s |\n|---|---|---:|---:|")
    for name in args.rows:
        label, extra = rows[name]
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [*base_overrides(args.data, args.patches, Path(tmp)), *extra]
            net, seconds = run_row(overrides, conf)
        iou = mito_iou(net, images, masks)
        results.append(
            {
                "row": name,
                "change": label,
                "overrides": " ".join(extra),
                "patches": args.patches,
                "val_iou": round(iou, 4),
                "patches_per_s": round(args.patches / seconds, 2),
            }
        )
        print(f"| {name} | {label} | {iou:.3f} | {args.patches / seconds:.2f} |", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out.with_suffix(".csv"), "w", newline="") as f:  # after every row
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)
    print(f"table: {args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
