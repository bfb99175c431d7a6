"""Prediction's fast path: channels_last and torch.compile compute what the eager network does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch._dynamo.utils import counters

from joenet.predict import predict_volume, worker
from joenet.predict import work_units as block_ops
from joenet.predict.fast_path import (
    CPU_COMPILE_MIN_TILES,
    check_compile,
    inference_network,
    resolve_channels_last,
    resolve_compile,
)
from tests.test_predict import FAST
from tests.test_tiling import _random_bn_net


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Forget compiled frames after each test: dynamo remembers the shapes a frame saw, and a
    later ``torch.compile`` of the same UNet2d code (the training tests') would otherwise
    compile it with dynamic shapes."""
    yield
    torch._dynamo.reset()


def test_channels_last_auto_is_off_for_per_sample_norms_run_eager_on_a_cpu_only() -> None:
    # InstanceNorm networks (the default) measured 0.91x per tile in channels_last on a CPU
    # eager and 1.10x compiled, BatchNorm ones 1.13x (fold_bench); true/false is always obeyed.
    from joenet.model import UNet2d

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    instance, batch = UNet2d(channels=[4, 8], norm="instance"), UNet2d(channels=[4, 8])
    assert resolve_channels_last("auto", instance, cpu) is False
    assert resolve_channels_last("auto", instance, cpu, compiled=True) is True
    assert resolve_channels_last(False, instance, cpu, compiled=True) is False
    assert resolve_channels_last("auto", batch, cpu) is True
    assert resolve_channels_last("AUTO", instance, cuda) is True
    assert resolve_channels_last(True, instance, cpu) is True
    assert resolve_channels_last(False, batch, cuda) is False
    with pytest.raises(ValueError, match="channels_last must be true, false or auto, got 'yes'"):
        resolve_channels_last("yes", batch, cpu)


def test_compiled_network_matches_eager_for_every_batch_and_shape() -> None:
    net = _random_bn_net()
    first = next(net.parameters()).detach().clone()
    fast = inference_network(net, compile=True, input_shape=(2, 1, 64, 64))
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    counters.clear()
    with torch.inference_mode():
        for tiles in (x[:2], x[:1], x, torch.rand(1, 1, 48, 80)):  # full, padded, too big, odd
            eager = net(tiles)
            out = fast(tiles)
            assert out.shape == eager.shape
            assert (out - eager).abs().max().item() < 1e-4
    if torch.backends.mkldnn.is_available():  # frozen weights are what inductor pre-packs
        assert counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"] > 0
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
    make_predictor = worker.make_predictor.__wrapped__

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

    monkeypatch.setattr(worker, "make_predictor", counting_predictor)
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


