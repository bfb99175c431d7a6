"""Building blocks of the joenet U-Net: pure ``nn.Module``s, no configuration logic.

References:
    - Pre-activation block: He et al., "Identity Mappings in Deep Residual Networks" (ResNet-v2,
      2016).
    - Depthwise large-kernel block: Liu et al., "A ConvNet for the 2020s" (ConvNeXt, 2022).
    - Depthwise separable convolutions: Howard et al., "MobileNets" (2017).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from joenet.model.attention import AttentionKind, make_attention

Activation = Literal["gelu", "leaky_relu"]
Norm = Literal["batch", "instance", "group"]
DownKind = Literal["strided", "maxpool"]
UpKind = Literal["transposed", "bilinear"]
BlockKind = Literal["preact", "postact"]
ConvKind = Literal["standard", "depthwise_separable"]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """A ``ValueError`` naming the option and its choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def make_activation(name: Activation) -> nn.Module:
    """Build the activation called ``name``.

    Args:
        name: ``"gelu"`` or ``"leaky_relu"`` (negative slope 0.01).

    Returns:
        A fresh activation module.
    """
    check_choice("activation", name, get_args(Activation))
    if name == "gelu":
        return nn.GELU()
    # Not in-place: with pre-activation the block input feeds the shortcut too.
    return nn.LeakyReLU(0.01, inplace=False)


def make_norm(name: Norm, channels: int) -> nn.Module:
    """Build the normalisation called ``name`` for ``channels`` channels.

    ``batch`` is the seed's BatchNorm. ``instance`` (affine, no running statistics, as MONAI's
    BasicUNet; the default config's) and ``group`` (8 channels per group, GroupNorm) normalise
    each sample alone, so no batch statistics mix samples in training or differ from them at
    inference; but each prediction *tile* is normalised by its own statistics, so tiled
    prediction depends on the tile size (measured in ``benchmarks/tiling_seams.py``).
    """
    check_choice("norm", name, get_args(Norm))
    if name == "batch":
        return nn.BatchNorm2d(channels)
    if name == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.GroupNorm(max(1, channels // 8), channels)


def make_conv3x3(in_channels: int, out_channels: int, kind: ConvKind = "standard") -> nn.Module:
    """A bias-free 3x3 conv, or its depthwise separable form (3x3 per channel, then 1x1).

    The separable form costs ``9 C_in + C_in C_out`` weights instead of ``9 C_in C_out``.
    """
    check_choice("conv", kind, get_args(ConvKind))
    if kind == "standard":
        return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
    )


def _shortcut(in_channels: int, out_channels: int) -> nn.Module:
    """Identity, or a 1x1 conv when the residual branch changes the channel count."""
    if in_channels == out_channels:
        return nn.Identity()
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class PreActResBlock(nn.Module):
    """ResNet-v2 block: (norm -> act -> conv3x3) x 2, plus an identity or 1x1-conv shortcut.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output; a 1x1 conv shortcut is used when they differ.
        activation: ``"gelu"`` or ``"leaky_relu"``.
        norm: ``"batch"``, ``"instance"`` or ``"group"``, see :func:`make_norm`.
        preactivate: normalise and activate the input before the first conv; False when the
            input is the raw image (ResNet-v2 starts with a plain conv on the image).
        attention: ``"none"``, ``"se"`` or ``"cbam"`` on the branch's output, before the
            addition (as SE-ResNet).
        conv: ``"standard"`` or ``"depthwise_separable"`` 3x3 convs, see :func:`make_conv3x3`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        activation: Activation = "gelu",
        norm: Norm = "batch",
        preactivate: bool = True,
        attention: AttentionKind = "none",
        conv: ConvKind = "standard",
    ) -> None:
        super().__init__()
        # Convs have no bias: each is followed by a norm (directly or in the next block) whose
        # shift makes a bias redundant.
        # Identities keep the layer indices, so checkpoints of both kinds share their key names.
        self.residual = nn.Sequential(
            make_norm(norm, in_channels) if preactivate else nn.Identity(),
            make_activation(activation) if preactivate else nn.Identity(),
            make_conv3x3(in_channels, out_channels, conv),
            make_norm(norm, out_channels),
            make_activation(activation),
            make_conv3x3(out_channels, out_channels, conv),
        )
        # Not inside `residual`: residual[-1] stays the last conv (zero_init_residual's target).
        # None rather than an Identity without attention: the module tree, and so the weights
        # fingerprint of earlier predictions, stays what it was before attention existed.
        self.attention = None if attention == "none" else make_attention(attention, out_channels)
        self.shortcut = _shortcut(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.residual(x)
        if self.attention is not None:
            branch = self.attention(branch)
        return branch + self.shortcut(x)


class PostActBlock(nn.Module):
    """Plain block: (conv3x3 -> norm -> act) x 2, no shortcut (the "TwoConv" of MONAI's BasicUNet).

    The classic U-Net block, here as an option to measure against the seed's pre-activation
    residual block (docs/benchmarks.md, recipe ablation). Its output is normalised and
    activated, so a head after it needs only its 1x1 conv.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        activation: ``"gelu"`` or ``"leaky_relu"``.
        norm: ``"batch"``, ``"instance"`` or ``"group"``, see :func:`make_norm`.
        attention: ``"none"``, ``"se"`` or ``"cbam"`` on the block's output.
        conv: ``"standard"`` or ``"depthwise_separable"`` 3x3 convs, see :func:`make_conv3x3`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        activation: Activation = "gelu",
        norm: Norm = "batch",
        attention: AttentionKind = "none",
        conv: ConvKind = "standard",
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            make_conv3x3(in_channels, out_channels, conv),
            make_norm(norm, out_channels),
            make_activation(activation),
            make_conv3x3(out_channels, out_channels, conv),
            make_norm(norm, out_channels),
            make_activation(activation),
        )
        self.attention = None if attention == "none" else make_attention(attention, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if self.attention is None else self.attention(out)


class ConvNeXtBlock(nn.Module):
    """Bottleneck block: BN -> GELU -> depthwise kxk -> BN -> GELU -> 1x1 conv, plus a shortcut.

    The depthwise kernel buys receptive field cheaply (``k * k * C`` weights instead of
    ``k * k * C * C``); the 1x1 conv mixes channels.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output; a 1x1 conv shortcut is used when they differ.
        kernel_size: Odd side of the depthwise kernel.
        norm: ``"batch"``, ``"instance"`` or ``"group"``, see :func:`make_norm`.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 7, norm: Norm = "batch"
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be a positive odd number so 'same' padding keeps the size, "
                f"got {kernel_size}: use e.g. 5 or 7"
            )
        self.residual = nn.Sequential(
            make_norm(norm, in_channels),
            nn.GELU(),
            nn.Conv2d(
                in_channels,
                in_channels,
                kernel_size,
                padding=kernel_size // 2,
                groups=in_channels,
                bias=False,
            ),
            make_norm(norm, in_channels),
            nn.GELU(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        )
        self.shortcut = _shortcut(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class Down(nn.Module):
    """Halve height and width.

    ``"strided"`` is a 2x2 stride-2 conv from ``in_channels`` to ``out_channels``. ``"maxpool"``
    cannot change the width, so it ignores ``out_channels`` and keeps ``in_channels``; the next
    block widens through its 1x1 shortcut. Read :attr:`out_channels` to know what comes out.

    Args:
        in_channels: Channels of the input.
        out_channels: Requested channels of the output (``"strided"`` only).
        kind: ``"strided"`` or ``"maxpool"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kind: DownKind = "strided") -> None:
        super().__init__()
        check_choice("down", kind, get_args(DownKind))
        self.out_channels = out_channels if kind == "strided" else in_channels
        self.op: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 2, stride=2)
            if kind == "strided"
            else nn.MaxPool2d(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Up(nn.Module):
    """Double height and width and map ``in_channels`` to ``out_channels``.

    ``"transposed"`` is a 2x2 stride-2 transposed conv. ``"bilinear"`` interpolates
    (``align_corners=False``) and then applies a 3x3 conv, which avoids the checkerboard
    pattern of transposed convs at the cost of a conv at the fine resolution.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        kind: ``"transposed"`` or ``"bilinear"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kind: UpKind = "transposed") -> None:
        super().__init__()
        check_choice("up", kind, get_args(UpKind))
        self.op: nn.Module = (
            nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
            if kind == "transposed"
            else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)
