"""Time to accuracy on Lucchi: joenet's default against MONAI's BasicUNet and torch-em's UNet2d.

Run: ``python benchmarks/time_to_accuracy.py [--minutes 20] [--eval-every 60] [--seed N] [--out F]``
(``--stop-after M`` stops each model after M minutes of training while its schedule still spans
``--minutes``: a probe of the first minutes of the full-budget run, at a fraction of its time)
(needs ``../shared/data/lucchi_train.zarr`` or ``--data``; skips with a reason when it is absent;
torch-em: ``pip install --no-deps torch-em``, see ``train_step_bench.py``).

All models train through joenet's real training path, the one ``python -m joenet.train
data=lucchi trainer.max_time=00:00:20:00`` takes on this machine: the composed default config
(its data, trainer and callbacks: the same stream of windows from z [0, 132) and the same
augmentations for every model), a Lightning ``Trainer`` with that time budget, ``EMDataModule``
and ``SegmentationLitModule``. joenet runs its default recipe as a user gets it. The peers are
put into the same module in place of joenet's network and train with a plain recipe, what a
MONAI or torch-em user would write: AdamW lr 1e-3, weight decay 1e-4 on all parameters, cosine
over the budget, no warm-up, no EMA (BasicUNet with MONAI's defaults, features 32-32-64-128-256;
torch-em's UNet2d with depth 3 and 32 initial features, joenet's 32-64-128-256 widths).

Only training time counts: every ``--eval-every`` seconds of training, the clock (Lightning's
``Timer``, which also drives the cosine schedule and ends the budget) stops while mito IoU
(threshold 0.5, global counts) is measured on every 8th validation slice of z [132, 165) (5
whole 768 x 1024 slices) with the weights validation would use (the EMA's when on). At the end
each model is measured on all 33 validation slices. Written by this one run: ``<out>.csv`` (the
curves, after each model), ``<out>.png`` and ``<out>.md`` (the table, also on stdout).

``--diagnose`` adds columns that say why a curve falls, measured at the same points on the same
slices: ``raw_iou`` (the live weights, not the EMA's), ``train_iou`` (every 26th *training* slice,
z 0-130: a widening gap to ``val_iou`` is overfitting), ``batchstat_iou`` (BatchNorm normalising
each slice by its own statistics instead of the running ones: a gain says the running statistics,
gathered on 128 px windows a third of which are centred on a mitochondrion, do not fit whole
slices), ``recal_iou`` (running statistics re-estimated on the training slices, eval mode) and
``best_threshold`` / ``best_threshold_iou`` (the probability threshold that would have scored best:
a drift away from 0.5 is calibration).

``--tiled`` also predicts the 33 final slices as ``python -m joenet.predict`` does (tiles of
256 px, overlap 64, Gaussian blending) and states that IoU and how far the tiled probabilities
are from whole-slice ones: with per-sample normalisation (InstanceNorm) every tile is normalised
by its own statistics.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import zarr
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import RunningStage
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curve_diagnosis import (
    diagnose,
    eval_mode,
    mask_iou,
    mito_iou,
    mito_logits,
    tiled_against_whole,
)
from tta_report import plot, summary_table, write_curves

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lucchi_train.zarr"
TRAIN_Z, VAL_Z = (0, 132), (132, 165)
PLAIN_RECIPE = [
    "model.lr=1e-3",
    "model.weight_decay=1e-4",
    "model.decay_norm_and_bias=true",
    "model.warmup=0.0",
    "model.scheduler=cosine",
]  # and no EMA callback
CURVE_FIELDS = ["model", "train_s", "patches", "val_iou"]


def load_validation(
    path: Path, z: tuple[int, int] = VAL_Z, step: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] (S, 1, H, W) and mito masks (S, H, W) of z [start, stop) every ``step``."""
    group = zarr.open_group(str(path), mode="r")
    raw = np.asarray(group["raw"][z[0] : z[1] : step], dtype=np.float32) / 255.0
    mito = np.asarray(group["labels/mito"][z[0] : z[1] : step]) > 0
    return torch.from_numpy(raw)[:, None], torch.from_numpy(mito)


