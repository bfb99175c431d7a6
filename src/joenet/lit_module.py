"""The training system: the U-Net, its loss and metrics, and the optimiser wiring."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from joenet.checkpoint import load_network_weights, read_checkpoint
from joenet.losses import BCEDiceLoss, deep_supervision_loss
from joenet.metrics import SegmentationMetrics
from joenet.model import DEFAULT_CLASS_NAMES, build_network
from joenet.schedules import WarmupCosine


class SegmentationLitModule(L.LightningModule):
    """Multi-label (sigmoid) segmentation of nuclei and mitochondria with ``UNet2d``.

    It takes plain values only and builds its network itself, so ``save_hyperparameters`` stores
    primitives and a checkpoint alone rebuilds the model (and loads with ``weights_only=True``).

    Args:
        class_names: one output channel per class, in order (channel 0 nuclei, 1 mito).
        net: keyword arguments of ``UNet2d`` (channels, down, up, activation, ...).
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        decay_norm_and_bias: apply ``weight_decay`` to norm weights and biases too, as the
            seed's plain AdamW does; False decays only conv weights (the common practice: decay
            pulls a norm's scale towards 0, which a following conv cannot undo).
        scheduler: ``cosine`` (per step, to 0 at the end of training: of ``max_steps`` /
            ``max_epochs``, or of ``trainer.max_time``, whichever comes first) or ``plateau``
            (ReduceLROnPlateau on ``plateau_monitor`` at each validation).
        warmup: share of the cosine schedule spent ramping the learning rate up linearly from 0.
        plateau_factor: learning-rate factor of ``plateau``.
        plateau_patience: validations without improvement before ``plateau`` lowers the rate.
        plateau_monitor: logged metric that ``plateau`` watches.
        plateau_mode: ``min`` (lower is better, as for a loss) or ``max`` (as for Dice).
        bce_weight: weight of BCE in the loss.
        dice_weight: weight of Dice in the loss.
        threshold: probability threshold of the metrics.
        nonfinite_loss: on a NaN/Inf loss, ``stop`` training (the default: the checkpoints keep
            the last finite weights) or ``skip`` the batch and go on; either way that step
            never updates the weights.
        compile: ``torch.compile`` the network when training starts (``nn.Module.compile``:
            in place, checkpoints keep their keys). Measured on 2 AVX2 cores: +14-27 % training
            patches/s, after a first step of about a minute (``docs/benchmarks.md``).
        memory_format: ``channels_last``, ``contiguous`` or ``auto`` (channels_last on CUDA,
            where bf16 tensor-core convolutions want it; contiguous on CPUs, where it measured
            -13 % at batch 4 and +9 % at batch 16: oneDNN's channels_last backward is slow).
    """

    def __init__(
        self,
        class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
        net: Mapping[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        decay_norm_and_bias: bool = True,
        scheduler: Literal["cosine", "plateau"] = "cosine",
        warmup: float = 0.0,
        plateau_factor: float = 0.5,
        plateau_patience: int = 5,
        plateau_monitor: str = "val/loss",
        plateau_mode: Literal["min", "max"] = "min",
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        threshold: float = 0.5,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        compile: bool = False,
        memory_format: Literal["auto", "channels_last", "contiguous"] = "auto",
    ):
        super().__init__()
        _check_numbers(
            lr=(lr, 0.0, True),
            weight_decay=(weight_decay, 0.0, True),
            bce_weight=(bce_weight, 0.0, True),
            dice_weight=(dice_weight, 0.0, True),
            threshold=(threshold, 0.0, False),
            warmup=(warmup, 0.0, True),
        )
        if memory_format not in ("auto", "channels_last", "contiguous"):
            raise ValueError(
                "model.memory_format must be 'auto', 'channels_last' or 'contiguous', "
                f"got {memory_format!r}"
            )
        if scheduler not in ("cosine", "plateau"):
            raise ValueError(f"model.scheduler must be 'cosine' or 'plateau', got {scheduler!r}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"model.warmup must be a share of the schedule, in [0, 1): {warmup}")
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(
                f"model.nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}"
            )
        class_names, net = list(class_names), dict(net or {})  # plain values for the checkpoint
        self.save_hyperparameters()
        self.net = build_network(class_names, net)
        self.criterion = BCEDiceLoss(bce_weight=bce_weight, dice_weight=dice_weight)
        self.train_metrics = SegmentationMetrics(class_names, threshold)
        self.val_metrics = SegmentationMetrics(class_names, threshold)
        self.nonfinite_steps: list[int] = []  # global steps whose loss was NaN/Inf
        self._memory_format = torch.contiguous_format

    def configure_model(self) -> None:
        """Apply ``memory_format`` and ``compile`` for the device this run trains on."""
        device = self.trainer.strategy.root_device if self._trainer else torch.device("cpu")
        channels_last = self.hparams.memory_format == "channels_last" or (
            self.hparams.memory_format == "auto" and device.type == "cuda"
        )
        if channels_last:
            self._memory_format = torch.channels_last
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self.net, "_compiled_call_impl", None):
            self.net.compile()

    def init_weights_from(self, path: str | Path) -> None:
        """Load the network weights of a joenet checkpoint (``init_from=``), e.g. to fine-tune."""
        checkpoint = read_checkpoint(path, "init_from", plain_state_dict=True)
        self._load_net_weights(checkpoint, f"init_from={path}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resume (ckpt_path=) with another model.net: one line naming the file and both configs
        # instead of Lightning's strict load listing every mismatching tensor.
        path = self._trainer.ckpt_path if self._trainer else "the checkpoint"
        self._load_net_weights(checkpoint, f"ckpt_path={path}")

    def _load_net_weights(self, checkpoint: dict[str, Any], source: str) -> None:
        load_network_weights(self.net, checkpoint, source, dict(self.hparams.net))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.contiguous(memory_format=self._memory_format))

    def _shared_step(
        self, batch: dict[str, Tensor], metrics: SegmentationMetrics, aux: bool = False
    ) -> Tensor:
        aux_logits: list[Tensor] = []
        if aux and getattr(self.net, "aux_heads", None):  # a peer network in benchmarks has none
            # Deep supervision, in training only (its path is not the compiled forward).
            image = batch["image"].contiguous(memory_format=self._memory_format)
            logits, aux_logits = self.net.forward_with_aux(image)
        else:
            logits = self(batch["image"])  # (B, C, H, W)
        masks = (batch["labelled"], batch["valid"])
        loss = self.criterion(logits, batch["target"], *masks)
        if aux_logits:
            loss = deep_supervision_loss(self.criterion, loss, aux_logits, batch)
        metrics.update(logits.detach().sigmoid(), batch["target"], *masks)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss = self._shared_step(batch, self.train_metrics, aux=True)
        # One host sync per step, worth it: a NaN step would poison every weight through AdamW.
        if not torch.isfinite(loss):
            self._on_nonfinite_loss(loss)
            return None
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch["image"].shape[0],
        )
        return loss

    def _on_nonfinite_loss(self, loss: Tensor) -> None:
        # Returning None makes Lightning skip backward and the optimizer step for this batch.
        self.nonfinite_steps.append(self.global_step)
        where = f"loss {loss.item()} at epoch {self.current_epoch}, step {self.global_step}"
        if self.hparams.nonfinite_loss == "skip":
            rank_zero_warn(f"non-finite {where}: batch skipped (model.nonfinite_loss=skip)")
            return None
        rank_zero_warn(
            f"non-finite {where}: training stops; the checkpoints keep the last finite weights. "
            "Lower model.lr, set trainer.gradient_clip_val, check the data for NaN, or set "
            "model.nonfinite_loss=skip"
        )
        self.trainer.should_stop = True
        return None

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train", self.train_metrics)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self._shared_step(batch, self.val_metrics)
        self.log(
            "val/loss",
            loss,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=batch["image"].shape[0],
        )

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def _log_metrics(self, stage: str, metrics: SegmentationMetrics) -> None:
        # compute() is already synchronised across ranks; classes without labels are absent.
        values = metrics.compute()
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()})
        metrics.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = _adamw(
            _param_groups(self, self.hparams.weight_decay, self.hparams.decay_norm_and_bias),
            self.hparams.lr,
        )
        scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
        if self.hparams.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode=self.hparams.plateau_mode,
                factor=self.hparams.plateau_factor,
                patience=self.hparams.plateau_patience,
            )
            config = {"interval": "epoch", "monitor": self.hparams.plateau_monitor}
        else:
            scheduler = WarmupCosine(optimizer, self._schedule_progress(), self.hparams.warmup)
            config = {"interval": "step"}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "name": "train/lr", **config},
        }

    def _schedule_progress(self) -> Callable[[int], float]:
        """Where training stands in [0, 1] after ``step`` optimizer steps: by steps or by time.

        With ``trainer.max_time`` the schedule also follows the clock (Lightning's ``Timer``),
        so a time budget ends at the learning-rate floor however fast the machine is.
        """
        total_steps = self.trainer.estimated_stepping_batches
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        budget = timer._duration if timer is not None else None
        if total_steps == float("inf") and not budget:
            raise ValueError(
                "model.scheduler=cosine needs a finite trainer.max_epochs or max_steps, or a "
                "trainer.max_time budget (it decays to 0 at the end); set one, or use "
                "model.scheduler=plateau"
            )

        def progress(step: int) -> float:
            by_steps = step / total_steps if total_steps != float("inf") else 0.0
            by_time = timer.time_elapsed("train") / budget if budget else 0.0  # type: ignore[union-attr]
            return max(by_steps, by_time)

        return progress


def _param_groups(
    module: torch.nn.Module, weight_decay: float, decay_norm_and_bias: bool
) -> list[dict[str, Any]]:
    """Parameters with and without weight decay (norm weights and biases: 1-D tensors)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def _adamw(params: Any, lr: float) -> torch.optim.AdamW:
    """AdamW with its fused kernel (one kernel for all parameters) where the device has one.

    Fused saves kernel launches on GPUs; on a CPU the optimizer step is under 1 % of a training
    step and fused against foreach measured within noise (``benchmarks/train_step_bench.py``).
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=lr)


def _check_numbers(**values: tuple[object, float, bool]) -> None:
    """``model.<key>`` must be a number above (or, when allowed, equal to) its lower bound:
    a string from the command line (``model.lr=abc``) fails here, not deep in the optimizer."""
    for key, (value, low, inclusive) in values.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise ValueError(f"model.{key} must be a number {bound}, got {value!r}")
