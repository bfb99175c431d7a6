"""UNet2d: the Joe Net 1 U-Net, assembled from :mod:`joenet.model.blocks`.

Encoder levels of pre-activation residual blocks, a ConvNeXt-style depthwise bottleneck, a decoder
that concatenates the encoder skips, and a 1x1 head producing one logit channel per class
(channel 0 nuclei, channel 1 mito; the model itself does not care what the channels mean).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, get_args

import torch
from torch import nn

from joenet.model.blocks import (
    Activation,
    ConvNeXtBlock,
    Down,
    DownKind,
    Norm,
    PreActResBlock,
    Up,
    UpKind,
    make_activation,
    make_norm,
)


def _check_config(
    num_levels: int,
    blocks_per_level: int,
    bottleneck_kernel_size: int,
    bottleneck_blocks: int,
    down: str,
    up: str,
) -> None:
    if num_levels < 2:
        raise ValueError(
            f"a U-Net needs at least 2 levels (one encoder level and the bottleneck), "
            f"got {num_levels}: pass e.g. channels=(32, 64, 128, 256)"
        )
    if blocks_per_level < 1 or bottleneck_blocks < 1:
        raise ValueError(
            f"blocks_per_level and bottleneck_blocks must be >= 1, "
            f"got {blocks_per_level} and {bottleneck_blocks}"
        )
    if bottleneck_kernel_size < 1 or bottleneck_kernel_size % 2 == 0:
        raise ValueError(
            f"bottleneck_kernel_size must be a positive odd number, got {bottleneck_kernel_size}: "
            f"use e.g. 5 or 7"
        )
    if down not in get_args(DownKind):
        raise ValueError(f"down must be one of {list(get_args(DownKind))}, got {down!r}")
    if up not in get_args(UpKind):
        raise ValueError(f"up must be one of {list(get_args(UpKind))}, got {up!r}")


def _input_support(
    position: int,
    num_levels: int = 4,
    blocks_per_level: int = 1,
    bottleneck_kernel_size: int = 7,
    bottleneck_blocks: int = 1,
    up: str = "transposed",
) -> tuple[int, int]:
    """First and last input index (along one axis) that can reach output index ``position``.

    Walks the longest path (through the bottleneck) backwards, from the output to the input,
    mapping an inclusive interval of pixel indices through each layer. The input is taken as
    unbounded, so no border clipping. Skip paths need not be followed: their support is a subset.
    """
    lo = hi = position
    for _ in range(num_levels - 1):  # decoder levels, fine to coarse
        lo, hi = lo - 2 * blocks_per_level, hi + 2 * blocks_per_level  # two 3x3 convs per block
        if up == "transposed":
            # Kernel 2 == stride 2: fine pixel j is computed from coarse pixel j // 2 alone.
            lo, hi = lo // 2, hi // 2
        else:
            lo, hi = lo - 1, hi + 1  # the 3x3 conv after the interpolation
            # align_corners=False puts fine pixel j at coarse coordinate j / 2 - 1 / 4, so it
            # blends coarse pixels (j - 1) // 2 and (j + 1) // 2.
            lo, hi = (lo - 1) // 2, (hi + 1) // 2
    half = bottleneck_blocks * (bottleneck_kernel_size // 2)  # depthwise kxk convs
    lo, hi = lo - half, hi + half
    for _ in range(num_levels - 1):  # encoder levels, coarse to fine
        lo, hi = 2 * lo, 2 * hi + 1  # 2x2 stride-2 window: strided conv and max pool alike
        lo, hi = lo - 2 * blocks_per_level, hi + 2 * blocks_per_level
    return lo, hi


def receptive_field(
    num_levels: int = 4,
    blocks_per_level: int = 1,
    bottleneck_kernel_size: int = 7,
    bottleneck_blocks: int = 1,
    down: str = "strided",
    up: str = "transposed",
) -> int:
    """Theoretical receptive field of one output pixel of :class:`UNet2d`, in input pixels.

    Convention: the side length of the smallest square of input pixels outside which no input
    pixel can change the output pixel (away from the image border), maximised over output
    positions. The U-Net is not shift-invariant: with ``2 ** (num_levels - 1)`` downsampling,
    the support depends on the output position modulo that factor, and the largest one is
    reported. Every 3x3, kxk, 2x2 and 1x1 kernel counts in full (the count does not depend on
    weights), so a trained network's *effective* receptive field is smaller.

    It is computed exactly, by mapping an integer interval of pixel indices backwards through
    every layer on the longest path (encoder convs, downsamplings, bottleneck depthwise convs,
    upsamplings, decoder convs), rather than by the textbook recursion ``rf += (k - 1) * jump``:
    that recursion treats a stride-2 transposed conv as a 2x2 kernel at the coarse jump (126 for
    the defaults instead of the true 116) and misses index rounding, so it is neither exact nor a
    bound (bilinear with two blocks per level: 196 against the true 200). ``down`` does not
    change the result: a 2x2 stride-2 conv and a 2x2 max pool have the same support.

    Args:
        num_levels: ``len(channels)`` of the U-Net, bottleneck included.
        blocks_per_level: Residual blocks (two 3x3 convs each) per encoder and decoder level.
        bottleneck_kernel_size: Odd side of the bottleneck's depthwise kernel.
        bottleneck_blocks: ConvNeXt blocks in the bottleneck.
        down: ``"strided"`` or ``"maxpool"``.
        up: ``"transposed"`` or ``"bilinear"``.

    Returns:
        The receptive field side in input pixels (116 for the defaults).
    """
    _check_config(num_levels, blocks_per_level, bottleneck_kernel_size, bottleneck_blocks, down, up)
    widths = []
    for position in range(2 ** (num_levels - 1)):
        lo, hi = _input_support(
            position, num_levels, blocks_per_level, bottleneck_kernel_size, bottleneck_blocks, up
        )
        widths.append(hi - lo + 1)
    return max(widths)


def _stage(
    in_channels: int,
    out_channels: int,
    num_blocks: int,
    make_block: Callable[..., nn.Module],
    first_block: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Sequential:
    # Only the first block changes the width; the rest keep it.
    blocks = [make_block(in_channels, out_channels, **kwargs, **(first_block or {}))]
    blocks += [make_block(out_channels, out_channels, **kwargs) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class UNet2d(nn.Module):
    """2D U-Net with pre-activation residual levels and a ConvNeXt-style bottleneck.

    Args:
        in_channels: Channels of the input image (1 for grayscale EM).
        out_channels: Logit channels of the output (2: nuclei, mito).
        channels: Width of each level, finest first; the last one is the bottleneck, so the input
            is downsampled ``len(channels) - 1`` times.
        blocks_per_level: :class:`PreActResBlock` per encoder and per decoder level.
        activation: Activation of the residual blocks and the head (the bottleneck uses GELU).
        norm: ``"batch"`` (the seed's BatchNorm), ``"instance"`` or ``"group"``: see
            :func:`~joenet.model.blocks.make_norm`.
        input_norm: the first block normalises and activates the raw image before its first
            conv, as the seed's pre-activation block reads. False starts with a plain conv on
            the image, as ResNet-v2 does: on Lucchi it learned faster (docs/benchmarks.md).
        bottleneck_kernel_size: Odd side of the bottleneck's depthwise kernel.
        bottleneck_blocks: :class:`ConvNeXtBlock` in the bottleneck.
        down: ``"strided"`` (2x2 stride-2 conv) or ``"maxpool"``.
        up: ``"transposed"`` (2x2 stride-2 transposed conv) or ``"bilinear"`` (+ 3x3 conv).
        dropout: Channel dropout probability after the bottleneck; 0 disables it.
        zero_init_residual: zero the last conv of every residual branch, so each block starts
            as its shortcut (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): the signal
            passes the untrained network unchanged and early gradients are not scrambled by
            random branches. False is the seed's default initialisation.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (32, 64, 128, 256),
        blocks_per_level: int = 1,
        activation: Activation = "gelu",
        norm: Norm = "batch",
        input_norm: bool = True,
        bottleneck_kernel_size: int = 7,
        bottleneck_blocks: int = 1,
        down: DownKind = "strided",
        up: UpKind = "transposed",
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)  # also accepts an OmegaConf ListConfig
        _check_config(
            len(channels), blocks_per_level, bottleneck_kernel_size, bottleneck_blocks, down, up
        )
        if min(channels) < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"channel counts must be >= 1, got in_channels={in_channels}, "
                f"out_channels={out_channels}, channels={channels}"
            )
        if activation not in get_args(Activation):
            raise ValueError(
                f"activation must be one of {list(get_args(Activation))}, got {activation!r}"
            )
        if norm not in get_args(Norm):
            raise ValueError(f"norm must be one of {list(get_args(Norm))}, got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.channels = channels
        self._rf_config = dict(
            num_levels=len(channels),
            blocks_per_level=blocks_per_level,
            bottleneck_kernel_size=bottleneck_kernel_size,
            bottleneck_blocks=bottleneck_blocks,
            down=down,
            up=up,
        )

        self.encoder = nn.ModuleList()
        self.downs = nn.ModuleList()
        width = in_channels
        for i, level_channels in enumerate(channels[:-1]):
            self.encoder.append(
                _stage(
                    width,
                    level_channels,
                    blocks_per_level,
                    PreActResBlock,
                    activation=activation,
                    norm=norm,
                    first_block={"preactivate": input_norm} if i == 0 else None,
                )
            )
            downsample = Down(level_channels, channels[i + 1], down)
            self.downs.append(downsample)
            width = downsample.out_channels  # maxpool keeps the width: the next block widens
        self.bottleneck = _stage(
            width,
            channels[-1],
            bottleneck_blocks,
            ConvNeXtBlock,
            kernel_size=bottleneck_kernel_size,
            norm=norm,
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

        # Decoder modules are stored coarse to fine, the order forward() visits them.
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):
            self.ups.append(Up(channels[i + 1], channels[i], up))
            self.decoder.append(
                _stage(
                    2 * channels[i],
                    channels[i],
                    blocks_per_level,
                    PreActResBlock,
                    activation=activation,
                    norm=norm,
                )
            )
        # Pre-activation blocks output un-normalised sums, so the head normalises and activates
        # before its 1x1 conv, as the final BN-ReLU of ResNet-v2.
        self.head = nn.Sequential(
            make_norm(norm, channels[0]),
            make_activation(activation),
            nn.Conv2d(channels[0], out_channels, 1),
        )
        if zero_init_residual:
            for block in self.modules():
                if isinstance(block, PreActResBlock | ConvNeXtBlock):
                    nn.init.zeros_(block.residual[-1].weight)

    @property
    def divisor(self) -> int:
        """Input height and width must be multiples of this: ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)

    def receptive_field(self) -> int:
        """Theoretical receptive field of this model, see :func:`receptive_field`."""
        return receptive_field(**self._rf_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, in_channels, H, W)`` to logits ``(B, out_channels, H, W)``."""
        height, width = x.shape[-2:]
        d = self.divisor
        if height % d or width % d:
            raise ValueError(
                f"UNet2d needs height and width divisible by {d}, got {height}x{width}: crop or "
                f"pad the input (e.g. crop to {height // d * d}x{width // d * d} or pad to "
                f"{-(-height // d) * d}x{-(-width // d) * d})"
            )
        skips = []
        for stage, down in zip(self.encoder, self.downs, strict=True):
            x = stage(x)  # (B, channels[i], H / 2**i, W / 2**i)
            skips.append(x)
            x = down(x)
        x = self.dropout(self.bottleneck(x))  # (B, channels[-1], H / d, W / d)
        for up, stage, skip in zip(self.ups, self.decoder, reversed(skips), strict=True):
            x = stage(torch.cat([skip, up(x)], dim=1))  # cat: (B, 2 * channels[i], ...)
        return self.head(x)  # (B, out_channels, H, W)
