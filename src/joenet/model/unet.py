"""UNet2d: the Joe Net 1 U-Net, assembled from :mod:`joenet.model.blocks`.

Encoder levels of pre-activation residual blocks, a ConvNeXt-style depthwise bottleneck, a decoder
that concatenates the encoder skips, and a 1x1 head producing one logit channel per class
(channel 0 nuclei, channel 1 mito; the model itself does not care what the channels mean).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_args

import torch
from torch import nn

from joenet.model.attention import AttentionKind
from joenet.model.blocks import (
    Activation,
    BlockKind,
    ConvKind,
    ConvNeXtBlock,
    Down,
    DownKind,
    Norm,
    PostActBlock,
    PreActResBlock,
    Up,
    UpKind,
    check_choice,
    make_activation,
    make_norm,
)
from joenet.model.receptive_field import check_config, receptive_field


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
        blocks_per_level: Blocks per encoder and per decoder level.
        block: ``"preact"`` (the seed's pre-activation residual block, :class:`PreActResBlock`)
            or ``"postact"`` (conv-norm-act twice without a shortcut, as MONAI's BasicUNet:
            :class:`PostActBlock`); the bottleneck is ConvNeXt-style either way.
        attention: ``"none"``, ``"se"`` (squeeze-and-excitation) or ``"cbam"`` in every
            encoder and decoder block.
        conv: ``"standard"`` or ``"depthwise_separable"`` (MobileNet-style) 3x3 convs in the
            encoder and decoder blocks.
        deep_supervision: auxiliary 1x1 heads on this many decoder levels below the finest
            (1/2, 1/4, ... resolution), for :meth:`forward_with_aux` in training; ``forward``
            (inference, prediction, export) ignores them. 0 disables them.
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
        block: BlockKind = "preact",
        attention: AttentionKind = "none",
        conv: ConvKind = "standard",
        deep_supervision: int = 0,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)  # also accepts an OmegaConf ListConfig
        check_config(
            len(channels), blocks_per_level, bottleneck_kernel_size, bottleneck_blocks, down, up
        )
        if min(channels) < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"channel counts must be >= 1, got in_channels={in_channels}, "
                f"out_channels={out_channels}, channels={channels}"
            )
        check_choice("activation", activation, get_args(Activation))
        check_choice("norm", norm, get_args(Norm))
        check_choice("block", block, get_args(BlockKind))
        if block == "postact" and input_norm:
            raise ValueError(
                "input_norm=true needs block=preact: a post-activation block starts with a plain "
                "conv on the image"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0 <= deep_supervision <= len(channels) - 2:
            raise ValueError(
                f"deep_supervision must be in [0, {len(channels) - 2}] for {len(channels)} "
                f"levels (one head per decoder level below the finest), got {deep_supervision}"
            )
        self.channels = channels
        self._rf_config = dict(
            num_levels=len(channels),
            blocks_per_level=blocks_per_level,
            bottleneck_kernel_size=bottleneck_kernel_size,
            bottleneck_blocks=bottleneck_blocks,
            down=down,
            up=up,
        )

        block_options = {
            "activation": activation,
            "norm": norm,
            "attention": attention,
            "conv": conv,
        }
        width = self._build_encoder(
            in_channels, blocks_per_level, block, block_options, input_norm, down
        )
        self.bottleneck = _stage(
            width,
            channels[-1],
            bottleneck_blocks,
            ConvNeXtBlock,
            kernel_size=bottleneck_kernel_size,
            norm=norm,
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

        self._build_decoder(blocks_per_level, block, block_options, up)
        # Pre-activation blocks output un-normalised sums, so the head normalises and activates
        # before its 1x1 conv, as the final BN-ReLU of ResNet-v2; post-activation blocks already
        # did. Identities keep the conv at head.2 for both.
        preact = block == "preact"

        def head(width: int) -> nn.Sequential:
            return nn.Sequential(
                make_norm(norm, width) if preact else nn.Identity(),
                make_activation(activation) if preact else nn.Identity(),
                nn.Conv2d(width, out_channels, 1),
            )

        self.head = head(channels[0])
        # aux_heads[k - 1] reads decoder level k (1/2**k resolution).
        # Registered only when used, so that the module tree of networks without it (and their
        # weights fingerprint) stays what it was before deep supervision existed.
        self.aux_heads: nn.ModuleList | None = None
        if deep_supervision:
            self.aux_heads = nn.ModuleList(
                head(channels[k]) for k in range(1, deep_supervision + 1)
            )
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, PreActResBlock | ConvNeXtBlock):
                    # The branch's last conv (the pointwise one of a depthwise separable pair).
                    convs = [m for m in module.residual[-1].modules() if isinstance(m, nn.Conv2d)]
                    nn.init.zeros_(convs[-1].weight)

    def _build_encoder(
        self,
        in_channels: int,
        blocks_per_level: int,
        block: BlockKind,
        block_options: dict[str, Any],
        input_norm: bool,
        down: DownKind,
    ) -> int:
        """Encoder levels and downsamplings, finest first; returns the width into the bottleneck."""
        channels = self.channels
        self.encoder = nn.ModuleList()
        self.downs = nn.ModuleList()
        width = in_channels
        preact = block == "preact"
        for i, level_channels in enumerate(channels[:-1]):
            self.encoder.append(
                _stage(
                    width,
                    level_channels,
                    blocks_per_level,
                    PreActResBlock if preact else PostActBlock,
                    **block_options,
                    first_block={"preactivate": input_norm} if i == 0 and preact else None,
                )
            )
            downsample = Down(level_channels, channels[i + 1], down)
            self.downs.append(downsample)
            width = downsample.out_channels  # maxpool keeps the width: the next block widens
        return width

    def _build_decoder(
        self,
        blocks_per_level: int,
        block: BlockKind,
        block_options: dict[str, Any],
        up: UpKind,
    ) -> None:
        channels = self.channels
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
                    PreActResBlock if block == "preact" else PostActBlock,
                    **block_options,
                )
            )

    @property
    def divisor(self) -> int:
        """Input height and width must be multiples of this: ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)

    def receptive_field(self) -> int:
        """Theoretical receptive field of this model, see :func:`receptive_field`."""
        return receptive_field(**self._rf_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, in_channels, H, W)`` to logits ``(B, out_channels, H, W)``."""
        return self.forward_with_aux(x, aux=False)[0]

    def forward_with_aux(
        self, x: torch.Tensor, aux: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and, with ``aux``, the auxiliary heads' logits of deep supervision.

        Returns:
            ``(logits, aux_logits)``: ``aux_logits[k - 1]`` is ``(B, out_channels, H / 2**k,
            W / 2**k)`` for k = 1 .. ``deep_supervision``; empty without ``aux``.
        """
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
        levels = len(skips)
        aux_logits: list[torch.Tensor] = []
        for i, (up, stage, skip) in enumerate(
            zip(self.ups, self.decoder, reversed(skips), strict=True)
        ):
            x = stage(torch.cat([skip, up(x)], dim=1))  # cat: (B, 2 * channels[i], ...)
            level = levels - 1 - i
            if aux and self.aux_heads is not None and 1 <= level <= len(self.aux_heads):
                aux_logits.insert(0, self.aux_heads[level - 1](x))
        return self.head(x), aux_logits  # (B, out_channels, H, W)


# The seed's output channels, in order: one sigmoid channel per class.
DEFAULT_CLASS_NAMES = ("nuclei", "mito")


def build_network(
    class_names: Sequence[str] | None = None, net: Mapping[str, Any] | None = None
) -> UNet2d:
    """The network a training run builds: one input channel, one output per class.

    Args:
        class_names: the classes, in channel order (``model.class_names``); None: the seed's.
        net: keyword arguments of :class:`UNet2d` (``model.net``).
    """
    names = list(class_names or DEFAULT_CLASS_NAMES)
    return UNet2d(in_channels=1, out_channels=len(names), **dict(net or {}))
