"""The training recipe: time budgets, weight EMA, warm-up, weight-decay groups, zero-init, and
that the default recipe learns."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from joenet.callbacks import EMA, warm_ema
from joenet.checkpoint import load_model
from joenet.config import gpu_or_cpu
from joenet.lit_module import SegmentationLitModule, WarmupCosine, _param_groups
from joenet.model import UNet2d
from joenet.model.blocks import ConvNeXtBlock, PreActResBlock
from joenet.train import train
from tests.helpers import compose_train, tiny_overrides

QUIET = ["~logger", "~callbacks.validation_images", "~callbacks.lr_monitor"]


def test_zero_init_residual_makes_every_block_its_shortcut() -> None:
    torch.manual_seed(0)
    net = UNet2d(channels=(8, 16, 32), zero_init_residual=True).train()
    plain = UNet2d(channels=(8, 16, 32))
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())
    blocks = [m for m in net.modules() if isinstance(m, PreActResBlock | ConvNeXtBlock)]
    assert len(blocks) == 5  # 2 encoder, 1 bottleneck, 2 decoder
    for block in blocks:
        x = torch.randn(2, block.residual[2].in_channels, 8, 8)  # the first conv's input
        torch.testing.assert_close(block(x), block.shortcut(x))
    # The zeroed convs still learn: their gradient is not zero.
    out = net(torch.rand(2, 1, 32, 32))
    out.square().mean().backward()
    assert all(block.residual[-1].weight.grad.abs().sum() > 0 for block in blocks)


def test_weight_decay_groups() -> None:
    module = SegmentationLitModule(net={"channels": [4, 8, 16]})
    (everything,) = _param_groups(module, 1e-4, decay_norm_and_bias=True)
    assert everything["weight_decay"] == 1e-4
    decayed, free = _param_groups(module, 1e-4, decay_norm_and_bias=False)
    assert free["weight_decay"] == 0.0 and all(p.ndim == 1 for p in free["params"])
    assert decayed["weight_decay"] == 1e-4 and all(p.ndim == 4 for p in decayed["params"])
    total = len(list(module.parameters()))
    assert len(decayed["params"]) + len(free["params"]) == total == len(everything["params"])


def test_warmup_cosine_shape_and_old_checkpoints() -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupCosine(optimizer, lambda step: step / 100, warmup=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert max(lrs) == lrs[10] and lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # decays after warm-up
    state = scheduler.state_dict()
    assert "_progress" not in state and state["last_epoch"] == 100
    # A checkpoint of the earlier CosineAnnealingLR loads into it (resume of an old run).
    old = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 200)
    fresh = WarmupCosine(optimizer, lambda step: step / 200, warmup=0.0)
    fresh.load_state_dict(old.state_dict())
    assert fresh.last_epoch == old.last_epoch


def test_gpu_or_cpu_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    import joenet.config as config

    monkeypatch.setattr(config, "has_gpu", lambda: False)
    assert gpu_or_cpu(16, 2) == 2
    monkeypatch.setattr(config, "has_gpu", lambda: True)
    assert gpu_or_cpu(16, 2) == 16


def test_warm_ema_follows_early_and_smooths_later() -> None:
    update = warm_ema(0.995)
    first = update(torch.zeros(1), torch.ones(1), torch.tensor(0))
    assert first.item() == pytest.approx(1 - 1 / 10)  # decay 0.1 at the first update
    late = update(torch.zeros(1), torch.ones(1), torch.tensor(10_000))
    assert late.item() == pytest.approx(0.005)
    with pytest.raises(ValueError, match=r"callbacks\.ema\.decay"):
        EMA(decay=1.0)


def test_time_budget_alone_ends_the_schedule_and_checkpoints_mid_epoch(
    data_dir: Path, tmp_path: Path
) -> None:
    """max_time shorter than one epoch, no max_epochs, validation every 3rd epoch: the run
    stops inside epoch 0 near lr 0, after a final validation that writes both checkpoints."""
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            *tiny_overrides(data_dir, run_dir),
            *QUIET,
            "trainer.max_epochs=-1",
            "trainer.max_time=00:00:00:04",
            "data.patches_per_epoch=100000",
            "trainer.check_val_every_n_epoch=3",
        ]
    )
    metrics = train(cfg)
    assert "val/dice" in metrics  # the final validation ran
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] > 0
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    scheduler = last["lr_schedulers"][0]
    assert scheduler["_last_lr"][0] < 0.1 * cfg.model.lr  # at the floor, not mid-way


def test_ema_weights_are_what_validation_checkpoints_and_prediction_use(
    data_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_train([*tiny_overrides(data_dir, run_dir), *QUIET])  # EMA is on by default
    train(cfg)
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    averaged, raw = best["state_dict"], best["current_model_state"]
    key = "net.head.2.weight"
    assert not torch.equal(averaged[key], raw[key])  # the average differs from the raw weights
    loaded = load_model(run_dir / "checkpoints" / "best.ckpt")
    for name, value in loaded.net.state_dict().items():
        assert torch.equal(value, averaged[f"net.{name}"]), name


def test_default_recipe_learns(tmp_path: Path) -> None:
    """48 optimizer steps of the default recipe (its CPU patch size and batch) on a synthetic
    volume; a broken loss, a detached gradient or a frozen optimizer stays at the untrained
    network's Dice."""
    overrides = [
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'run'}",
        *QUIET,
        "data.synthetic.shape=[16,256,256]",
        "data.train_z=[0,12]",
        "data.val_z=[12,16]",
        "data.patches_per_epoch=64",
        "data.num_workers=0",
        "trainer=cpu",
        "trainer.max_epochs=3",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
    ]
    cfg = compose_train(overrides)
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 4  # 16 steps an epoch
    L.seed_everything(cfg.seed)
    before = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    ).validate(instantiate(cfg.model), datamodule=instantiate(cfg.data), verbose=False)[0][
        "val/dice"
    ]
    after = train(cfg)["val/dice"]
    assert after > max(0.5, before + 0.25), (before, after)