def peers() -> dict[str, Callable[[], nn.Module]]:
    """The peer networks that are installed, by name."""
    table: dict[str, Callable[[], nn.Module]] = {}
    try:
        from monai.networks.nets import BasicUNet

        table["MONAI BasicUNet"] = lambda: BasicUNet(
            spatial_dims=2, in_channels=1, out_channels=2, features=(32, 32, 64, 128, 256, 32)
        )
    except ImportError as err:
        print(f"MONAI skipped ({err}); pip install monai")
    try:
        from train_step_bench import torch_em_unet2d

        torch_em = torch_em_unet2d()
        table["torch-em UNet2d"] = lambda: torch_em(
            in_channels=1, out_channels=2, depth=3, initial_features=32
        )
    except Exception as err:  # not installed, or its module failing to import
        print(
            f"torch-em skipped ({type(err).__name__}: {str(err)[:80]}); "
            "pip install --no-deps torch-em"
        )
    return table


class EvaluateWithClockStopped(L.Callback):
    """Every ``every`` seconds of training, measure mito IoU with the ``Timer`` paused."""

    def __init__(
        self,
        name: str,
        every: float,
        val: tuple[torch.Tensor, torch.Tensor],
        train: tuple[torch.Tensor, torch.Tensor] | None = None,
        stop_after: float | None = None,
    ):
        self.name, self.every, self.val, self.train = name, every, val, train
        self.stop_after = stop_after
        self.curve: list[dict[str, Any]] = []
        self.patches = 0
        self.next_eval = every

    def _timer(self, trainer: L.Trainer) -> Timer:
        return next(c for c in trainer.callbacks if isinstance(c, Timer))

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        timer = self._timer(trainer)
        elapsed, paused = timer.time_elapsed(), time.monotonic()
        ema = next((c for c in trainer.callbacks if hasattr(c, "_average_model")), None)
        net = ema._average_model.module.net if ema and ema._average_model else pl_module.net
        iou = mito_iou(net, *self.val)
        row = {
            "model": self.name,
            "train_s": round(elapsed, 1),
            "patches": self.patches,
            "val_iou": round(iou, 4),
        }
        if self.train is not None:
            row["raw_iou"] = round(mito_iou(pl_module.net, *self.val), 4)
            row.update(diagnose(net, self.val, self.train))
        self.curve.append(row)
        extra = "".join(f", {k} {v}" for k, v in row.items() if k not in CURVE_FIELDS)
        print(
            f"{self.name}: {elapsed / 60:5.1f} min, {self.patches} patches, "
            f"val mito IoU {iou:.3f}{extra}",
            flush=True,
        )
        # The clock does not run while evaluating: move the Timer's start by the pause.
        timer._start_time[RunningStage.TRAINING] += time.monotonic() - paused

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.curve:  # the untrained network; the Timer has started by now
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.patches += batch["image"].shape[0]
        timer = self._timer(trainer)
        if timer.time_elapsed() >= self.next_eval or timer.time_elapsed() >= timer._duration:
            self._evaluate(trainer, pl_module)
            self.next_eval += self.every
            if self.stop_after is not None and timer.time_elapsed() >= self.stop_after:
                trainer.should_stop = True  # the schedule still spans the whole budget


