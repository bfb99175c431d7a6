"""Tiles over a plane, their blending weights, and batched tile prediction (with TTA).

Why tiles step by multiples of the network's divisor (16 for the default 5 levels, 32 for 6; at
least 16, see :func:`tile_step`): with BatchNorm in eval mode the U-Net is equivariant only to
shifts that are multiples of its divisor, so a tile whose origin is such a multiple computes
exactly what a whole-slice prediction computes at the same pixels, wherever it sees the same
context. A pixel has that context when it lies at least half a receptive field inside its tile,
so each tile contributes only away from its edges: a hard margin of
``min(overlap // 2, ceil(receptive_field / 2))`` px is zero-weighted (except on sides that touch
the volume border, where no tile has more context), and the rest is blended with a Gaussian
window (sigma = tile / 8, as nnU-Net) normalised by the summed weights. With
``overlap >= receptive_field`` (236 px for the default UNet2d) tiled prediction therefore equals
whole-slice prediction up to float rounding; with the default 64 px, pixels keep at least 32 px of
context and differences stay small.

That holds for BatchNorm (the seed's ``model.net.norm=batch``). A network that normalises per
sample (InstanceNorm, the default config's, or GroupNorm) normalises each tile by its own
statistics, so no overlap makes tiles exactly whole slices: measured on Lucchi
(``benchmarks/tiling_seams.py``, ``time_to_accuracy.py --tiled``), 256 px tiles moved the
probabilities by 0.003-0.03 on average and mito IoU by -0.03 to +0.01 against whole slices, as
much for MONAI's BasicUNet, which uses InstanceNorm too. Averaging each InstanceNorm's statistics
over training tiles instead (as BatchNorm's running statistics do) made tiles exact but lost
everything (IoU 0), so tiles keep their own statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from joenet.config import cpu_has_bf16_matrix_units

Blending = Literal["gaussian", "constant"]
Precision = Literal["auto", "32", "bf16", "16"]
# Tile origins and sizes are multiples of this at least. It stays 16 for networks of fewer
# levels (the seed's 4, divisor 8) so that their tile layouts, and so their outputs, are what
# earlier versions wrote.
STEP = 16
_ACCUMULATOR_BYTES = 64 * 2**20  # slices predicted together: bounds the accumulator's memory


def tile_step(divisor: int) -> int:
    """The grid tiles are placed on for a network whose inputs are multiples of ``divisor``."""
    return max(STEP, divisor)  # both powers of 2: a multiple of either


def per_sample_norm(net: nn.Module) -> bool:
    """Whether ``net`` normalises each input by its own statistics (InstanceNorm, GroupNorm)."""
    return any(isinstance(m, nn.InstanceNorm2d | nn.GroupNorm) for m in net.modules())


def check_tiling(tile: int, overlap: int, step: int = STEP) -> None:
    """Raise a ``ValueError`` that says the fix when ``tile``/``overlap`` cannot be used.

    ``step``: the network's :func:`tile_step` (checked again once the checkpoint is loaded).
    """
    if tile <= 0 or tile % step:
        raise ValueError(
            f"tile must be a positive multiple of {step} px (the model's tile step), got "
            f"{tile}: use e.g. 256"
        )
    if overlap < 0 or overlap % step:
        raise ValueError(
            f"overlap must be a multiple of {step} px (tiles step by tile - overlap, and the "
            f"model is shift-equivariant only for multiples of its divisor), got {overlap}: "
            f"use e.g. {max(64, step)}"
        )
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than tile ({tile})")


def tile_margin(overlap: int, receptive_field: int) -> int:
    """Pixels zero-weighted along each inner tile edge: as much context as coverage allows."""
    return min(overlap // 2, (receptive_field + 1) // 2)


@dataclass(frozen=True)
class AxisTiles:
    """Tile layout along one axis of a plane.

    Args:
        start: first pixel read (volume coordinates; negative means reflection padding).
        stop: one past the last pixel read (beyond the volume length: reflection padding).
        size: tile size along this axis.
        origins: tile origins, volume coordinates, multiples of the network's tile step.
        margins: per tile, (low, high) zero-weighted pixels.
    """

    start: int
    stop: int
    size: int
    origins: tuple[int, ...]
    margins: tuple[tuple[int, int], ...]


def plan_axis(
    lo: int, hi: int, length: int, tile: int, overlap: int, margin: int, grid: int = STEP
) -> AxisTiles:
    """Tiles whose weighted interiors cover ``[lo, hi)`` of an axis of ``length`` px.

    ``grid``: the network's :func:`tile_step`; origins and a lone tile's size are multiples of it.
    """
    if length <= tile:  # one tile for the whole axis, no more than the rounding needs
        size = -(-length // grid) * grid
        return AxisTiles(0, size, size, (0,), ((0, 0),))
    step = tile - overlap
    origin = 0 if lo == 0 else (lo - margin) // grid * grid
    origins, margins = [], []
    while True:
        low = 0 if origin <= 0 else margin
        high = 0 if origin + tile >= length else margin
        origins.append(origin)
        margins.append((low, high))
        if origin + tile - high >= hi:
            break
        origin += step
    return AxisTiles(origins[0], origins[-1] + tile, tile, tuple(origins), tuple(margins))


def window_1d(size: int, low: int, high: int, blending: Blending) -> np.ndarray:
    """Blending weight along one tile axis, zero on the hard margins."""
    if blending == "gaussian":
        center, sigma = (size - 1) / 2, size / 8
        weight = np.exp(-0.5 * ((np.arange(size) - center) / sigma) ** 2)
    else:
        weight = np.ones(size)
    weight[:low] = 0.0
    weight[size - high :] = 0.0
    return weight.astype(np.float32)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision``; None runs in fp32.

    ``auto``: bf16 on CUDA GPUs with bf16 and on CPUs with AMX (``cpu_has_bf16_matrix_units``,
    as training), where the default network's prediction ran 1.65-1.73x faster than in fp32
    with probabilities within 8/255 (``benchmarks/predict_bench.py --precision 32,bf16``,
    docs/benchmarks.md; tests/test_bf16_prediction.py); fp32 on every other CPU (bf16 there is
    emulated, ~400x slower).
    """
    precision = str(precision)
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16_matrix_units() else None
    choices = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
    if precision not in choices:
        raise ValueError(f"precision must be one of auto, 32, bf16, 16; got {precision!r}")
    return choices[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """The ``precision`` value that :func:`autocast_dtype` maps to ``dtype``."""
    return {None: "32", torch.bfloat16: "bf16", torch.float16: "16"}[dtype]


# The 8 elements of the dihedral group of the square: (quarter turns, flip first).
DIHEDRAL = tuple((turns, flip) for flip in (False, True) for turns in range(4))


class PlanePredictor:
    """Predict probabilities for stacks of 2D planes, tile by tile, in batches.

    Args:
        net: the network (or its inference form, see ``fast_path``), in eval mode, on ``device``.
        device: where tiles are predicted and blended.
        batch_size: tiles per forward pass.
        precision: ``auto``, ``32``, ``bf16`` or ``16`` (autocast dtype of the forward pass).
        tta: average the probabilities of the 8 flips/rotations of each tile.
        blending: ``gaussian`` or ``constant`` weights inside the hard margins.
    """

    def __init__(
        self,
        net: Callable[[Tensor], Tensor],
        device: torch.device,
        batch_size: int = 8,
        precision: str = "auto",
        tta: bool = False,
        blending: Blending = "gaussian",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if blending not in ("gaussian", "constant"):
            raise ValueError(f"blending must be 'gaussian' or 'constant', got {blending!r}")
        self.net = net
        self.device = device
        self.batch_size = batch_size
        self.dtype = autocast_dtype(precision, device)
        self.transforms = DIHEDRAL if tta else DIHEDRAL[:1]
        self.blending = blending
        self._weights: dict[tuple, Tensor] = {}

    def _weight(
        self, size_a: int, margin_a: tuple[int, int], size_b: int, margin_b: tuple[int, int]
    ) -> Tensor:
        key = (size_a, margin_a, size_b, margin_b)
        if key not in self._weights:  # a handful of variants: inner, edge and corner tiles
            wa = window_1d(size_a, *margin_a, self.blending)
            wb = window_1d(size_b, *margin_b, self.blending)
            self._weights[key] = torch.from_numpy(np.outer(wa, wb)).to(self.device)
        return self._weights[key]

    def forward_tiles(self, x: Tensor) -> Tensor:
        """Probabilities ``(B, C, h, w)`` float32 of tiles ``(B, 1, h, w)``, averaged over TTA."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        total: Tensor | None = None
        with torch.inference_mode(), autocast:
            for turns, flip in self.transforms:
                view = x.flip(-1) if flip else x
                view = torch.rot90(view, turns, dims=(-2, -1)) if turns else view
                probs = self.net(view).float().sigmoid()
                probs = torch.rot90(probs, -turns, dims=(-2, -1)) if turns else probs
                probs = probs.flip(-1) if flip else probs
                total = probs if total is None else total + probs
        assert total is not None  # transforms always holds the identity
        return total / len(self.transforms)

    def predict(
        self,
        images: np.ndarray,
        tiles_a: AxisTiles,
        tiles_b: AxisTiles,
        region_a: tuple[int, int],
        region_b: tuple[int, int],
    ) -> np.ndarray:
        """Blend tile predictions over planes and crop them to a region.

        Args:
            images: ``(S, A, B)`` float32 planes covering ``[tiles_a.start, tiles_a.stop)`` x
                ``[tiles_b.start, tiles_b.stop)`` (reflection-padded where outside the volume).
            tiles_a: tile layout along the planes' first axis.
            tiles_b: tile layout along the second axis.
            region_a: ``[lo, hi)`` to return along the first axis, volume coordinates.
            region_b: the same along the second axis.

        Returns:
            ``(S, C, hi_a - lo_a, hi_b - lo_b)`` float32 probabilities.
        """
        ha, hb = tiles_a.size, tiles_b.size
        placements = [  # (origin a, origin b, weight) in the window's coordinates
            (oa - tiles_a.start, ob - tiles_b.start, self._weight(ha, ma, hb, mb))
            for oa, ma in zip(tiles_a.origins, tiles_a.margins, strict=True)
            for ob, mb in zip(tiles_b.origins, tiles_b.margins, strict=True)
        ]
        num_slices, height, width = images.shape
        weight_sum = torch.zeros(height, width, device=self.device)
        for ya, xb, weight in placements:  # the same for every slice
            weight_sum[ya : ya + ha, xb : xb + hb] += weight
        crop_a = slice(region_a[0] - tiles_a.start, region_a[1] - tiles_a.start)
        crop_b = slice(region_b[0] - tiles_b.start, region_b[1] - tiles_b.start)
        if not bool((weight_sum[crop_a, crop_b] > 0).all()):
            raise RuntimeError("tile layout leaves pixels uncovered: this is a joenet bug")
        planes = torch.from_numpy(images)
        out = None
        group = max(1, _ACCUMULATOR_BYTES // (8 * height * width))
        for first in range(0, num_slices, group):
            stop = min(first + group, num_slices)
            accum = None
            for batch in _batches(range(first, stop), placements, self.batch_size):
                tiles = [planes[s, ya : ya + ha, xb : xb + hb] for s, ya, xb, _ in batch]
                x = torch.stack(tiles)[:, None].to(self.device, non_blocking=True)  # (B, 1, h, w)
                probs = self.forward_tiles(x)  # (B, C, h, w)
                if accum is None:
                    shape = (stop - first, probs.shape[1], height, width)
                    accum = torch.zeros(shape, device=self.device)
                for i, (s, ya, xb, weight) in enumerate(batch):
                    accum[s - first, :, ya : ya + ha, xb : xb + hb] += probs[i] * weight
            result = (accum[:, :, crop_a, crop_b] / weight_sum[crop_a, crop_b]).cpu().numpy()
            if out is None:
                out = np.empty((num_slices, *result.shape[1:]), dtype=np.float32)
            out[first:stop] = result
        assert out is not None  # at least one slice
        return out


def _batches(slices: range, placements: list, batch_size: int) -> Iterator[list[tuple]]:
    """Groups of ``batch_size`` (slice, tile origin a, tile origin b, weight)."""
    batch = []
    for s in slices:
        for ya, xb, weight in placements:
            batch.append((s, ya, xb, weight))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch
