"""A bioimage.io model package (spec 0.5): the zip that ilastik, deepImageJ and bioimageio.core run.

The package holds the network as TorchScript and ONNX (both checked against the checkpoint), the
checkpoint's normalisation as preprocessing (so a consumer feeds raw intensities and gets what
joenet's prediction gets), a sigmoid as postprocessing, the axes with the size steps and the halo
the receptive field needs, the class names, a test input with its expected output, a cover image,
a README with the training data and metrics, and the license. ``bioimageio.core`` reruns the test
input through each weight format before the package is written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from joenet.checkpoint import LoadedModel
from joenet.export.exporter import export_onnx, export_torchscript


def _scale(normalization: dict[str, Any], dtype: str) -> tuple[float, float]:
    """(gain, offset) so that ``gain * raw + offset`` is joenet's [0, 1] input for ``dtype``."""
    if normalization.get("kind") == "fixed":
        low, high = float(normalization["min"]), float(normalization["max"])
        return 1.0 / (high - low), -low / (high - low)
    if dtype.startswith("float"):
        return 1.0, 0.0
    bits = int(normalization.get("bit_depth") or np.iinfo(np.dtype(dtype)).bits)
    return 1.0 / (2**bits - 1), 0.0


def _cover(raw: np.ndarray, probabilities: np.ndarray, names: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3 * (1 + len(names)), 3.2), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 1 + len(names))
    axes[0].imshow(raw, cmap="gray")
    axes[0].set_title("raw")
    for ax, name, p in zip(axes[1:], names, probabilities, strict=True):
        ax.imshow(p, cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"{name} probability")
    for ax in axes:
        ax.set_axis_off()
    figure.savefig(path, dpi=80)


def _readme(metadata: dict[str, Any], run: dict[str, Any], path: Path) -> None:
    lines = [
        "# joenet U-Net",
        "",
        "A 2D U-Net trained with joenet to segment "
        + " and ".join(metadata["class_names"])
        + " in electron-microscopy sections, one sigmoid channel per class.",
        "",
        "## Input and output",
        "",
        f"- input `raw`: one grayscale section (batch, 1, y, x), y and x multiples of "
        f"{metadata['divisor']}; preprocessing maps raw intensities to [0, 1] as training did "
        f"({metadata['normalization']}).",
        "- output `probabilities`: (batch, class, y, x) after the sigmoid postprocessing.",
        f"- tiles: {metadata['tile']} px recommended, with a halo of {metadata['halo']} px "
        f"(receptive field {metadata['receptive_field']} px).",
        f"- voxel size of the training data: {metadata['voxel_size_nm'] or 'unknown'} nm "
        "(z, y, x).",
        "",
        "## Training",
        "",
    ]
    if run.get("data"):
        lines.append(f"- data: `{json.dumps(run['data'])}`")
    summary = run.get("summary") or {}
    if summary.get("best") is not None:
        lines.append(
            f"- best validation {summary['monitor']} {summary['best']:.4f} at epoch "
            f"{summary['best_epoch']} ({summary.get('patches', '?')} patches seen):"
        )
        for name, value in sorted((summary.get("best_metrics") or {}).items()):
            lines.append(f"  - {name}: {value:.4f}")
    lines += [
        "",
        f"Exported from `{metadata['checkpoint']}` by joenet {metadata['joenet_version']}.",
    ]
    path.write_text("\n".join(lines) + "\n")


