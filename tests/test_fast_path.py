"""Prediction's fast path: channels_last and torch.compile compute what the eager network does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from joenet.predict import predict_volume
from joenet.predict import work_units as block_ops
from joenet.predict.fast_path import (
    CPU_COMPILE_MIN_TILES,
    check_compile,
    inference_network,
    resolve_compile,
)
from tests.test_predict import FAST, _random_bn_net


def test_compiled_network_matches_eager_for_every_batch_and_shape() -> None:
    net = _random_bn_net()
    first = next(net.parameters()).detach().clone()
    fast = inference_network(net, compile=True, input_shape=(2, 1, 64, 64))
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for tiles in (x[:2], x[:1], x, torch.rand(1, 1, 48, 80)):  # full, padded, too big, odd
            eager = net(tiles)
            out = fast(tiles)
            assert out.shape == eager.shape
            assert (out - eager).abs().max().item() < 1e-4
    # The trained network itself is untouched (folding copies it; no layout change in place).
    assert torch.equal(next(net.parameters()), first)
    assert next(net.parameters()).is_contiguous()


def test_channels_last_without_folding_leaves_the_network_alone() -> None:
    net = _random_bn_net()
    fast = inference_network(net, fold=False, channels_last=True)
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert (fast(x) - net(x)).abs().max().item() < 1e-5
    assert all(p.is_contiguous() for p in net.parameters())


def test_compile_auto_pays_off_only_on_long_cpu_runs() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not resolve_compile("auto", cpu, CPU_COMPILE_MIN_TILES - 1)
    assert resolve_compile("auto", cpu, CPU_COMPILE_MIN_TILES)
    assert not resolve_compile("auto", gpu, 10**6)  # not measured on a GPU: eager there
    assert resolve_compile(True, cpu, 1) and not resolve_compile("false", cpu, 10**6)
    with pytest.raises(ValueError, match="compile must be true, false or auto, got 'yes'"):
        check_compile("yes")


def test_tile_count_is_the_forward_passes_made(
    ckpt_path: Path, volume_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted: list[int] = []
    make_predictor = block_ops.make_predictor.__wrapped__

    def counting_predictor(job: block_ops.BlockJob) -> object:
        predictor = make_predictor(job)
        net = predictor.net

        def forward(x: torch.Tensor) -> torch.Tensor:
            counted.append(x.shape[0])
            return net(x)

        predictor.net = forward
        return predictor

    seen: dict[str, int] = {}
    count_tiles = block_ops.count_tiles

    def record_count(job: block_ops.BlockJob, shape: tuple[int, ...], blocks: list) -> int:
        seen["tiles"] = count_tiles(job, shape, blocks)
        return seen["tiles"]

    monkeypatch.setattr(block_ops, "make_predictor", counting_predictor)
    monkeypatch.setattr("joenet.predict.pipeline.count_tiles", record_count)
    predict_volume(
        ckpt_path,
        volume_path,
        tmp_path / "p.zarr",
        z_range=[1, 4],
        tta=True,
        tile=64,
        overlap=32,
        **FAST,
    )
    assert seen["tiles"] == sum(counted) > 0


def test_compiled_prediction_matches_the_eager_one(
    ckpt_path: Path, volume_path: Path, reference: Path, tmp_path: Path
) -> None:
    compiled = predict_volume(
        ckpt_path, volume_path, tmp_path / "compiled.zarr", z_range=[0, 4], compile=True, **FAST
    )
    eager = predict_volume(
        ckpt_path,
        volume_path,
        tmp_path / "eager.zarr",
        z_range=[0, 4],
        channels_last=False,
        compile=False,
        **FAST,
    )
    for other in (compiled, eager):
        ours, theirs = zarr.open_group(str(reference), mode="r"), zarr.open_group(str(other))
        for name in ("nuclei", "mito"):
            a, b = ours[name][:4].astype(int), theirs[name][:4].astype(int)
            assert np.abs(a - b).max() <= 1 and (a == b).mean() >= 0.999
        # Float rounding only: an output made one way resumes the other way.
        meta = ours.attrs["joenet"]["fingerprint"]
        assert meta == theirs.attrs["joenet"]["fingerprint"] | {"input": meta["input"]}
