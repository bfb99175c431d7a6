"""Nothing lost: atomic checkpoints, NaN losses, determinism, kill -9 resume, safe loading."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from joenet.checkpoint_io import AtomicCheckpointIO
from joenet.lit_module import SegmentationLitModule
from joenet.predict import predict_volume
from joenet.train import train
from tests.helpers import compose_train, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    def dies_halfway(obj, file) -> None:
        file.write(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt  # what a kill during the write looks like to the file

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no partial file left behind


def _fit_with_nan_at_step(cfg: DictConfig, step: int) -> tuple[SegmentationLitModule, object]:
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)

    class Poisoned(type(model.criterion)):
        def forward(self, logits, *args):
            loss = super().forward(logits, *args)
            return loss * float("nan") if model.global_step == step else loss

    model.criterion = Poisoned()
    trainer = instantiate(cfg.trainer, callbacks=[instantiate(c) for c in cfg.callbacks.values()])
    trainer.fit(model, datamodule=datamodule)
    return model, trainer


def _all_finite(path: Path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nonfinite_loss_stops_and_keeps_finite_checkpoints(cfg_tiny: DictConfig) -> None:
    cfg_tiny.trainer.max_epochs = 3
    model, trainer = _fit_with_nan_at_step(cfg_tiny, step=3)
    assert model.nonfinite_steps == [3]
    assert trainer.global_step == 4  # the NaN step (3) was the last: 6 steps without it
    assert all(torch.isfinite(p).all() for p in model.parameters())
    checkpoints = Path(cfg_tiny.paths.output_dir) / "checkpoints"
    assert _all_finite(checkpoints / "best.ckpt") and _all_finite(checkpoints / "last.ckpt")


def test_nonfinite_loss_can_skip_the_batch(cfg_tiny: DictConfig) -> None:
    cfg_tiny.trainer.max_epochs = 2
    cfg_tiny.model.nonfinite_loss = "skip"
    model, trainer = _fit_with_nan_at_step(cfg_tiny, step=1)
    assert model.nonfinite_steps == [1]
    assert trainer.current_epoch == 2  # went on to the end
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_same_seed_gives_bit_identical_runs(data_dir: Path, tmp_path: Path) -> None:
    results, weights = [], []
    for name in ("a", "b"):
        cfg = compose_train(
            [*tiny_overrides(data_dir, tmp_path / name), "trainer.deterministic=true"]
        )
        results.append(train(cfg))
        weights.append(torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True))
    assert results[0] == results[1]  # exact float equality of every logged metric
    for key, value in weights[0]["state_dict"].items():
        assert torch.equal(value, weights[1]["state_dict"][key]), key


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(data_dir: Path, tmp_path: Path) -> None:
    overrides = [
        *(o for o in tiny_overrides(data_dir, tmp_path) if not o.startswith("paths.output_dir")),
        "trainer.max_epochs=3",
        "trainer.deterministic=true",
    ]
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run(
        [
            sys.executable,
            "-m",
            "joenet.train",
            *overrides,
            f"hydra.run.dir={run_dir}",
            "+callbacks.kill._target_=tests.helpers.KillAtStep",
            "+callbacks.kill.step=5",
            f"+callbacks.kill.marker={tmp_path / 'killed.marker'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL mid-epoch 2 (steps 4, 5)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    # The documented resume command: the run's own config, its directory, its last checkpoint.
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "joenet.train",
            f"--config-path={run_dir / '.hydra'}",
            "--config-name=config",
            f"hydra.run.dir={run_dir}",
            "ckpt_path=last",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # The reference runs in a fresh process too: the same threads and allocator state as the
    # resumed run, whatever earlier tests did in this one.
    uninterrupted = subprocess.run(
        [
            sys.executable,
            "-m",
            "joenet.train",
            *overrides,
            f"hydra.run.dir={tmp_path / 'straight'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == straight["global_step"] == 6
    for key, value in straight["state_dict"].items():  # the EMA's weights, when on
        assert torch.equal(value, final["state_dict"][key]), key
    assert ("current_model_state" in straight) == ("current_model_state" in final)
    for key, value in straight.get("current_model_state", {}).items():  # the raw weights
        assert torch.equal(value, final["current_model_state"][key]), key


class _RunsCode:
    """Unpickling this would run code: a crafted checkpoint from an untrusted source."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_checkpoint_does_not_run_code(cfg_tiny: DictConfig, tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "crafted.ckpt"
    model = SegmentationLitModule(net={"channels": [4, 8, 16, 32]})
    torch.save({"state_dict": model.state_dict(), "payload": _RunsCode(marker)}, crafted)

    with pytest.raises(pickle.UnpicklingError):
        SegmentationLitModule.load_from_checkpoint(crafted, weights_only=True)
    refused = rf"init_from={re.escape(str(crafted))}: refused to load, it holds objects"
    with pytest.raises(ValueError, match=refused):
        model.init_weights_from(crafted)
    trainer = instantiate(cfg_tiny.trainer, logger=False)
    with pytest.raises(pickle.UnpicklingError):  # resuming (ckpt_path=) loads weights-only too
        trainer.fit(model, datamodule=instantiate(cfg_tiny.data), ckpt_path=crafted)
    with pytest.raises(ValueError, match=r"ckpt_path=.*crafted\.ckpt: refused to load"):
        predict_volume(crafted, cfg_tiny.data.path, tmp_path / "pred.zarr", progress=False)
    assert not marker.exists()


