"""Tiled prediction equals whole-slice prediction where tiles sit on the network's grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from joenet.model import UNet2d
from joenet.predict.input_image import InputImage
from joenet.predict.tiling import (
    PlanePredictor,
    check_tiling,
    per_sample_norm,
    plan_axis,
    tile_margin,
    tile_step,
)


def _random_bn_net(channels: tuple[int, ...] = (4, 8, 16, 32)) -> nn.Module:
    """A random tiny UNet2d in eval mode with non-trivial BatchNorm statistics."""
    generator = torch.Generator().manual_seed(0)
    net = UNet2d(channels=channels)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return net.eval()


def _tiled_and_whole(
    net: nn.Module, size: int, tile: int, overlap: int, grid: int, blending: str = "gaussian"
) -> tuple[np.ndarray, np.ndarray]:
    """Whole-slice probabilities and the tiled ones of four blocks, as the block loop reads them."""
    raw = zarr.create_array(
        zarr.storage.MemoryStore(), shape=(1, size, size), dtype=np.uint8, chunks=(1, 160, 160)
    )
    yy, xx = np.mgrid[:size, :size]
    raw[0] = (127 + 80 * np.sin(yy / 9.0) * np.cos(xx / 13.0) + 40 * np.sin(xx / 3.0)).astype(
        np.uint8
    )
    source = InputImage(raw, leading=0, voxel_size_nm=None, where="memory")
    unit = {"kind": "dtype_range"}
    with torch.inference_mode():
        image = torch.from_numpy(source.read(((0, 1), (0, size), (0, size)), unit))[:, None]
        whole = net(image).sigmoid()[0].numpy()  # (C, H, W)
    predictor = PlanePredictor(net, torch.device("cpu"), batch_size=4, blending=blending)
    margin = tile_margin(overlap, net.receptive_field())
    tiled = np.zeros_like(whole)
    half = size // 2
    for lo_y, hi_y in ((0, half), (half, size)):
        for lo_x, hi_x in ((0, half), (half, size)):
            ty = plan_axis(lo_y, hi_y, size, tile, overlap, margin, grid)
            tx = plan_axis(lo_x, hi_x, size, tile, overlap, margin, grid)
            assert all(origin % grid == 0 for origin in ty.origins + tx.origins)
            window = source.read(((0, 1), (ty.start, ty.stop), (tx.start, tx.stop)), unit)
            probs = predictor.predict(window, ty, tx, (lo_y, hi_y), (lo_x, hi_x))
            tiled[:, lo_y:hi_y, lo_x:hi_x] = probs[0]
    return tiled, whole


@pytest.mark.parametrize("blending", ["gaussian", "constant"])
def test_tiled_equals_whole_slice(blending: str) -> None:
    size, tile, overlap = 320, 192, 128  # overlap >= receptive field (116): exact
    net = _random_bn_net()
    tiled, whole = _tiled_and_whole(net, size, tile, overlap, tile_step(net.divisor), blending)
    inner = (slice(None), slice(64, size - 64), slice(64, size - 64))  # away from the border
    assert np.abs(tiled[inner] - whole[inner]).max() < 1e-3
    assert np.abs(tiled - whole).max() > 1e-3  # the border differs: reflection vs zero padding


def test_a_six_level_network_tiles_on_its_own_divisor() -> None:
    # 6 levels (divisor 32): its tiles must start on multiples of 32, which the 16 px grid of
    # 4-5 levels does not give (a 16 px shift changes what its strided convs sample).
    net = _random_bn_net((2, 4, 4, 4, 4, 4))
    assert net.divisor == 32 and tile_step(net.divisor) == 32 and tile_step(8) == 16
    overlap = -(-net.receptive_field() // 32) * 32
    size, tile = 2 * (overlap + 64), overlap + 64
    inner = (slice(None), slice(64, size - 64), slice(64, size - 64))
    tiled, whole = _tiled_and_whole(net, size, tile, overlap, grid=32)
    assert np.abs(tiled[inner] - whole[inner]).max() < 1e-3
    margin = tile_margin(overlap, net.receptive_field())
    on_16 = plan_axis(size // 2, size, size, tile, overlap, margin, grid=16).origins
    assert any(origin % 32 for origin in on_16)
    with pytest.raises(ValueError, match="multiple of 32 px"):
        check_tiling(256, 48, step=32)


def test_per_sample_norms_are_told_that_tiles_differ(caplog: pytest.LogCaptureFixture) -> None:
    # InstanceNorm (the default config's) normalises each tile alone: the overlap advice must not
    # promise that a larger overlap makes tiled and whole-slice predictions equal.
    import logging

    from joenet.predict.checks import check_overlap

    instance = UNet2d(channels=(4, 8), norm="instance")
    assert per_sample_norm(instance) and per_sample_norm(UNet2d(channels=(4, 8), norm="group"))
    assert not per_sample_norm(_random_bn_net())
    with caplog.at_level(logging.INFO, logger="joenet"):
        check_overlap(64, 80, per_sample_norm=False)
        assert "predictions equal" in caplog.text
        caplog.clear()
        check_overlap(64, 80, per_sample_norm=True)
    assert "normalised by its own statistics" in caplog.text
    assert "predictions equal" not in caplog.text
