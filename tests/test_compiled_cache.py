"""Ahead-of-time compiled networks cached on disk: same logits, keyed by all they depend on."""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import zarr

from joenet.predict import fast_path, predict_volume, worker
from joenet.predict.compiled_cache import (
    default_cache_dir,
    load_or_compile,
    package_path,
    resolve_cache_dir,
)
from joenet.predict.fast_path import (
    CPU_CACHED_MIN_TILES,
    CPU_COMPILE_MIN_TILES,
    prepared_network,
    resolve_compile,
)
from tests.test_predict import FAST
from tests.test_tiling import _random_bn_net

SHAPE = (2, 1, 64, 64)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return prepared_network(_random_bn_net(), channels_last=True)


@pytest.fixture(scope="module")
def compiled_dir(net: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding ``net`` compiled for ``SHAPE`` (one compile, ~25 s, for the module)."""
    directory = tmp_path_factory.mktemp("compiled")
    load_or_compile(net, SHAPE, True, directory)
    return directory


def _inputs() -> torch.Tensor:
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3))
    return x.contiguous(memory_format=torch.channels_last)


def test_a_cached_package_loads_without_compiling_and_matches_eager(
    net: torch.nn.Module, compiled_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [package] = compiled_dir.glob("*.pt2")  # one package, no partial file left beside it
    assert package == package_path(net, SHAPE, True, compiled_dir)

    def no_compile(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled again although the package is cached")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compile)
    compiled = load_or_compile(net, SHAPE, True, compiled_dir)
    with torch.inference_mode():
        x = _inputs()
        eager, out = net(x), compiled(x)
    assert out.shape == eager.shape == (2, 2, 64, 64)
    assert (out - eager).abs().max().item() < 1e-4


@pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="freezing pre-packs weights for oneDNN only"
)
def test_the_package_is_frozen_its_convolutions_prepacked(compiled_dir: Path) -> None:
    # The fixture compiles with autograd on, as a caller outside prediction's inference_mode
    # would: load_or_compile must still freeze (unfrozen, every conv is a plain aten call).
    [package] = compiled_dir.glob("*.pt2")
    with zipfile.ZipFile(package) as archive:
        wrappers = [archive.read(n).decode() for n in archive.namelist() if n.endswith(".cpp")]
    assert any("mkldnn__convolution_pointwise" in code for code in wrappers)


def test_the_key_holds_weights_architecture_shape_and_layout(net: torch.nn.Module) -> None:
    cache = Path("/cache")
    key = package_path(net, SHAPE, True, cache)
    assert package_path(copy.deepcopy(net), SHAPE, True, cache) == key  # same weights: same
    assert torch.__version__.replace("+", "_") in key.name  # and its torch and CPU in the name
    assert torch.backends.cpu.get_cpu_capability() in key.name
    other_weights = copy.deepcopy(net)
    with torch.no_grad():
        next(other_weights.parameters()).view(-1)[0] += 1e-3
    others = {
        package_path(other_weights, SHAPE, True, cache),
        package_path(net, (1, 1, 64, 64), True, cache),
        package_path(net, SHAPE, False, cache),
        package_path(prepared_network(_random_bn_net((4, 8, 16))), SHAPE, True, cache),
    }
    assert key not in others and len(others) == 4


def test_a_package_that_does_not_load_is_compiled_again(
    net: torch.nn.Module,
    compiled_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = package_path(net, SHAPE, True, compiled_dir)
    broken = package_path(net, SHAPE, True, tmp_path)
    broken.write_bytes(b"half a file")
    compiles: list[str] = []

    def compile_by_copy(program: object, package_path: str, **kwargs: object) -> str:
        compiles.append(package_path)  # a real compile takes ~25 s: the good package stands in
        shutil.copy(good, package_path)
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_by_copy)
    with caplog.at_level(logging.WARNING):
        compiled = load_or_compile(net, SHAPE, True, tmp_path)
    assert "does not load" in caplog.text and len(compiles) == 1
    assert [p.name for p in tmp_path.iterdir()] == [broken.name]  # replaced, no partial left
    with torch.inference_mode():
        assert (compiled(_inputs()) - net(_inputs())).abs().max().item() < 1e-4


def test_cache_dir_switch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JOENET_CACHE_DIR", str(tmp_path / "jc"))
    assert default_cache_dir() == tmp_path / "jc" / "compiled"
    assert resolve_cache_dir("auto") == resolve_cache_dir(True) == tmp_path / "jc" / "compiled"
    monkeypatch.delenv("JOENET_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir("AUTO") == tmp_path / "xdg" / "joenet" / "compiled"
    assert resolve_cache_dir(False) is resolve_cache_dir("false") is resolve_cache_dir(None) is None
    assert resolve_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"


def test_compile_auto_needs_fewer_tiles_once_the_network_is_cached() -> None:
    # A cached package costs only its ~0.01 s load (CPU_CACHED_MIN_TILES stays 100 until smaller
    # runs are measured); a compile 20-65 s.
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert CPU_CACHED_MIN_TILES < CPU_COMPILE_MIN_TILES
    assert resolve_compile("auto", cpu, CPU_CACHED_MIN_TILES, cached=True)
    assert not resolve_compile("auto", cpu, CPU_CACHED_MIN_TILES - 1, cached=True)
    assert not resolve_compile("auto", cpu, CPU_CACHED_MIN_TILES, cached=False)
    assert not resolve_compile("auto", gpu, 10**6, cached=True)
    assert not resolve_compile(False, cpu, 10**6, cached=True)


def test_a_second_prediction_loads_the_network_compiled_by_the_first(
    ckpt_path: Path,
    volume_path: Path,
    tmp_path: Path,
    compiled_cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 64 px tiles: the tiny volume (96 px) is smaller than a 256 px tile, which runs eager.
    options = {"z_range": [0, 2], "tile": 64, "overlap": 32, **FAST}
    eager = predict_volume(ckpt_path, volume_path, tmp_path / "e.zarr", compile=False, **options)
    with caplog.at_level(logging.INFO, logger="joenet"):
        first = predict_volume(ckpt_path, volume_path, tmp_path / "a.zarr", compile=True, **options)
    packages = sorted(compiled_cache_dir.glob("*.pt2"))
    assert packages  # compiled into the test session's cache (or loaded from it)
    worker._network.cache_clear()  # as in a new process: nothing compiled in memory
    worker._prepared.cache_clear()
    worker.make_predictor.cache_clear()
    # auto, 8 tiles: the cached threshold scaled to this run; one tile short of it stays eager
    monkeypatch.setattr(fast_path, "CPU_CACHED_MIN_TILES", 9)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="joenet"):
        predict_volume(ckpt_path, volume_path, tmp_path / "c.zarr", **options)
    assert "8 tiles to predict, eager" in caplog.text
    monkeypatch.setattr(fast_path, "CPU_CACHED_MIN_TILES", 8)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="joenet"):
        second = predict_volume(ckpt_path, volume_path, tmp_path / "b.zarr", **options)
    assert "8 tiles to predict, compiled" in caplog.text
    assert "compiled network loaded from" in caplog.text
    assert sorted(compiled_cache_dir.glob("*.pt2")) == packages  # nothing compiled again
    ours = zarr.open_group(str(eager), mode="r")
    for output in (first, second):
        theirs = zarr.open_group(str(output), mode="r")
        for name in ("nuclei", "mito"):
            diff = ours[name][:2].astype(int) - theirs[name][:2].astype(int)
            assert abs(diff).max() <= 1  # logits within 1e-4: a level differs at most by 1
            assert (diff == 0).mean() >= 0.999


def test_a_package_loads_without_inductor_and_as_aoti_load_package_does(
    compiled_dir: Path,
) -> None:
    """The direct loader skips inductor's ~4.5 s import and load: same logits, bit for bit."""
    [package] = compiled_dir.glob("*.pt2")
    script = (
        "import sys, torch\n"
        "from joenet.predict.compiled_cache import load_package\n"
        f"run = load_package(__import__('pathlib').Path({str(package)!r}))\n"
        "x = torch.rand((2, 1, 64, 64), generator=torch.Generator().manual_seed(3))\n"
        "logits = run(x.contiguous(memory_format=torch.channels_last))\n"
        "assert 'torch._inductor' not in sys.modules, 'loading imported inductor'\n"
        "torch.save(logits, sys.argv[1])\n"
    )
    out = compiled_dir / "direct.pt"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True)
    direct = torch.load(out)
    from torch import _inductor

    reference = _inductor.aoti_load_package(str(package))(_inputs())
    assert direct.shape == (2, 2, 64, 64)
    assert torch.equal(direct, reference)
