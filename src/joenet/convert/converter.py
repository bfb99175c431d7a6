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
from typing import Literal

import numpy as np
import zarr
from tqdm import tqdm

from joenet import __version__
from joenet.convert.readers import Source, open_source
from joenet.volume.atomic import replace_dir, staging_path

LabelMode = Literal["auto", "binary", "instances", "threshold"]
DEFAULT_CHUNKS = (1, 256, 256)
_SLAB_BYTES = 256 * 2**20  # input memory per slab; a slab is at least one output chunk deep

log = logging.getLogger(__name__)
# Signal numbers the CLI received. Its handlers only record them and the slab loop stops between
# slabs: interrupting zarr mid-write lets its I/O thread finish chunks after the temporary group
# was removed, leaving debris behind.
_signals: list[int] = []


class ConvertError(ValueError):
    """A conversion that cannot run as asked; the message says which input or option and why."""


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

        # key -> (source key, converter, output dtype); a label source feeds two arrays with
        # --keep-instances but is read once.
        plan: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], np.dtype]] = {}
        raw_converter = RawConverter(raw_source, rescale)
        plan["raw"] = ("raw", raw_converter, raw_converter.dtype)
        converters: dict[str, LabelConverter] = {}
        for key, source in sources.items():
            if key == "raw":
                continue
            mode = "binary" if key == "labels/mask" else label_mode
            converters[key] = LabelConverter(key, source, mode, label_threshold)
            plan[key] = (key, converters[key], np.dtype(np.uint8))
            if keep_instances and key != "labels/mask":
                plan[f"{key}_instances"] = (key, converters[key].instances, np.dtype(np.uint32))

        tmp = staging_path(output)
        shutil.rmtree(tmp, ignore_errors=True)  # only a dead run with our pid can have left it
        try:
            group = zarr.open_group(tmp, mode="w")
            clipped = (min(chunks[0], shape[0]), min(chunks[1], shape[1]), min(chunks[2], shape[2]))
            bar = tqdm(total=shape[0], unit="slice", desc=output.name, disable=not progress)
            with bar:
                _write_arrays(group, sources, plan, clipped, zstd_level, bar.update)
            group.attrs.update(
                {
                    "name": output.name.removesuffix(".zarr"),
                    "source": {key: source.path for key, source in sources.items()},
                    "voxel_size_nm": voxel_size,
                    "axes": "zyx",  # as the real groups in shared/data store it
                    "labels_available": list(labels),
                    "converter": {
                        "label_mode": label_mode,
                        "version": __version__,
                        "raw": raw_converter.describe(),
                        "labels": {key: c.describe() for key, c in converters.items()},
                    },
                }
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


class RawConverter:
    """Raw slabs as stored: uint8/uint16 kept, floats as float32, or mapped to uint8 by ``rescale``.

    Args:
        source: the raw input.
        rescale: (low, high) mapped to 0..255, ``"percentile"`` for its 0.5 and 99.5 percentiles
            (estimated on up to 9 evenly spaced slices), or None.
    """

    def __init__(self, source: Source, rescale: tuple[float, float] | str | None):
        self.source, self.range = source, None
        self.dtype: np.dtype
        dtype = source.dtype.newbyteorder("=")  # big-endian TIFF/HDF5 data is still uint16
        if rescale is not None:
            self.range = _percentiles(source) if rescale == "percentile" else tuple(rescale)
            if not self.range[1] > self.range[0]:
                raise ConvertError(f"{source.path}: rescale range {self.range} is empty")
            self.dtype = np.dtype(np.uint8)
        elif dtype in (np.uint8, np.uint16):
            self.dtype = dtype
        elif dtype.kind == "f":
            self.dtype = np.dtype(np.float32)
            low, high = _sample_range(source)
            if low < 0 or high > 1:
                raise ConvertError(
                    f"{source.path}: raw is {dtype} with values in [{low:g}, {high:g}], but "
                    "joenet clips float images to [0, 1]; pass --rescale (percentiles) or "
                    "--rescale LOW HIGH to store it as uint8"
                )
        else:
            raise ConvertError(
                f"{source.path}: raw dtype {dtype} is not one joenet reads (uint8, uint16, "
                "float); pass --rescale LOW HIGH to store it as uint8"
            )

    def __call__(self, slab: np.ndarray) -> np.ndarray:
        if self.range is None:
            return slab.astype(self.dtype, copy=False)
        low, high = self.range
        scaled = (slab.astype(np.float32) - low) * np.float32(255.0 / (high - low))
        return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)

    def describe(self) -> str:
        """What was done, for the log and the ``converter`` attribute."""
        if self.range is not None:
            low, high = self.range
            return f"{self.source.dtype} [{low:g}, {high:g}] -> uint8"
        if self.dtype == self.source.dtype:
            return f"{self.dtype} kept"
        return f"{self.source.dtype} -> {self.dtype}"


