"""The exact theoretical receptive field of :class:`~joenet.model.unet.UNet2d`, from its config.

Prediction sizes its tile overlap from it, the README and the benchmarks report it.
"""

from __future__ import annotations

from typing import get_args

from joenet.model.blocks import DownKind, UpKind, check_choice


def check_config(
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
    check_choice("down", down, get_args(DownKind))
    check_choice("up", up, get_args(UpKind))


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
    check_config(num_levels, blocks_per_level, bottleneck_kernel_size, bottleneck_blocks, down, up)
    widths = []
    for position in range(2 ** (num_levels - 1)):
        lo, hi = _input_support(
            position, num_levels, blocks_per_level, bottleneck_kernel_size, bottleneck_blocks, up
        )
        widths.append(hi - lo + 1)
    return max(widths)
