"""Cluster faults of prediction and conversion: a second writer, a full disk, a real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from joenet.predict import checks, predict_volume
from joenet.volume.output_lock import OutputBusy, exclusive_output, lock_path
from tests.test_predict import FAST, _chunk_bytes


def test_second_prediction_into_the_same_output_refuses_at_once(
    ckpt_path: Path, volume_path: Path, tmp_path: Path
) -> None:
    output = tmp_path / "pred.zarr"
    with exclusive_output(output, "joenet.predict"):  # as if another prediction were running
        started = time.monotonic()
        with pytest.raises(
            OutputBusy,
            match=rf"output {output} is being written by another "
            rf"joenet.predict \(pid {os.getpid()} on .*, since ",
        ):
            predict_volume(ckpt_path, volume_path, output, z_range=[0, 1], **FAST)
        assert time.monotonic() - started < 30  # refused, not waited for
        assert not output.exists()  # nothing written
    assert not lock_path(output).exists()  # the lock file goes with its holder
    predict_volume(ckpt_path, volume_path, output, z_range=[0, 1], **FAST)  # free again
    assert not lock_path(output).exists()


def test_second_conversion_into_the_same_output_refuses_at_once(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile", reason="TIFF input needs tifffile")
    from joenet.convert import convert

    source = tmp_path / "raw.tif"
    tifffile.imwrite(
        source, np.arange(256, dtype=np.uint8).reshape(4, 8, 8), photometric="minisblack"
    )
    output = tmp_path / "v.zarr"
    with exclusive_output(output, "joenet.convert"):
        with pytest.raises(OutputBusy, match=r"being written by another joenet\.convert"):
            convert(output, str(source))
        assert not output.exists()
    assert zarr.open_group(str(convert(output, str(source))), mode="r")["raw"].shape == (4, 8, 8)


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    output = tmp_path / "pred.zarr"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from joenet.volume.output_lock import exclusive_output\n"
            "with exclusive_output(sys.argv[1], 'joenet.predict'):\n"
            "    print('locked', flush=True); time.sleep(600)",
            str(output),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with (
        pytest.raises(OutputBusy, match=f"pid {holder.pid} on "),
        exclusive_output(output, "joenet.predict"),
    ):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock_path(output).exists()  # left behind by the kill ...
    with exclusive_output(output, "joenet.predict"):  # ... but no longer held
        pass


def test_free_space_is_checked_before_predicting(
    ckpt_path: Path, volume_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Usage:
        free = 1000  # bytes

    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: Usage)
    output = tmp_path / "pred.zarr"
    with pytest.raises(ValueError) as info:
        predict_volume(ckpt_path, volume_path, output, z_range=[0, 2], **FAST)
    message = str(info.value)
    # 2 slices of 96 x 96, 2 classes of uint8: 36,864 bytes at most.
    assert f"output {output}: 1e-06 GB free on its disk" in message
    assert (
        "take up to 3.69e-05 GB uncompressed (18,432 voxels x 2 bytes: nuclei uint8, mito uint8)"
        in message
    )
    assert "check_free_space=false" in message
    assert not zarr.open_group(str(output), mode="r")[".joenet/done"][...].any()  # none predicted
    predict_volume(ckpt_path, volume_path, output, z_range=[0, 2], check_free_space=False, **FAST)
    assert zarr.open_group(str(output), mode="r")[".joenet/done"][...].sum() == 2


# The prediction CLI with one change: after the third block's chunks are written (its done flag
# not yet set) it says so and sleeps, to be killed right there.
_PAUSING_PREDICT = """
import sys, time
from pathlib import Path
from joenet.predict import work_units
ready = Path(sys.argv.pop())
write_block, written = work_units.write_block, []
def write_then_pause(group, job, block, values):
    write_block(group, job, block, values)
    written.append(block.index)
    if len(written) == 3:
        ready.touch()
        time.sleep(600)
work_units.write_block = write_then_pause
from joenet.predict.cli import main
main()
"""


def _predict_args(ckpt_path: Path, volume_path: Path, output: Path, logs: Path) -> list[str]:
    return [
        f"ckpt_path={ckpt_path}",
        f"input={volume_path}",
        f"output={output}",
        f"paths.log_dir={logs}",
        "z_range=[0,4]",
        "progress=false",
        "device=cpu",
    ]


@pytest.mark.slow  # subprocesses
def test_kill_9_then_the_same_command_gives_identical_bytes(
    ckpt_path: Path, volume_path: Path, tmp_path: Path
) -> None:
    output, ready = tmp_path / "pred.zarr", tmp_path / "ready"
    args = _predict_args(ckpt_path, volume_path, output, tmp_path / "logs")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = [sys.executable, "-m", "joenet.predict", *args]
    first = subprocess.Popen(
        [sys.executable, "-c", _PAUSING_PREDICT, *args, str(ready)],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first prediction never reached its third block"
        time.sleep(0.2)
    # While it runs, a second prediction into the same output refuses at once.
    second = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"is being written by another joenet.predict (pid {first.pid} on " in second.stderr
    assert "Traceback" not in second.stderr
    first.send_signal(signal.SIGKILL)  # a real kill: no handler, no cleanup
    assert first.wait(timeout=30) == -signal.SIGKILL
    done = zarr.open_array(str(output / ".joenet" / "done"), mode="r")[...]
    assert done.sum() == 2  # the third block's chunks were written but never recorded
    rerun = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    uninterrupted = predict_volume(
        ckpt_path, volume_path, tmp_path / "ref.zarr", z_range=[0, 4], **FAST
    )
    assert _chunk_bytes(output) == _chunk_bytes(uninterrupted)
    assert len(_chunk_bytes(output)) > 0
    assert zarr.open_array(str(output / ".joenet" / "done"), mode="r")[...].sum() == 4
