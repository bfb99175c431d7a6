"""``make bench-gpu``'s script runs end to end on a CPU at a tiny size before a GPU is at hand."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_a_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny"]
    command += ["--no-compile", "--ddp-on-cpu", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with out.with_suffix(".csv").open() as file:
        rows = list(csv.DictReader(file))
    parts = {row["part"] for row in rows}
    assert parts == {"train step", "data pipeline", "prediction", "DDP"}
    settings = {row["setting"] for row in rows}
    assert {"batch 2, channels_last", "batch 4, eager", "0 workers", "1 workers"} <= settings
    assert "joenet:batch=default" in settings
    if importlib.util.find_spec("monai") is not None:  # the peer is in joenet[bench]
        assert "joenet:batch=default / monai:batch=default" in settings
    ddp = next(row for row in rows if row["setting"] == "2 / 1 processes")
    assert float(ddp["value"].removesuffix("x")) > 0
    for row in rows:  # every measured value is a positive number with its unit
        number = row["value"].split()[0].removesuffix("x")
        assert float(number) > 0, row
    assert out.with_suffix(".md").read_text().count("\n| ") == len(rows) + 1


def test_speed_benchmarks_measure_the_network_the_default_config_trains() -> None:
    # predict_bench, fold_bench, pipeline_bench and gpu_check build "default" from the config,
    # so that their figures follow the default network when it changes.
    from omegaconf import OmegaConf

    from joenet.model import UNet2d
    from tests.helpers import compose_train

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from networks import inference_ready, net_kwargs

    composed = OmegaConf.to_container(compose_train([]).model.net, resolve=True)
    assert net_kwargs("default") == composed
    assert net_kwargs("seed") == {}
    with pytest.raises(ValueError, match="--net must be one of default, seed"):
        net_kwargs("small")
    net = inference_ready("default")
    assert not net.training
    assert sum(p.numel() for p in net.parameters()) == sum(
        p.numel() for p in UNet2d(**composed).parameters()
    )


def test_train_step_bench_sets_bf16_rows_beside_fp32_ones() -> None:
    # On a CPU with AMX training runs bf16 autocast (joenet.config.cpu_precision): the bench
    # measures each model's eager rows both ways in one run. Tiny here, so it runs on any CPU.
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step_bench import measure, rows

    table = {row.name: row for row in rows(quick=True, micro_batch=2, bf16=True)}
    assert table["joenet UNet2d, bf16 autocast"].bf16
    assert table["joenet UNet2d, micro-batch 2, bf16 autocast"].micro_batch == 2
    assert not table["joenet UNet2d"].bf16
    if importlib.util.find_spec("monai") is not None:
        assert table["MONAI BasicUNet, bf16 autocast"].bf16
    cpu = torch.device("cpu")
    fp32 = measure(table["joenet UNet2d"], batch=1, patch=32, steps=1, device=cpu)
    bf16 = measure(table["joenet UNet2d, bf16 autocast"], batch=1, patch=32, steps=1, device=cpu)
    assert not fp32["bf16"] and bf16["bf16"]
    assert bf16["train_patches_s"] > 0 and bf16["train_gflop"] == pytest.approx(fp32["train_gflop"])


def test_a_failing_part_is_a_row_and_the_other_parts_still_report(tmp_path: Path) -> None:
    # A lent GPU machine gives minutes: one broken part must not lose the others' figures, and
    # the files are there after each part (a command stopped at its limit keeps them).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from check_table import run_parts

    out = tmp_path / "check"
    seen_on_disk = []

    def second() -> list[tuple[str, str, str, str]]:
        raise RuntimeError("CUDA error: out of memory\nlong traceback text")

    def third() -> list[tuple[str, str, str, str]]:
        seen_on_disk.append(out.with_suffix(".csv").read_text())
        return [("c", "setting", "2.0 x", "")]

    parts = {"a": lambda: [("a", "setting", "1.0 patches/s", "")], "b": second, "c": third}
    results, failed = run_parts(parts, "header", out)
    assert failed == ["b"]
    assert results == [
        ("a", "setting", "1.0 patches/s", ""),
        ("b", "failed", "failed", "RuntimeError: CUDA error: out of memory"),
        ("c", "setting", "2.0 x", ""),
    ]
    assert "a,setting,1.0 patches/s" in seen_on_disk[0]  # written before part c ran
    with out.with_suffix(".csv").open() as file:
        assert len(list(csv.DictReader(file))) == 3
    assert out.with_suffix(".md").read_text().startswith("header\n")


def test_offline_wheels_cover_what_the_gpu_image_lacks() -> None:
    # The lent GPU machine reaches no index: every requirement of joenet (and MONAI) that its
    # image lacks must be among the wheels carried there, dependencies of those included.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from offline_wheels import IMAGE_HAS, needed

    monai = importlib.util.find_spec("monai") is not None  # the peer, in joenet[bench]
    packages = needed("3.12", peers=("monai",) if monai else ())
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "zarr", "numcodecs"} <= set(
        packages
    )
    assert ("monai" in packages) == monai
    with pytest.raises(LookupError, match="no-such-peer is needed on the GPU machine"):
        needed("3.12", peers=("no-such-peer",))
    assert not set(packages) & IMAGE_HAS  # nothing the image holds is carried
    assert "torch" not in packages and "lightning" not in packages
    assert all(version[0].isdigit() for version in packages.values())


@pytest.mark.slow
def test_predict_bench_says_when_a_compiled_side_fell_back_to_eager(tmp_path: Path) -> None:
    # Without a working C++ compiler prediction runs eager (fast_path.FixedShapeCompiled): the
    # bench must not report that side's speed as a compiled one.
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "predict_bench.py"), "--shape", "1"]
    command += ["128", "128", "--tile", "64", "--overlap", "16", "--pairs", "compile"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CXX": "/bin/false"}
    done = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sides = json.loads(out.read_text())["sides"]
    assert sides["joenet+compile=true:batch=default"]["compile_failed"] is True
    assert "(compiling failed: ran eager)" in done.stdout


def test_a_failing_train_step_row_keeps_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    def measure(row: object, batch: int, *args: object) -> dict:
        if getattr(row, "compile", False):
            raise RuntimeError("InductorError: no C compiler for Triton")
        return {
            "train_patches_s": 1.0,
            "train_gflop_s": 1.0,
            "infer_patches_s": 2.0,
            "first_step_s": 0,
        }

    monkeypatch.setattr(gpu_check, "measure", measure)
    args = argparse.Namespace(batch_sizes=(2,), patch_size=32, steps=1, no_compile=False)
    rows = gpu_check.training_steps(args, torch.device("cpu"))
    by_setting = {row[1]: row for row in rows}
    assert by_setting["batch 2, eager"][2] == "1.0 patches/s"
    assert by_setting["batch 2, torch.compile"][2:] == (
        "failed",
        "RuntimeError: InductorError: no C compiler for Triton",
    )
    assert len(rows) == 5  # the peak, two measured rows, two failed compile rows


def test_an_unknown_part_is_one_clear_error() -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--parts", "predict"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert "--parts: unknown ['predict']; choose from ['data pipeline', 'prediction'" in done.stderr
    assert "Traceback" not in done.stderr