def test_prediction_picks_the_layout_after_compile_and_prepares_the_network_once(
    ckpt_path: Path, volume_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tiny checkpoint uses InstanceNorm (the default): channels_last measured 0.91x eager on a
    # CPU and 1.08x compiled (fold_bench), so auto follows compile. One prepared copy per run
    # keys the compile cache and runs (it cost ~0.2 s, and was made twice).
    made, seen = [], []
    prepare, form = worker.prepared_network, worker.inference_form

    def preparing(net: torch.nn.Module, **kwargs: bool) -> torch.nn.Module:
        made.append(kwargs)
        return prepare(net, **kwargs)

    def recording(prepared: torch.nn.Module, *, channels_last: bool, compile: bool, **kw: object):
        convs = [m for m in prepared.modules() if isinstance(m, torch.nn.Conv2d)]
        weight = next(m.weight for m in convs if m.in_channels > 1 and m.kernel_size == (3, 3))
        layout = not weight.is_contiguous()  # a 3 x 3 kernel's layouts differ (a 1 x 1's do not)
        assert layout == weight.is_contiguous(memory_format=torch.channels_last)
        seen.append((compile, channels_last, layout))
        return form(prepared, channels_last=channels_last, compile=False, **kw)  # no compile

    monkeypatch.setattr(worker, "prepared_network", preparing)
    monkeypatch.setattr(worker, "inference_form", recording)
    for compile in ("false", "true", "auto"):
        for cached in (worker._prepared, worker._network, worker.make_predictor):
            cached.cache_clear()  # as in a new process
        made.clear()
        output = tmp_path / f"{compile}.zarr"
        predict_volume(ckpt_path, volume_path, output, z_range=[0, 1], compile=compile, **FAST)
        assert len(made) == 1, compile
    # auto on 1 slice of 96 px (one tile): eager, in the eager layout
    assert seen == [(False, False, False), (True, True, True), (False, False, False)]


@pytest.mark.parametrize(
    "options",
    [
        {"fold_batchnorms": False},  # the BatchNorms as trained
        {"channels_last": False, "compile": False},  # the plain eager layout
    ],  # compiled: test_compiled_cache.py (the tiny volume is smaller than a tile: eager here)
    ids=["unfolded", "contiguous"],
)
def test_fast_path_options_predict_what_the_default_does(
    options: dict, ckpt_path: Path, volume_path: Path, reference: Path, tmp_path: Path
) -> None:
    other = predict_volume(
        ckpt_path, volume_path, tmp_path / "other.zarr", z_range=[0, 4], **options, **FAST
    )
    ours, theirs = zarr.open_group(str(reference), mode="r"), zarr.open_group(str(other))
    for name in ("nuclei", "mito"):
        a, b = ours[name][:4].astype(int), theirs[name][:4].astype(int)
        assert np.abs(a - b).max() <= 1  # logits within 1e-4: a level differs at most by 1
        assert (a == b).mean() >= 0.999
    # Float rounding only, the same weights: an output made one way resumes the other way.
    meta = ours.attrs["joenet"]["fingerprint"]
    assert meta == theirs.attrs["joenet"]["fingerprint"] | {"input": meta["input"]}


def test_blocks_are_read_predicted_and_written_in_a_bounded_pipeline(
    ckpt_path: Path, volume_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing block i - 1 overlaps predicting block i, with at most three blocks in memory."""
    import threading
    import time

    events: list[tuple[str, int, float]] = []
    in_memory, peak = [0], [0]
    lock = threading.Lock()
    read, compute, write = block_ops.read_block, block_ops.compute_block, block_ops.write_block

    def reading(job, image, block):
        with lock:
            in_memory[0] += 1
            peak[0] = max(peak[0], in_memory[0])
        return read(job, image, block)

    def computing(job, predictor, inputs):
        events.append(("compute", threading.get_ident(), time.perf_counter()))
        return compute(job, predictor, inputs)

    def writing(group, job, block, values):
        start = time.perf_counter()
        time.sleep(0.2)  # a slow disk: the next block's prediction must not wait for it
        write(group, job, block, values)
        events.append(("write", threading.get_ident(), start))
        with lock:
            in_memory[0] -= 1

    monkeypatch.setattr(block_ops, "read_block", reading)
    monkeypatch.setattr(block_ops, "compute_block", computing)
    monkeypatch.setattr(block_ops, "write_block", writing)
    output = predict_volume(ckpt_path, volume_path, tmp_path / "p.zarr", z_range=[0, 6], **FAST)
    computes = [e for e in events if e[0] == "compute"]
    writes = [e for e in events if e[0] == "write"]
    assert len(computes) == len(writes) == 6  # one block per slice of chunk depth 1
    assert {e[1] for e in writes}.isdisjoint({e[1] for e in computes})  # another thread writes
    # Block i + 1's prediction starts before block i's slow write has ended.
    assert all(c[2] < w[2] + 0.2 for c, w in zip(computes[1:], writes, strict=False))
    assert peak[0] <= 3
    assert zarr.open_group(str(output))["mito"][:6].any()


def test_a_failing_compile_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_compiler(*args: object, **kwargs: object) -> object:
        def compiled(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    net = _random_bn_net()
    fast = inference_network(net, compile=True, input_shape=(2, 1, 64, 64))
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode(), caplog.at_level("WARNING"):
        first, second = fast(x), fast(x)
        assert (first - net(x)).abs().max().item() < 1e-5 and torch.equal(first, second)
    assert "torch.compile failed (RuntimeError: InvalidCxxCompiler" in caplog.text
    assert caplog.text.count("torch.compile failed") == 1  # said once, then eager
