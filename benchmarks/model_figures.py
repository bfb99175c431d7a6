"""Print the size, cost and receptive field of each UNet2d variant as a markdown table.

FLOPs as ``joenet.model.cost.count_gflops`` counts them (convolutions and matrix products, 2 per
multiply-accumulate); the training step is forward + backward of a BCE loss, batch of one.

Usage: ``python benchmarks/model_figures.py`` (the seed's 4-level down x up variants), or
``python benchmarks/model_figures.py --experiments [--out docs/experiments.md]``: one row per
``experiment=`` config, its network built from the composed config as training builds it.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from joenet.model import UNet2d
from joenet.model.cost import count_gflops

PATCH = (1, 1, 256, 256)  # (B, C, H, W): one seed-sized grayscale patch


def main() -> None:
    """Print one markdown row per down x up variant of the default UNet2d."""
    print("| down | up | parameters | forward GFLOPs | train-step GFLOPs | receptive field (px) |")
    print("|---|---|---:|---:|---:|---:|")
    for down, up in itertools.product(["strided", "maxpool"], ["transposed", "bilinear"]):
        model = UNet2d(down=down, up=up)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"| {down} | {up} | {params:,} | {count_gflops(model, train=False):.2f} "
            f"| {count_gflops(model, train=True):.2f} | {model.receptive_field()} |"
        )
    print(f"\nUNet2d defaults otherwise; FLOPs per {'x'.join(map(str, PATCH))} patch.")


def experiments_table() -> str:
    """A markdown row per experiment config: what it changes, its network's size and cost."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from joenet.config import config_dir, register_resolvers

    register_resolvers()
    rows = [
        "| experiment | what it changes | parameters | forward GFLOPs | train-step GFLOPs "
        "| receptive field (px) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    names = ["(default)", *sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for name in names:
            overrides = ["trainer=cpu"] + ([] if name == "(default)" else [f"experiment={name}"])
            cfg = compose(config_name="train", overrides=overrides)
            net = OmegaConf.to_container(cfg.model.net, resolve=True)
            model = UNet2d(out_channels=len(cfg.model.class_names), **net)
            text = "joenet's default recipe"
            if name != "(default)":
                path = config_dir() / "experiment" / f"{name}.yaml"
                lines = [ln[2:] for ln in path.read_text().splitlines()[1:] if ln.startswith("# ")]
                text = " ".join(lines)
            params = sum(p.numel() for p in model.parameters())
            rows.append(
                f"| `{name}` | {text} | {params:,} | {count_gflops(model, train=False):.2f} "
                f"| {count_gflops(model, train=True):.2f} | {model.receptive_field()} |"
            )
    return "\n".join(rows) + (
        f"\n\nFLOPs per {'x'.join(map(str, PATCH))} patch (the data and training options do not "
        "change the network: their rows repeat the default's).\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", action="store_true", help="one row per experiment")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    if args.experiments:
        table = experiments_table()
        print(table)
        if args.out:
            args.out.write_text(table)
    else:
        main()