class LabelConverter:
    """Label slabs as 0/1 uint8 masks; in auto and instances mode it records which values it saw.

    Args:
        key: output array, for messages.
        source: the label input.
        mode: see ``convert``.
        threshold: the threshold of ``threshold`` mode.
    """

    def __init__(self, key: str, source: Source, mode: str, threshold: float | None):
        self.key, self.source, self.mode, self.threshold = key, source, mode, threshold
        self.has_one = self.has_255 = self.has_other = False
        self.max_id, self.foreground, self.total = 0, 0, 0
        if mode == "instances" and source.dtype.kind not in "iub":
            raise ConvertError(
                f"{source.path}: instance ids must be integers, got {source.dtype}; use "
                "--label-mode threshold --label-threshold T or binary"
            )

    def __call__(self, slab: np.ndarray) -> np.ndarray:
        if self.mode == "threshold":
            mask = slab > self.threshold
        else:
            if self.mode != "binary":
                self._inspect(slab)
            mask = slab != 0
        self.foreground += int(np.count_nonzero(mask))
        self.total += mask.size
        return mask.astype(np.uint8)

    def instances(self, slab: np.ndarray) -> np.ndarray:
        """The slab's instance ids as uint32 (``--keep-instances``)."""
        if self.max_id > np.iinfo(np.uint32).max:
            raise ConvertError(f"{self.source.path}: instance id {self.max_id} exceeds uint32")
        return slab.astype(np.uint32)

    def _inspect(self, slab: np.ndarray) -> None:
        if slab.dtype.kind == "f" and not np.isin(slab, (0, 1)).all():
            raise ConvertError(
                f"{self.source.path}: float labels with values other than 0 and 1 (a "
                "probability map?); use --label-mode threshold --label-threshold 0.5"
            )
        values = slab[slab != 0]
        if values.size == 0:
            return
        if values.min() < 0:
            raise ConvertError(
                f"{self.source.path}: negative label value {values.min()}; if it marks "
                "unlabelled voxels, use --label-mode threshold --label-threshold 0"
            )
        self.has_one |= bool((values == 1).any())
        self.has_255 |= bool((values == 255).any())
        self.has_other |= bool(((values != 1) & (values != 255)).any())
        self.max_id = max(self.max_id, int(values.max()))

    def describe(self) -> str:
        """What was done, for the log and the ``converter`` attribute."""
        if self.mode == "threshold":
            what = f"value > {self.threshold:g} -> 1"
        elif self.mode == "binary":
            what = "nonzero -> 1"
        elif not (self.has_one or self.has_255 or self.has_other):
            what = "all 0 (empty mask)"
        elif not (self.has_255 or self.has_other):
            what = "0/1 mask kept"
        elif not (self.has_one or self.has_other):
            what = "0/255 mask -> 0/1"
        else:
            what = f"instance ids (max {self.max_id}) -> 0/1 foreground"
        share = 100 * self.foreground / max(self.total, 1)
        return f"{what} ({self.mode}), {share:.2f} % foreground"


def _sample(source: Source, count: int = 9) -> np.ndarray:
    """Pixels of up to ``count`` evenly spaced slices, each thinned to about 512 x 512."""
    stride = max(1, int(np.sqrt(source.shape[1] * source.shape[2] / 512**2)))
    zs = np.unique(np.linspace(0, source.shape[0] - 1, count).round().astype(int))
    return np.concatenate([source.read(z, z + 1)[0, ::stride, ::stride].ravel() for z in zs])


def _sample_range(source: Source) -> tuple[float, float]:
    values = _sample(source)
    return float(np.nanmin(values)), float(np.nanmax(values))


def _percentiles(source: Source) -> tuple[float, float]:
    low, high = np.nanpercentile(_sample(source).astype(np.float64), (0.5, 99.5))
    return float(low), float(high)


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
    if label_mode not in ("auto", "binary", "instances", "threshold"):
        raise ConvertError(
            f"label mode {label_mode!r}: expected auto, binary, instances, threshold"
        )
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