def train_one(
    name: str,
    overrides: list[str],
    make_net: Callable[[], nn.Module] | None,
    args: Any,
    quick: tuple[torch.Tensor, torch.Tensor],
    train_slices: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[dict[str, Any]], nn.Module]:
    """Train through joenet's path for the budget; the curve and the final network.

    ``make_net``: a peer network to train in joenet's place, with the plain recipe.
    """
    from hydra.utils import instantiate
    from omegaconf import open_dict
    from recipe_ablation import NO_OUTPUTS, compose

    from joenet.config import config_dir
    from joenet.train import _instantiate_all

    with tempfile.TemporaryDirectory() as tmp:
        budget = f"00:00:{int(args.minutes):02d}:{round(60 * (args.minutes % 1)):02d}"
        cfg = compose(
            [
                "data=lucchi",
                f"paths.data_dir={args.data.parent}",
                f"paths.output_dir={tmp}",
                f"trainer.max_time={budget}",
                "trainer.max_epochs=-1",
                "data.num_workers=0",
                f"seed={args.seed}",  # initial weights and the patch stream, the same for all
                *NO_OUTPUTS,
                *overrides,
            ],
            config_dir(),
        )
        if make_net is not None:
            with open_dict(cfg):
                cfg.callbacks.pop("ema", None)
        L.seed_everything(cfg.seed, workers=True)
        data = instantiate(cfg.data)
        module = instantiate(cfg.model)
        if make_net is not None:
            module.net = make_net()
        stop = None if args.stop_after is None else 60 * args.stop_after
        clock = EvaluateWithClockStopped(name, args.eval_every, quick, train_slices, stop)
        callbacks = [*_instantiate_all(cfg.get("callbacks")), clock]
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
        trainer.fit(module, datamodule=data)
    return clock.curve, module.net  # EMA: copied into the module when training ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument(
        "--stop-after",
        type=float,
        default=None,
        help="minutes of training after which to stop; schedules still span --minutes",
    )
    parser.add_argument("--eval-every", type=float, default=60.0, help="seconds of training")
    parser.add_argument("--target", type=float, default=0.80)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every model's run (a repeat with another)"
    )
    parser.add_argument("--out", type=Path, default=Path("time_to_accuracy"))
    parser.add_argument(
        "--models", nargs="+", default=["joenet", "MONAI BasicUNet", "torch-em UNet2d"]
    )
    parser.add_argument(
        "--joenet", nargs="*", default=[], help="extra Hydra overrides of joenet's run (a variant)"
    )
    parser.add_argument(
        "--diagnose", action="store_true", help="also the columns that say why a curve falls"
    )
    parser.add_argument(
        "--tiled", action="store_true", help="also the final IoU of tiled prediction (256/64)"
    )
    args = parser.parse_args()
    if not (args.data / "raw").exists():
        print(f"skipped: {args.data} not found (the Lucchi volume of ../shared/data; see --data)")
        sys.exit(0)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from joenet.config import register_resolvers

    register_resolvers()
    torch.set_flush_denormal(True)
    val = load_validation(args.data)
    quick = (val[0][::8], val[1][::8])
    train_slices = load_validation(args.data, TRAIN_Z, step=26) if args.diagnose else None
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.minutes:g} min each"
    )
    runs: dict[str, tuple[list[str], Callable[[], nn.Module] | None]] = {
        "joenet": (args.joenet, None),
        **{name: (PLAIN_RECIPE, make) for name, make in peers().items()},
    }
    curves, final, tiled = {}, {}, {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        if name not in runs:
            continue
        overrides, make = runs[name]
        curves[name], net = train_one(name, overrides, make, args, quick, train_slices)
        with eval_mode(net):
            whole = mito_logits(net, val[0])
        final[name] = mask_iou(whole > 0, val[1])
        print(f"{name}: final IoU on all 33 validation slices {final[name]:.4f}", flush=True)
        if args.tiled:
            tiled[name] = tiled_against_whole(net, *val, whole=whole)
            print(f"{name}: tiled prediction of the 33 slices {tiled[name]}", flush=True)
        write_curves(curves, args.out.with_suffix(".csv"))
    plot(curves, args.target, args.out.with_suffix(".png"))
    table = summary_table(
        curves, final, tiled, min(args.minutes, args.stop_after or args.minutes), args.target
    )
    print("\n" + table)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(f"curves: {args.out.with_suffix('.csv')}, plot: {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
