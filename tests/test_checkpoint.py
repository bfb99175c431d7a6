"""Loading a checkpoint for prediction: no Lightning, the same network, one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from joenet.checkpoint import DATA_STATE_KEY, load_model, read_checkpoint


def test_prediction_and_evaluation_start_without_lightning(ckpt_path: Path) -> None:
    # Lightning's import is ~5 s of every prediction CLI's start; loading must not need it.
    code = (
        "import json, sys\n"
        "import joenet.predict, joenet.evaluate\n"
        "from joenet.checkpoint import load_model\n"
        f"model = load_model({str(ckpt_path)!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_loaded_network_is_the_lightning_modules(ckpt_path: Path) -> None:
    from joenet.data.datamodule import EMDataModule
    from joenet.lit_module import SegmentationLitModule

    checkpoint = read_checkpoint(ckpt_path)
    module = SegmentationLitModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    loaded = load_model(ckpt_path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.net(x), module.net.eval()(x))
    assert repr(loaded.net) == repr(module.net)
    assert EMDataModule.__qualname__ == DATA_STATE_KEY and DATA_STATE_KEY in checkpoint
    assert loaded.class_names == checkpoint[DATA_STATE_KEY]["class_names"]


def test_weights_that_do_not_fit_their_network_are_one_clear_error(
    ckpt_path: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(ckpt_path, weights_only=True)
    trained = checkpoint["hyper_parameters"]["net"]["channels"]
    checkpoint["hyper_parameters"]["net"]["channels"] = [c * 2 for c in trained]
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    with pytest.raises(ValueError, match=r"ckpt_path=.*edited\.ckpt: its weights do not fit"):
        load_model(edited)


def test_configs_naming_the_plugin_in_its_old_module_still_compose() -> None:
    import joenet.checkpoint
    from joenet.checkpoint_io import AtomicCheckpointIO

    assert joenet.checkpoint.AtomicCheckpointIO is AtomicCheckpointIO
    with pytest.raises(AttributeError):
        _ = joenet.checkpoint.NoSuchThing
