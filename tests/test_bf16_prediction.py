"""bf16 prediction on CPUs with AMX: ``precision=auto`` picks it there, eager and compiled stay
within a stated tolerance of fp32, and the compiled form is a bf16 network with its own key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from joenet.checkpoint import cached_model
from joenet.predict import pipeline, predict_volume, tiling, worker
from joenet.predict.compiled_cache import package_path
from joenet.predict.fast_path import inference_form, inference_network, prepared_network
from joenet.predict.tiling import autocast_dtype, precision_name
from tests.test_predict import FAST
from tests.test_tiling import _random_bn_net

# Probabilities within 8/255 (~0.03) of fp32 at every pixel and under 1 level on average: bf16
# keeps 8 bits of mantissa, and this tiny trained network measured 7/255 at most; a network that
# computes something else (weights not loaded, a wrong cast) is far off.
LEVELS = 8
CPU = torch.device("cpu")


@pytest.fixture
def amx_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CPU as one with AMX (tests/conftest.py pins prediction to fp32 otherwise): where
    ``auto`` resolves and where the worker checks its CPU."""
    monkeypatch.setattr(tiling, "cpu_has_bf16_matrix_units", lambda: True)
    monkeypatch.setattr(worker, "cpu_has_bf16_matrix_units", lambda: True)


def test_auto_is_bf16_on_cpus_with_amx_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiling, "cpu_has_bf16_matrix_units", lambda: True)
    assert autocast_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(tiling, "cpu_has_bf16_matrix_units", lambda: False)
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("bf16", CPU) == torch.bfloat16  # asked for, on any CPU
    for precision in ("32", "bf16", "16"):
        assert precision_name(autocast_dtype(precision, CPU)) == precision
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("fp8", CPU)


def test_bf16_that_auto_chose_elsewhere_is_refused_on_a_cpu_without_amx(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    ckpt_path: Path,
    volume_path: Path,
    tmp_path: Path,
) -> None:
    # A cluster run started on an AMX machine resolves auto to bf16 there; a worker whose CPU
    # has no bf16 units would emulate it (~400x slower): it refuses before loading anything.
    # conftest pins this CPU as one without AMX; the submitter's view is patched to AMX's.
    monkeypatch.setattr(pipeline, "autocast_dtype", lambda precision, device: torch.bfloat16)
    with pytest.raises(RuntimeError, match="precision=auto chose bf16 where the run started"):
        predict_volume(ckpt_path, volume_path, tmp_path / "auto.zarr", z_range=[0, 1], **FAST)
    worker.check_cpu_bf16(torch.bfloat16, CPU, chosen_by_auto=False)  # asked for: warns only
    assert "precision=bf16: the CPU of" in caplog.text and "~400x slower" in caplog.text
    monkeypatch.setattr(worker, "cpu_has_bf16_matrix_units", lambda: True)
    worker.check_cpu_bf16(torch.bfloat16, CPU, chosen_by_auto=True)  # an AMX worker: fine
    worker.check_cpu_bf16(None, CPU, chosen_by_auto=True)  # fp32: fine anywhere


def test_a_bf16_network_takes_fp32_tiles_and_has_its_own_package_key(tmp_path: Path) -> None:
    net = _random_bn_net()
    fp32 = inference_network(net, channels_last=False)
    bf16 = prepared_network(net, channels_last=False, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in net.parameters()} == {torch.float32}  # the trained one untouched
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = inference_form(bf16, channels_last=False)(x)  # casts the fp32 tiles itself
        ref = fp32(x)
    assert out.dtype == torch.bfloat16
    diff = (out.float().sigmoid() - ref.sigmoid()).abs().max().item()
    assert 0 < diff < LEVELS / 255  # rounded as bf16 rounds, not a different function
    shape = (1, 1, 64, 64)
    fp32_key = package_path(prepared_network(net, channels_last=False), shape, False, tmp_path)
    assert package_path(bf16, shape, False, tmp_path) != fp32_key


def _levels(path: Path, name: str) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")[name][:4].astype(int)


def _close_to_fp32(ours: Path, fp32: Path) -> None:
    for name in ("nuclei", "mito"):
        diff = np.abs(_levels(ours, name) - _levels(fp32, name))
        assert diff.max() <= LEVELS, name
        assert diff.mean() < 1.0, name  # most pixels round to the same level or the next


def test_auto_on_an_amx_cpu_predicts_in_bf16_within_tolerance_eager(
    amx_cpu: None, ckpt_path: Path, volume_path: Path, reference: Path, tmp_path: Path
) -> None:
    out = predict_volume(ckpt_path, volume_path, tmp_path / "bf16.zarr", z_range=[0, 4], **FAST)
    _close_to_fp32(out, reference)  # the reference: precision=auto on a CPU without AMX
    fingerprint = zarr.open_group(str(out), mode="r").attrs["joenet"]["fingerprint"]
    assert fingerprint["precision"] == "bfloat16"
    # The fingerprint holds the resolved precision: an fp32 output is never resumed in bf16.
    fp32_fingerprint = zarr.open_group(str(reference), mode="r").attrs["joenet"]["fingerprint"]
    assert fp32_fingerprint["precision"] == "float32"


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="this CPU has no bf16 in oneDNN: precision=auto never picks bf16 on it",
)
def test_auto_on_an_amx_cpu_compiles_a_bf16_network_into_the_cache(
    amx_cpu: None,
    ckpt_path: Path,
    volume_path: Path,
    tmp_path: Path,
    compiled_cache_dir: Path,
) -> None:
    # 64 px tiles: the tiny volume (96 px) is smaller than a 256 px tile, which runs eager.
    options = {"z_range": [0, 4], "tile": 64, "overlap": 32, **FAST}
    fp32 = predict_volume(
        ckpt_path, volume_path, tmp_path / "fp32.zarr", precision="32", compile=False, **options
    )
    ours = predict_volume(ckpt_path, volume_path, tmp_path / "bf16.zarr", compile=True, **options)
    _close_to_fp32(ours, fp32)
    net = cached_model(str(ckpt_path.resolve()), CPU).net
    bf16 = prepared_network(net, channels_last=True, dtype=torch.bfloat16)
    assert package_path(bf16, (1, 1, 64, 64), True, compiled_cache_dir).exists()