def test_unreadable_checkpoints_name_the_file(ckpt_path: Path, volume_path: Path, tmp_path: Path):
    """A text file, a truncated checkpoint and a bare state dict: one line naming the file."""
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt_path.read_bytes()[:5000])
    bare = tmp_path / "bare.ckpt"
    torch.save(torch.load(ckpt_path, weights_only=True)["state_dict"], bare)
    for path, expected in (
        (text, "not a readable checkpoint"),
        (truncated, "not a readable checkpoint"),
        (bare, r"not a joenet training checkpoint \(no 'state_dict'; a bare"),
    ):
        with pytest.raises(ValueError, match=rf"ckpt_path={re.escape(str(path))}: {expected}"):
            predict_volume(path, volume_path, tmp_path / f"{path.stem}.zarr", progress=False)
        assert not (tmp_path / f"{path.stem}.zarr").exists()  # refused before writing


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_mid_epoch_and_resumes(
    signum: int, data_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM (a scheduler's kill) or SLURM's SIGUSR1 warning, delivered for real mid-epoch."""
    overrides = [
        *(o for o in tiny_overrides(data_dir, tmp_path) if not o.startswith("paths.output_dir")),
        "trainer.max_epochs=3",
        "trainer.deterministic=true",
    ]
    run_dir = tmp_path / "preempted"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "joenet.train", *args]
        return subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )

    stopped = run(
        *overrides,
        f"hydra.run.dir={run_dir}",
        "+callbacks.signal._target_=tests.helpers.SignalAtStep",
        "+callbacks.signal.step=4",  # the first step of epoch 3 (2 steps per epoch)
        f"+callbacks.signal.marker={tmp_path / 'signalled.marker'}",
        f"+callbacks.signal.signum={int(signum)}",
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    name = signal.Signals(signum).name
    assert (
        f"joenet: stopped by {name}; last.ckpt written at this step: resume with ckpt_path={last}"
        in stopped.stderr
    )
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 5  # the signalled step finished, mid-epoch 3
    assert not list(last.parent.glob(".partial-*"))  # written whole

    resumed = run(
        f"--config-path={run_dir / '.hydra'}",
        "--config-name=config",
        f"hydra.run.dir={run_dir}",
        "ckpt_path=last",
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == 6 and final["epoch"] == 2
    straight = run(*overrides, f"hydra.run.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    reference = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key


def test_preemption_leaves_sigusr1_to_lightning_under_slurm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under SLURM with auto-requeue, SIGUSR1 stays free for Lightning's save-and-requeue."""
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from joenet.callbacks import CheckpointOnPreemption

    callback = CheckpointOnPreemption()
    for environment, expect_ours in ((SLURMEnvironment(auto_requeue=True), False), (None, True)):
        plugins = [environment] if environment else []
        trainer = L.Trainer(accelerator="cpu", plugins=plugins, logger=False)
        previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        try:
            callback.on_fit_start(trainer, None)
            ours = signal.getsignal(signal.SIGUSR1) == callback._record
            assert ours == expect_ours
            callback.on_fit_end(trainer, None)
            assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # restored
        finally:
            signal.signal(signal.SIGUSR1, previous)
