"""Export a checkpoint's network (its EMA weights when it has them) and check the export.

Every export is reloaded and run beside the checkpoint's own network, at the tile size and at a
non-square size other than it, before it is reported written: TorchScript within
``TORCHSCRIPT_TOLERANCE`` and ONNX (run by onnxruntime) within ``ONNX_TOLERANCE`` of the
checkpoint's logits. The file is written beside its final path first, so a failed export never
leaves a half-written model at ``output``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from joenet.checkpoint import load_model
from joenet.export.metadata import export_metadata

FORMATS = ("torchscript", "onnx", "bioimageio")
TORCHSCRIPT_TOLERANCE = 1e-4  # max |logit difference|: the same kernels, another graph
ONNX_TOLERANCE = 1e-3  # onnxruntime's own convolution kernels
ONNX_OPSET = 18


def _check_sizes(tile: int, divisor: int) -> list[tuple[int, int]]:
    """The sizes every export is checked at: the tile, and a smaller non-square one."""
    other = (max(divisor, tile // 2 - divisor), max(divisor, tile // 2 + divisor))
    return [(tile, tile), other]


def _probe(size: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *size, generator=generator)


def _staged(output: Path) -> Path:
    return output.with_name(f".{output.name}.tmp-{os.getpid()}")


def export_torchscript(net: nn.Module, output: Path, tile: int, metadata: dict[str, Any]) -> float:
    """Trace ``net`` into ``output``; returns the largest logit difference found in the check."""
    example = _probe((tile, tile), 0)
    with torch.no_grad():
        traced = torch.jit.trace(net, example, check_trace=False)
    staged = _staged(output)
    torch.jit.save(traced, str(staged), _extra_files={"joenet.json": json.dumps(metadata)})
    loaded = torch.jit.load(str(staged))
    worst = 0.0
    for seed, size in enumerate(_check_sizes(tile, metadata["divisor"])):
        x = _probe(size, seed)
        with torch.no_grad():
            worst = max(worst, float((loaded(x) - net(x)).abs().max()))
    if worst > TORCHSCRIPT_TOLERANCE:
        staged.unlink()
        raise RuntimeError(
            f"TorchScript export of {metadata['checkpoint']} differs from the checkpoint by "
            f"{worst:.3g} in its logits (tolerance {TORCHSCRIPT_TOLERANCE})"
        )
    staged.replace(output)
    return worst


def export_onnx(net: nn.Module, output: Path, tile: int, metadata: dict[str, Any]) -> float:
    """Export ``net`` to ONNX with dynamic batch, height and width (multiples of the divisor)."""
    import onnx
    import onnxruntime
    from torch.export import Dim

    # The exporter's passes log every rewrite at INFO, which Hydra's log config would print.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    divisor = metadata["divisor"]
    # Height and width as multiples of the divisor: any such size is a valid input.
    height, width = Dim("height_blocks", min=1, max=4096), Dim("width_blocks", min=1, max=4096)
    shapes = {"x": {0: Dim("batch", min=1, max=1024), 2: divisor * height, 3: divisor * width}}
    staged = _staged(output)
    program = torch.onnx.export(
        net,
        (_probe((tile, tile), 0),),
        input_names=["raw"],
        output_names=["logits"],
        dynamic_shapes=shapes,
        opset_version=ONNX_OPSET,
        dynamo=True,
        external_data=False,
    )
    assert program is not None
    model = program.model_proto
    for key, value in (("joenet", json.dumps(metadata)),):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(staged))
    session = onnxruntime.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
    worst = 0.0
    for seed, size in enumerate(_check_sizes(tile, divisor)):
        x = _probe(size, seed)
        x = torch.cat([x, x.flip(-1)])  # a batch of 2: the batch axis is dynamic too
        (got,) = session.run(["logits"], {"raw": x.numpy()})
        with torch.no_grad():
            worst = max(worst, float(np.abs(got - net(x).numpy()).max()))
    if worst > ONNX_TOLERANCE:
        staged.unlink()
        raise RuntimeError(
            f"ONNX export of {metadata['checkpoint']} differs from the checkpoint by {worst:.3g} "
            f"in its logits (tolerance {ONNX_TOLERANCE})"
        )
    staged.replace(output)
    return worst


def _check_output(output: Path, format: str) -> None:
    if output.is_dir():
        raise ValueError(f"output={output} is a directory; give the file to write")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output={output}: its folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(13, "folder not writable", str(parent))
    suffix = {"torchscript": ".pt", "onnx": ".onnx", "bioimageio": ".zip"}[format]
    if output.suffix != suffix:
        raise ValueError(f"output={output}: a {format} export is a {suffix} file")


def export_model(
    ckpt_path: str | os.PathLike,
    format: str,
    output: str | os.PathLike,
    tile: int = 256,
) -> Path:
    """Export the network of a joenet checkpoint and check the export against it.

    Args:
        ckpt_path: a checkpoint of ``python -m joenet.train``.
        format: ``torchscript`` (``.pt``), ``onnx`` (``.onnx``) or ``bioimageio`` (a ``.zip``
            model package holding both).
        output: the file to write.
        tile: the tile size the export is traced at, checked at and recommends.

    Returns:
        The path written.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    output = Path(output)
    _check_output(output, format)
    model = load_model(ckpt_path, "cpu")
    if tile < model.divisor or tile % model.divisor:
        raise ValueError(f"tile must be a positive multiple of {model.divisor}, got {tile}")
    net = model.net.float().eval()  # load_model builds it afresh, eager, on the CPU
    metadata = export_metadata(model, str(ckpt_path), tile)
    if format == "torchscript":
        export_torchscript(net, output, tile, metadata)
    elif format == "onnx":
        export_onnx(net, output, tile, metadata)
    else:
        from joenet.export.bioimageio import export_bioimageio

        export_bioimageio(model, net, output, tile, metadata)
    return output
