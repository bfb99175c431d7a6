"""The training-speed switches: memory format, torch.compile, fused AdamW, micro-batches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from joenet.lit_module import SegmentationLitModule
from joenet.train import train
from tests.helpers import compose_train, tiny_overrides

TINY_NET = {"channels": [4, 8, 16, 32]}


def _pair(**options: object) -> tuple[SegmentationLitModule, SegmentationLitModule]:
    """A default module and one with ``options``, holding the same weights."""
    torch.manual_seed(0)
    plain = SegmentationLitModule(net=TINY_NET)
    other = SegmentationLitModule(net=TINY_NET, **options)
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_channels_last_changes_layout_not_results() -> None:
    plain, fast = _pair(memory_format="channels_last")
    fast.configure_model()
    conv = fast.net.decoder[0][0].residual[2].weight  # a 3x3 conv, 32 -> 16 channels
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-4)
    assert list(fast.state_dict()) == list(plain.state_dict())


def test_auto_memory_format_is_contiguous_on_cpu() -> None:
    module = SegmentationLitModule(net=TINY_NET)
    module.configure_model()  # no trainer: the CPU
    assert module.net.decoder[0][0].residual[2].weight.is_contiguous()


def test_unknown_memory_format_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"model\.memory_format must be"):
        SegmentationLitModule(net=TINY_NET, memory_format="nhwc")


def test_adamw_uses_its_fused_kernel_on_cpu() -> None:
    module = SegmentationLitModule(net=TINY_NET, scheduler="plateau")
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True


def test_compile_keeps_checkpoint_keys_outputs_and_gradients() -> None:
    plain, compiled = _pair(compile=True)
    compiled.configure_model()
    assert compiled.net._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints stay loadable
    x = torch.rand(2, 1, 32, 32)
    for module in (plain, compiled):
        module(x).square().mean().backward()
    torch.testing.assert_close(compiled(x), plain(x), atol=1e-4, rtol=1e-4)
    pairs = zip(plain.named_parameters(), compiled.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_micro_batches_with_accumulation_train_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    # What the CPU preset does: chunks of 2 patches, gradients summed over 2 chunks per step.
    micro = ["data.batch_size=2", "trainer.accumulate_grad_batches=2", "trainer.max_epochs=1"]
    cfg = compose_train([*tiny_overrides(data_dir, tmp_path), *micro])
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 // 4  # 8 patches per epoch, 4 per optimizer step
    # AdamW stepped exactly twice (4 micro-batches of 2), not four times nor never.
    moments = last["optimizer_states"][0]["state"]
    assert moments and all(int(state["step"]) == 2 for state in moments.values())