def test_a_peer_network_trains_in_joenets_module() -> None:
    # benchmarks/time_to_accuracy.py puts MONAI's and torch-em's networks in place of UNet2d:
    # the training step must not assume UNet2d's attributes (deep supervision's aux_heads).
    module = SegmentationLitModule(net={"channels": [4, 8]})
    module.net = torch.nn.Conv2d(1, 2, 3, padding=1)
    batch = {
        "image": torch.rand(2, 1, 16, 16),
        "target": (torch.rand(2, 2, 16, 16) > 0.5).float(),
        "valid": torch.ones(2, 1, 16, 16),
        "labelled": torch.ones(2, 2, dtype=torch.bool),
    }
    loss = module._shared_step(batch, module.train_metrics, aux=True)
    loss.backward()
    assert torch.isfinite(loss) and module.net.weight.grad.abs().sum() > 0


def test_time_to_accuracy_diagnosis_measures_without_touching_the_network() -> None:
    # benchmarks/time_to_accuracy.py --diagnose: its columns must not change what training sees
    # (mode, BatchNorm statistics) and its threshold sweep must find a threshold that is better.
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from curve_diagnosis import diagnose, threshold_sweep

    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :4] = True
    logits = torch.full((1, 8, 8), -3.0)
    logits[0, :4] = 1.0  # p = 0.73 on the mask
    logits[0, 4:6] = 0.5  # p = 0.62 beside it: only a threshold above 0.62 drops these
    threshold, iou = threshold_sweep(logits, masks)
    assert threshold == 0.7 and iou == 1.0

    torch.manual_seed(0)
    net = UNet2d(channels=[4, 8]).train()
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [n.running_mean.clone() for n in norms]
    images = torch.rand(2, 1, 32, 32)
    row = diagnose(
        net, (images, masks.expand(2, 8, 8).repeat(1, 4, 4)), (images, images[:, 0] > 0.5)
    )
    assert net.training
    assert all(torch.equal(b, n.running_mean) for b, n in zip(before, norms, strict=True))
    assert set(row) == {
        "train_iou",
        "best_threshold",
        "best_threshold_iou",
        "batchstat_iou",
        "recal_iou",
    }
    assert all(0.0 <= v <= 1.0 for v in row.values())


def test_time_to_accuracy_tiled_measure_sees_per_tile_statistics() -> None:
    # time_to_accuracy.py --tiled: with BatchNorm in eval mode and an overlap beyond the receptive
    # field, tiles compute what the whole slice computes; InstanceNorm normalises each tile by
    # its own statistics, and the measure must see that difference.
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from curve_diagnosis import tiled_against_whole

    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(128.0), indexing="ij")
    images = (0.5 + 0.3 * torch.sin(yy / 5) * torch.cos(xx / 7) + 0.1 * torch.rand(96, 128))[
        None, None
    ].expand(2, 1, 96, 128)
    masks = images[:, 0] > 0.6
    batch_norm = UNet2d(channels=[4, 8]).eval()
    assert batch_norm.receptive_field() <= 32
    same = tiled_against_whole(batch_norm, images, masks, tile=64, overlap=32)
    assert same["mean_abs_prob_diff"] < 1e-5 and same["flipped_pixels"] == 0.0
    instance = UNet2d(channels=[4, 8], norm="instance").train()
    differs = tiled_against_whole(instance, images, masks, tile=64, overlap=32)
    assert instance.training  # left in the mode it was in
    assert differs["mean_abs_prob_diff"] > 1e-3
    assert 0.0 <= differs["tiled_iou"] <= 1.0


def test_time_to_accuracy_stop_after_ends_training_at_an_evaluation() -> None:
    # time_to_accuracy.py --stop-after: stop at the first evaluation past the given training
    # time, not before it, and never while the clock is short of it.
    import sys
    import time
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.trainer.states import RunningStage

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from time_to_accuracy import EvaluateWithClockStopped

    timer = Timer(duration={"minutes": 20})
    trainer = SimpleNamespace(callbacks=[timer], should_stop=False)
    net = torch.nn.Conv2d(1, 2, 1)
    module = SimpleNamespace(net=net)
    val = (torch.rand(1, 1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool))
    clock = EvaluateWithClockStopped("probe", every=30.0, val=val, stop_after=90.0)
    batch = {"image": torch.zeros(4, 1, 8, 8)}
    for elapsed, stops in [(31.0, False), (61.0, False), (91.0, True)]:
        timer._start_time[RunningStage.TRAINING] = time.monotonic() - elapsed
        clock.on_train_batch_end(trainer, module, None, batch, 0)
        assert trainer.should_stop is stops, elapsed
    assert [row["patches"] for row in clock.curve] == [4, 8, 12]
