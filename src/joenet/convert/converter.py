"""Convert a TIFF stack, a slice folder, HDF5 or N5 into the zarr layout joenet reads.

```bash
python -m joenet.convert cell.zarr --raw stack.tif --label mito=mito_slices/ \\
    --label nuclei=seg.h5:/nuclei --voxel-size 8 4 4
```

The output is a zarr v3 group with ``raw`` (z, y, x) and ``labels/<class>`` uint8 0/1, chunked
(default (1, 256, 256)) and zstd-compressed, as in ``data/README.md``. Inputs are read and written
slab by slab along z, so a stack larger than memory converts. The group is written to a temporary
sibling and renamed into place when complete: a failed or killed conversion never leaves a group
at the output path that looks finished.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import zarr
from tqdm import tqdm

from joenet import __version__
from joenet.convert.readers import Source, open_source
from joenet.convert.values import ConvertError, LabelConverter, LabelMode, RawConverter
from joenet.volume.atomic import replace_dir, staging_path
from joenet.volume.layout import volume_attrs
from joenet.volume.output_lock import exclusive_output

DEFAULT_CHUNKS = (1, 256, 256)
_SLAB_BYTES = 256 * 2**20  # input memory per slab; a slab is at least one output chunk deep

log = logging.getLogger(__name__)
# Signal numbers the CLI received. Its handlers only record them and the slab loop stops between
# slabs: interrupting zarr mid-write lets its I/O thread finish chunks after the temporary group
# was removed, leaving debris behind.
_signals: list[int] = []


def convert(
    output: str | Path,
    raw: str,
    labels: Mapping[str, str] | None = None,
    mask: str | None = None,
    voxel_size_nm: Sequence[float] | None = None,
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    label_mode: LabelMode = "auto",
    label_threshold: float | None = None,
    keep_instances: bool = False,
    rescale: tuple[float, float] | Literal["percentile"] | None = None,
    zstd_level: int = 3,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert ``raw`` (and label and mask volumes of the same shape) into a zarr group.

    Args:
        output: the zarr group to create.
        raw: image source: a TIFF stack, a folder of slices, ``file.h5:/dataset`` or
            ``container.n5:/dataset``.
        labels: class name -> label source; each becomes ``labels/<class>`` uint8 0/1.
        mask: optional source of the annotated region, stored as ``labels/mask`` uint8 0/1
            (nonzero -> 1); joenet leaves pixels outside it out of loss and metrics.
        voxel_size_nm: (z, y, x) voxel size in nm for the ``voxel_size_nm`` attribute.
        chunks: output chunk shape (z, y, x), clipped to the volume.
        label_mode: ``binary``: nonzero -> 1; ``instances``: the same, for instance ids;
            ``threshold``: value > ``label_threshold`` -> 1; ``auto``: 0/1 kept, 0/255 -> 0/1,
            anything else taken as instance ids (nonzero -> 1), reported in the log.
        label_threshold: the threshold of ``label_mode="threshold"``.
        keep_instances: with ``label_mode="instances"``, also store ``labels/<class>_instances``
            as uint32.
        rescale: map raw to uint8 from this (low, high) range, or from its 0.5 and 99.5
            percentiles (``"percentile"``); None keeps uint8, uint16 and float raw as they are.
        zstd_level: zstd compression level (the shared real groups use 19: smaller, much slower).
        overwrite: replace an existing zarr group at ``output``.
        progress: show a progress bar on stderr.

    Returns:
        ``output`` as a ``Path``.

    Raises:
        ConvertError, SourceError: bad options, unreadable or mismatched inputs, existing output.
    """
    output = Path(output)
    labels = dict(labels or {})
    chunks = _check_options(output, labels, chunks, label_mode, label_threshold, keep_instances)
    voxel_size = _voxel_size(voxel_size_nm)
    _check_output(output, overwrite)
    with ExitStack() as stack:
        stack.enter_context(exclusive_output(output, "joenet.convert"))
        _check_output(output, overwrite)  # again: another conversion may have finished meanwhile
        raw_source, sources = _open_sources(stack, output, raw, labels, mask)
        shape = raw_source.shape

        plan, raw_converter, converters = _plan(
            sources, rescale, label_mode, label_threshold, keep_instances
        )

        tmp = staging_path(output)
        shutil.rmtree(tmp, ignore_errors=True)  # only a dead run with our pid can have left it
        try:
            group = zarr.open_group(tmp, mode="w")
            clipped = (min(chunks[0], shape[0]), min(chunks[1], shape[1]), min(chunks[2], shape[2]))
            bar = tqdm(total=shape[0], unit="slice", desc=output.name, disable=not progress)
            with bar:
                _write_arrays(group, sources, plan, clipped, zstd_level, bar.update)
            converter_attrs = {
                "label_mode": label_mode,
                "version": __version__,
                "raw": raw_converter.describe(),
                "labels": {key: c.describe() for key, c in converters.items()},
            }
            group.attrs.update(
                volume_attrs(
                    output.name.removesuffix(".zarr"),
                    {key: source.path for key, source in sources.items()},
                    voxel_size,
                    list(labels),
                    converter=converter_attrs,
                )
            )
            replace_dir(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("raw: %s", raw_converter.describe())
    for key, converter in converters.items():
        log.info("%s: %s", key, converter.describe())
    if voxel_size_nm is None:
        log.info("voxel size unknown: pass --voxel-size Z Y X to record it")
    log.info("wrote %s: shape %s, chunks %s, zstd level %d", output, shape, clipped, zstd_level)
    return output


def _open_sources(
    stack: ExitStack,
    output: Path,
    raw: str | Path,
    labels: Mapping[str, str | Path],
    mask: str | Path | None,
) -> tuple[Source, dict[str, Source]]:
    """Open raw and every label input (closed with ``stack``); all must have raw's shape."""
    raw_source = stack.enter_context(open_source(raw))
    shape = raw_source.shape
    inputs = {f"labels/{name}": spec for name, spec in labels.items()}
    if mask is not None:
        inputs["labels/mask"] = mask
    sources = {"raw": raw_source}
    for key, spec in inputs.items():
        sources[key] = source = stack.enter_context(open_source(spec))
        if source.shape != shape:
            raise ConvertError(
                f"{source.path}: {key} has shape {source.shape}, but raw "
                f"({raw_source.path}) has shape {shape}; they must be equal"
            )
    for source in sources.values():
        _check_not_replaced(output, source)
    return raw_source, sources


Plan = dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], np.dtype]]


