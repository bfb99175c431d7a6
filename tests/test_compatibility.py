"""What earlier joenet code wrote keeps working: its checkpoint and its predictions.

The fixtures in ``tests/fixtures/v0`` were written by ``tests/fixtures/make_v0_fixtures.py`` with
the code at commit 7ca9fb8 (before the package layout changed).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import zarr

from joenet.evaluate import evaluate_volume
from joenet.predict import predict_volume
from tests.fixtures.make_v0_fixtures import HERE as FIXTURES
from tests.fixtures.make_v0_fixtures import MASK_ARGS, PREDICT_ARGS
from tests.helpers import compose_train, tiny_overrides

CKPT, VOLUME = FIXTURES / "last.ckpt", FIXTURES / "input.zarr"
CLASSES = ("nuclei", "mito")


def _options(args: list[str]) -> dict:
    """``key=value`` CLI arguments as predict_volume's keyword arguments."""
    values = {"true": True, "false": False}
    options = {}
    for arg in args:
        key, value = arg.split("=")
        options[key] = values.get(value, value)
        if key in ("tile", "overlap"):
            options[key] = int(value)
        if key == "threshold":
            options[key] = float(value)
    return options


def _arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][:]) for name in names}


def test_old_checkpoint_predicts_what_it_predicted(tmp_path: Path) -> None:
    out = predict_volume(CKPT, VOLUME, tmp_path / "prob.zarr", **_options(PREDICT_ARGS))
    new, old = _arrays(out, CLASSES), _arrays(FIXTURES / "prob.zarr", CLASSES)
    for name in CLASSES:
        # Levels round(255 p): another CPU's kernels may move a value across a rounding edge.
        difference = np.abs(new[name].astype(int) - old[name].astype(int))
        assert difference.max() <= 1, name
        assert (difference == 0).mean() >= 0.99, name
        assert old[name].std() > 0  # the fixture holds a real prediction, not a constant


def test_old_checkpoint_masks_and_instances(tmp_path: Path) -> None:
    options = _options([*PREDICT_ARGS, *MASK_ARGS])
    out = predict_volume(CKPT, VOLUME, tmp_path / "masks.zarr", **options)
    names = (*CLASSES, *(f"{name}_instances" for name in CLASSES))
    new, old = _arrays(out, names), _arrays(FIXTURES / "masks.zarr", names)
    for name in CLASSES:
        assert (new[name] == old[name]).mean() >= 0.99, name
        assert np.array_equal(new[f"{name}_instances"] > 0, new[name] > 0)


@pytest.mark.slow  # a subprocess
def test_old_prediction_resumes_as_complete(tmp_path: Path) -> None:
    """Today's predict recognises the old output as its own and finished: nothing is rewritten.

    Its fingerprint names the input by absolute path, so where this checkout is not where the
    fixture was made, the one difference allowed (and reported) is that path.
    """
    copy = tmp_path / "prob.zarr"
    shutil.copytree(FIXTURES / "prob.zarr", copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    recorded = zarr.open_group(str(copy), mode="r").attrs["joenet"]["fingerprint"]["input"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "joenet.predict",
            f"ckpt_path={CKPT}",
            f"input={VOLUME}",
            f"output={copy}",
            *PREDICT_ARGS,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if recorded == str(VOLUME.resolve()):
        assert result.returncode == 0, result.stderr[-2000:]
        assert "0 to predict" in result.stderr + result.stdout
    else:
        error = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
        assert result.returncode == 1
        changes = error.split("other settings (")[1].split(")")[0]
        assert changes.startswith(f"input: {recorded[:37]}") and ";" not in changes
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_old_prediction_evaluates_to_the_same_metrics() -> None:
    expected = json.loads((FIXTURES / "metrics.json").read_text())
    results = evaluate_volume(FIXTURES / "prob.zarr", VOLUME)
    assert set(results["metrics"]) == set(expected["metrics"]) == set(CLASSES)
    for name, metrics in expected["metrics"].items():
        assert results["metrics"][name] == pytest.approx(metrics, abs=1e-9), name
    assert results["histograms"] == expected["histograms"]


def test_old_checkpoint_resumes_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``ckpt_path=`` an old checkpoint: training continues from its step, weights restored."""
    from hydra.utils import instantiate

    from joenet.train import _instantiate_all, keep_resumed_network

    state = torch.load(CKPT, weights_only=True, map_location="cpu")
    data_dir = tmp_path / "data"
    quiet = ["~logger", "~callbacks.validation_images", "~callbacks.lr_monitor"]
    cfg = compose_train(
        [
            *tiny_overrides(data_dir, tmp_path / "run"),
            "trainer.max_epochs=2",
            f"ckpt_path={CKPT}",
            *quiet,
        ]
    )
    restored: dict[str, bool] = {}

    class CheckRestored(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            restored["weights"] = all(
                torch.equal(value, state["current_model_state"][key])  # EMA: raw weights
                for key, value in pl_module.state_dict().items()
            )
            restored["optimizer"] = torch.equal(
                trainer.optimizers[0].state_dict()["state"][0]["exp_avg"],
                state["optimizer_states"][0]["state"][0]["exp_avg"],
            )

    # The fixture is BatchNorm (the default when it was written), the config InstanceNorm now:
    # train() resumes the checkpoint's network, saying so.
    with caplog.at_level(logging.WARNING, logger="joenet"):
        keep_resumed_network(cfg)
    assert cfg.model.net.norm == "batch"
    assert "model.net.norm=batch (the config says norm=instance)" in caplog.text
    L.seed_everything(0)
    module = instantiate(cfg.model)
    callbacks = [*_instantiate_all(cfg.callbacks), CheckRestored()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    trainer.fit(module, datamodule=instantiate(cfg.data), ckpt_path=str(CKPT))
    assert trainer.global_step == 2 * state["global_step"]  # one more epoch of as many steps
    assert trainer.current_epoch == 2
    assert restored == {"weights": True, "optimizer": True}


def test_resuming_keeps_a_network_change_the_weights_fit() -> None:
    # Resuming falls back to the trained value only of an option whose default changed (norm),
    # and only when the configured network cannot take the weights: other changes stay.
    from joenet.checkpoint import resumed_network_options

    trained = torch.load(CKPT, weights_only=True, map_location="cpu")["hyper_parameters"]["net"]
    names = ["nuclei", "mito"]
    with_dropout = dict(trained) | {"dropout": 0.2}
    assert resumed_network_options(CKPT, names, with_dropout) == with_dropout
    wider = dict(trained) | {"channels": [8, 16, 32, 64], "norm": "instance"}  # the user's
    assert resumed_network_options(CKPT, names, wider) == wider  # left to the load's error
    assert resumed_network_options(CKPT, names, dict(trained) | {"norm": "instance"}) == trained
    without_norm = {key: value for key, value in trained.items() if key != "norm"}
    assert resumed_network_options(CKPT, names, without_norm | {"norm": "instance"}) == trained