def _training_record(ckpt_path: str) -> dict[str, Any]:
    """The run's data config and summary, when the checkpoint still sits in its run directory."""
    run_dir = Path(ckpt_path).resolve().parent.parent
    record: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        record["summary"] = json.loads((run_dir / "summary.json").read_text())
    if (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")).get("data", {})
        record["data"] = {k: data.get(k) for k in ("path", "train_z", "val_z", "patch_size")}
    return record


def _validation_tile(record: dict[str, Any], side: int) -> np.ndarray:
    """A ``side`` px tile of the first validation slice of the training volume, as raw values;
    random uint8 values when that volume is not at hand (or not uint8)."""
    data = record.get("data") or {}
    try:
        import zarr

        raw = zarr.open_group(str(data["path"]), mode="r")["raw"]
        z = int((data.get("val_z") or [raw.shape[0] // 2])[0])
        y0, x0 = max(0, (raw.shape[1] - side) // 2), max(0, (raw.shape[2] - side) // 2)
        tile = np.asarray(raw[z, y0 : y0 + side, x0 : x0 + side])
        if tile.shape == (side, side) and tile.dtype == np.uint8:
            return tile.astype(np.float32)
    except Exception:  # no volume there: the package is still complete with a random tile
        pass
    return np.random.default_rng(0).integers(0, 256, (side, side)).astype(np.float32)


def export_bioimageio(
    model: LoadedModel,
    net: nn.Module,
    output: Path,
    tile: int,
    metadata: dict[str, Any],
    name: str = "joenet U-Net",
    authors: list[str] | None = None,
    license: str = "MIT",
    test_input: np.ndarray | None = None,
) -> Path:
    """Write the bioimage.io package of ``net`` to ``output`` (a .zip), validated and tested."""
    from bioimageio.core import test_model
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    raw_dtype = "uint8"
    gain, offset = _scale(metadata["normalization"], raw_dtype)
    # An input must be larger than the halo on both sides, in steps of the divisor.
    step = metadata["divisor"]
    min_size = 2 * metadata["halo"] + step
    side = max(tile, min_size)
    record = _training_record(metadata["checkpoint"])
    if test_input is None:
        test_input = _validation_tile(record, side)
    raw = test_input.astype(np.float32)[None, None]  # (1, 1, y, x), raw intensities
    x = torch.from_numpy(np.clip(raw * gain + offset, 0, 1))
    with torch.no_grad():
        probabilities = torch.sigmoid(net(x)).numpy()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        export_torchscript(net, tmp / "weights.pt", tile, metadata)
        export_onnx(net, tmp / "weights.onnx", tile, metadata)
        np.save(tmp / "test_input.npy", raw)
        np.save(tmp / "test_output.npy", probabilities)
        _cover(raw[0, 0], probabilities[0], metadata["class_names"], tmp / "cover.png")
        _readme(metadata, record, tmp / "README.md")
        size = spec.ParameterizedSize(min=min_size, step=step)
        raw_id = spec.TensorId("raw")
        inputs = spec.InputTensorDescr(
            id=raw_id,
            description="one EM section, raw intensities",
            axes=[
                spec.BatchAxis(),
                spec.ChannelAxis(channel_names=[spec.Identifier("raw")]),
                spec.SpaceInputAxis(id=spec.AxisId("y"), size=size),
                spec.SpaceInputAxis(id=spec.AxisId("x"), size=size),
            ],
            test_tensor=spec.FileDescr(source=tmp / "test_input.npy"),
            data=spec.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[
                spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=gain, offset=offset)),
                spec.ClipDescr(kwargs=spec.ClipKwargs(min=0.0, max=1.0)),
            ],
        )
        names = metadata["class_names"]
        space = [
            spec.SpaceOutputAxisWithHalo(
                id=spec.AxisId(axis),
                size=spec.SizeReference(tensor_id=raw_id, axis_id=spec.AxisId(axis)),
                halo=metadata["halo"],
            )
            for axis in "yx"
        ]
        outputs = spec.OutputTensorDescr(
            id=spec.TensorId("probabilities"),
            description="sigmoid probability per class",
            axes=[
                spec.BatchAxis(),
                spec.ChannelAxis(channel_names=[spec.Identifier(n) for n in names]),
                *space,
            ],
            test_tensor=spec.FileDescr(source=tmp / "test_output.npy"),
            postprocessing=[spec.SigmoidDescr()],
        )
        version = spec.Version(torch.__version__.split("+")[0])
        descr = spec.ModelDescr(
            name=name,
            description="2D U-Net for nuclei and mitochondria in EM, trained with joenet",
            authors=[spec.Author(name=a) for a in (authors or ["joenet"])],
            cite=[
                spec.CiteEntry(
                    text="Ronneberger et al., U-Net: Convolutional Networks for Biomedical "
                    "Image Segmentation, MICCAI 2015",
                    doi=spec.Doi("10.1007/978-3-319-24574-4_28"),
                )
            ],
            license=spec.LicenseId(license),
            covers=[spec.FileDescr(source=tmp / "cover.png")],
            documentation=spec.FileDescr(source=tmp / "README.md"),
            tags=["electron-microscopy", "segmentation", "mitochondria", "nuclei", "unet", "2d"],
            inputs=[inputs],
            outputs=[outputs],
            weights=spec.WeightsDescr(
                torchscript=spec.TorchscriptWeightsDescr(
                    source=tmp / "weights.pt", pytorch_version=version
                ),
                onnx=spec.OnnxWeightsDescr(
                    source=tmp / "weights.onnx", opset_version=18, parent="torchscript"
                ),
            ),
            config={"joenet": metadata},
        )
        for weights in ("torchscript", "onnx"):
            summary = test_model(descr, weight_format=weights)
            if summary.status != "passed":
                raise RuntimeError(
                    f"bioimageio.core: the {weights} weights of the package did not reproduce "
                    f"its test output: {summary.format()[:2000]}"
                )
        staged = output.with_name(f".{output.name}.tmp")
        save_bioimageio_package(descr, output_path=staged)
        shutil.move(staged, output)
    return output