def _plan(
    sources: Mapping[str, Source],
    rescale: tuple[float, float] | Literal["percentile"] | None,
    label_mode: LabelMode,
    label_threshold: float | None,
    keep_instances: bool,
) -> tuple[Plan, RawConverter, dict[str, LabelConverter]]:
    """Output key -> (source key, converter, dtype); with --keep-instances a label source
    feeds two arrays but is read once."""
    raw_converter = RawConverter(sources["raw"], rescale)
    plan: Plan = {"raw": ("raw", raw_converter, raw_converter.dtype)}
    converters: dict[str, LabelConverter] = {}
    for key, source in sources.items():
        if key == "raw":
            continue
        mode = "binary" if key == "labels/mask" else label_mode
        converters[key] = LabelConverter(key, source, mode, label_threshold)
        plan[key] = (key, converters[key], np.dtype(np.uint8))
        if keep_instances and key != "labels/mask":
            plan[f"{key}_instances"] = (key, converters[key].instances, np.dtype(np.uint32))
    return plan, raw_converter, converters


def _write_arrays(
    group: zarr.Group,
    sources: dict[str, Source],
    plan: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], np.dtype]],
    chunks: tuple[int, int, int],
    zstd_level: int,
    advance: Callable[[int], object],
) -> None:
    """Create the arrays of ``plan`` in ``group`` and fill them slab by slab along z."""
    shape = sources["raw"].shape
    codec = zarr.codecs.ZstdCodec(level=zstd_level)
    arrays = {
        key: group.create_array(
            key, shape=shape, chunks=chunks, dtype=dtype, compressors=codec, fill_value=0
        )
        for key, (_, _, dtype) in plan.items()
    }
    depth = _slab_depth(chunks[0], list(sources.values()))
    for start in range(0, shape[0], depth):
        stop = min(start + depth, shape[0])
        slabs = {key: source.read(start, stop) for key, source in sources.items()}
        for key, (source_key, converter, _) in plan.items():
            _write_slab(arrays[key], start, converter(slabs[source_key]))
        advance(stop - start)
        if _signals:
            raise KeyboardInterrupt(f"signal {_signals[0]}")


