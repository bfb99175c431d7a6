"""The picture of docs/viewing.md: a real Lucchi prediction as a viewer shows its layers.

Predicts ``--z`` slices of the Lucchi volume with a trained checkpoint (threshold and instances,
so the output has label images), validates the output with ``ome-zarr-models``, and draws from
the written arrays what napari's layers show: the raw slice, the mito probability (a second run
without threshold), the mito instances as a labels layer over the raw, and the coarsest scale
level. Drawn with matplotlib from the OME-Zarr itself (napari needs a display; this machine has
none). Also prints the sizes on disk of the arrays and of the label-image copies. Run::

    python benchmarks/viewing_figure.py --ckpt <run>/checkpoints/best.ckpt --out docs/viewing.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import zarr

from joenet.evaluate.figures import display_range
from joenet.predict import predict_volume


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    data_dir = Path(os.environ.get("JOENET_DATA_DIR", "../shared/data"))
    parser.add_argument("--data", type=Path, default=data_dir / "lucchi_train.zarr")
    parser.add_argument("--z", type=int, nargs=2, default=(150, 152), help="slices to predict")
    parser.add_argument("--out", type=Path, default=Path("docs/viewing.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        masks = Path(tmp) / "masks.zarr"
        probs = Path(tmp) / "probs.zarr"
        common = {"z_range": list(args.z), "progress": False}
        predict_volume(args.ckpt, args.data, masks, threshold=0.5, instances=True, **common)
        predict_volume(args.ckpt, args.data, probs, **common)
        from ome_zarr_models.v05 import Image, ImageLabel

        root = zarr.open_group(str(masks), mode="r")
        Image.from_zarr(root)
        for name in root["labels"].attrs["ome"]["labels"]:
            ImageLabel.from_zarr(root[f"labels/{name}"])
        print(f"{masks.name}: validates as OME-NGFF 0.5 (image, {name} and the other labels)")
        z = args.z[0]
        raw = zarr.open_group(str(args.data), mode="r")["raw"][z]
        prob = zarr.open_group(str(probs), mode="r")["mito"][z] / 255
        instances = root["labels/mito_instances/0"][z]
        levels = [d["path"] for d in root.attrs["ome"]["multiscales"][1]["datasets"]]
        coarse = root[levels[-1]][z]
        keys = ["mito", "mito_instances", "labels/mito", "labels/mito_instances", *levels[1:]]
        sizes = {key: _size(masks / key) for key in keys} | {
            "probability mito": _size(probs / "mito")
        }
        print(
            f"bytes on disk ({args.z[1] - args.z[0]} slices): "
            + ", ".join(f"{k} {v:,}" for k, v in sizes.items())
        )
    rng = np.random.default_rng(0)
    colours = rng.uniform(0.2, 1.0, (int(instances.max()) + 1, 3))
    overlay = np.repeat(display_range(raw)[..., None], 3, axis=-1).astype(np.float32)
    inside = instances > 0
    overlay[inside] = 0.5 * overlay[inside] + 0.5 * colours[instances[inside]]
    panels = [
        (f"raw (Lucchi, z={z})", display_range(raw), "gray"),
        ("mito probability", prob, "magma"),
        (f"labels/mito_instances ({int(instances.max())} objects)", overlay, None),
        (f"{levels[-1]} (coarsest level, {coarse.shape[1]}x{coarse.shape[0]})", coarse, "gray"),
    ]
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (title, image, cmap) in zip(axes, panels, strict=True):
        ax.imshow(image, cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
