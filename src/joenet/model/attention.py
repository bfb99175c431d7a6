"""Attention inside the residual blocks, the seed's "future enhancements".

References:
    - Squeeze-and-excitation: Hu et al., "Squeeze-and-Excitation Networks" (2018).
    - CBAM: Woo et al., "CBAM: Convolutional Block Attention Module" (2018).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

AttentionKind = Literal["none", "se", "cbam"]


class SqueezeExcite(nn.Module):
    """Channel attention: scale each channel by a gate computed from the global average.

    Args:
        channels: Channels of the input (and output).
        reduction: Hidden width of the gate is ``channels // reduction`` (at least 4).
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Channel attention (average- and max-pooled, one shared MLP), then spatial attention
    (a 7x7 conv over the channel mean and max).

    Args:
        channels: Channels of the input (and output).
        reduction: Hidden width of the channel MLP is ``channels // reduction`` (at least 4).
        kernel_size: Side of the spatial attention's conv.
    """

    def __init__(self, channels: int, reduction: int = 8, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        x = x * pooled.sigmoid()
        stats = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * self.spatial(stats).sigmoid()


def make_attention(kind: AttentionKind, channels: int) -> nn.Module:
    """The attention of a residual branch: none (identity), ``se`` or ``cbam``."""
    if kind not in get_args(AttentionKind):
        raise ValueError(f"attention must be one of {list(get_args(AttentionKind))}, got {kind!r}")
    if kind == "se":
        return SqueezeExcite(channels)
    if kind == "cbam":
        return CBAM(channels)
    return nn.Identity()