def _write_slab(array: zarr.Array, start: int, data: np.ndarray) -> None:
    array[start : start + len(data)] = data


def _check_options(
    output: Path,
    labels: dict[str, str],
    chunks: Sequence[int],
    label_mode: str,
    label_threshold: float | None,
    keep_instances: bool,
) -> tuple[int, int, int]:
    for name in labels:
        if not name or "/" in name or name.endswith("_instances") or name.startswith("."):
            raise ConvertError(f"label class name {name!r}: expected a plain name like 'mito'")
        if name == "mask":
            raise ConvertError("'mask' is not a class: pass the annotated region as --mask SOURCE")
    if label_mode not in get_args(LabelMode):
        raise ConvertError(f"label mode {label_mode!r}: expected {', '.join(get_args(LabelMode))}")
    if (label_mode == "threshold") != (label_threshold is not None):
        raise ConvertError("--label-threshold T goes with --label-mode threshold, and only with it")
    if keep_instances and label_mode != "instances":
        raise ConvertError("--keep-instances needs --label-mode instances")
    if len(chunks) != 3 or min(chunks) < 1:
        raise ConvertError(f"chunks {tuple(chunks)}: expected three positive ints (z, y, x)")
    if output.suffix != ".zarr":
        log.warning("%s: output name does not end in .zarr", output)
    return (int(chunks[0]), int(chunks[1]), int(chunks[2]))


def _check_output(output: Path, overwrite: bool) -> None:
    if not output.exists():
        return
    if not overwrite:
        raise ConvertError(f"{output}: already exists; pass --overwrite to replace it")
    is_group = (output / "zarr.json").is_file() or (output / ".zgroup").is_file()
    if not is_group and not (output.is_dir() and not any(output.iterdir())):
        # --overwrite must never delete a data folder that a typo in the output path points at.
        raise ConvertError(f"{output}: exists and is not a zarr group; refusing to replace it")


def _check_not_replaced(output: Path, source: Source) -> None:
    target = output.resolve()
    if target == source.file or target in source.file.parents:
        raise ConvertError(f"{output}: the output would replace the input {source.path}")


def _slab_depth(chunk_z: int, sources: list[Source]) -> int:
    """Slices per read: whole output chunks, and whole input chunks where memory allows."""
    want = max([chunk_z] + [source.z_chunk for source in sources])
    depth = -(-want // chunk_z) * chunk_z
    slice_bytes = sum(np.prod(s.shape[1:]) * s.dtype.itemsize for s in sources)
    cap = max(1, int(_SLAB_BYTES // max(slice_bytes, 1)) // chunk_z) * chunk_z
    return min(depth, cap)


def _voxel_size(voxel_size_nm: Sequence[float] | None) -> list[float] | None:
    if voxel_size_nm is None:
        return None
    if len(voxel_size_nm) != 3 or min(voxel_size_nm) <= 0:
        raise ConvertError(f"voxel size {tuple(voxel_size_nm)}: expected three positive numbers")
    return [int(v) if float(v).is_integer() else float(v) for v in voxel_size_nm]
