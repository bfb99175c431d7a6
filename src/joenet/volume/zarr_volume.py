# long: one class, ZarrVolume; its three reading paths (whole labels, CellMap crops, in memory
# or lazy) share the opened arrays and the window arithmetic, and split apart they would pass
# both back and forth.
"""Read patches from an EM volume in zarr: a plain ``raw`` array or an OME-Zarr multiscale image.

Labels are either whole-volume masks ``labels/<class>`` or, in the CellMap layout, small crops
placed by their physical offsets (``label_crops``). Intensities are mapped to [0, 1] by
``normalize``; the volume reports the exact mapping it used (``ZarrVolume.normalization``) so
prediction can repeat it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store

from joenet.volume.intensity import (
    DTYPE_RANGE,
    check_finite,
    fit_normalization,
    intensity_sample,
    normalize,
)
from joenet.volume.layout import VolumeError, open_zarr
from joenet.volume.ome import (
    ImageRef,
    MetadataError,
    ScaleLevel,
    box_in,
    read_multiscale,
    resolve_image,
    to_index,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _LabelPiece:
    """One class of one label crop: where it lies in raw voxels and how its values read."""

    crop: str
    channel: int
    image: ImageRef
    shape: tuple[int, int, int]
    box: tuple[int, int, int, int, int, int]
    absent: int
    unknown: int | None
    present: int | None


class ZarrVolume:
    """One EM volume: a (z, y, x) image plus 0/1 class masks, read lazily window by window.

    ``raw_key`` names a plain array (``raw``, the default layout), an array inside an OME-Zarr
    multiscale group (``recon-1/em/fibsem-uint8/s0``) or the multiscale group itself (``""`` for
    the root), in which case ``scale_level`` or ``voxel_size_nm`` picks the level (default: the
    finest). Labels are ``labels/<key>`` arrays (or multiscale groups) of the raw's shape, or,
    with ``label_crops``, CellMap crops: groups ``<crop>/<key>`` placed by their OME translation,
    read at the raw window's positions; pixels outside every crop have ``valid`` = 0 and
    ``annotated_boxes`` lists where to sample. ``<key>`` is ``label_keys.get(class, class)``.

    Arrays are opened lazily (also after pickling into a DataLoader worker, which reopens the
    store, local or URL). Raw plus labels are loaded into memory once per process when they fit
    ``cache_bytes``; otherwise only the labels when they fit (crops are small); otherwise every
    read touches only the chunks overlapping its window.

    An optional ``labels/mask`` array marks annotated pixels (0 = not annotated): such pixels are
    excluded from loss and metrics through the ``valid`` map that ``read`` returns.

    Args:
        path: the zarr group: a folder, an fsspec URL (``s3://``, ``http://``) or a zarr store.
        class_names: output channels; a class without labels is reported unlabelled.
        raw_key: path of the image array or multiscale group inside the group.
        cache_bytes: memory budget for holding arrays in memory (see above).
        scale_level: index of the multiscale level to read.
        voxel_size_nm: (z, y, x) voxel size; picks the closest level, error when none is
            within 10 %.
        normalization: ``dtype_range`` (default), ``{"kind": "fixed", "min", "max"}`` or
            ``{"kind": "percentile", "low": 0.5, "high": 99.5}`` (estimated once from a strided
            sample of chunks, then used as ``fixed``).
        label_keys: label array name per class, e.g. ``{"nuclei": "nuc"}``.
        label_crops: a group whose child groups are crops, or a list of crop group paths.
        storage_options: fsspec options for URLs, e.g. ``{"anon": True}`` for public S3.
    """

    def __init__(
        self,
        path: str | Path | Store,
        class_names: Sequence[str] = ("nuclei", "mito"),
        raw_key: str = "raw",
        cache_bytes: int = 2**30,
        *,
        scale_level: int | None = None,
        voxel_size_nm: Sequence[float] | None = None,
        normalization: Mapping[str, Any] | None = None,
        label_keys: Mapping[str, str] | None = None,
        label_crops: str | Sequence[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ):
        self._store = path if isinstance(path, Store) else None
        self.path = str(path)
        self.class_names = list(class_names)
        self.raw_key = raw_key
        self.cache_bytes = cache_bytes
        self.storage_options = dict(storage_options) if storage_options else None
        self._arrays: tuple | None = None
        group = self._group()
        if raw_key and group.get(raw_key) is None:
            hint = (
                ": this group is an OME-Zarr image, use raw_key=''"
                if read_multiscale(group.attrs, self.path)
                else ""
            )
            raise VolumeError(f"{self.path}: no '{raw_key}' array (expected raw (z, y, x)){hint}")
        self._raw = self._resolve(group, raw_key, scale_level, voxel_size_nm)
        raw = group[self._raw.path]
        self.shape: tuple[int, int, int] = tuple(raw.shape[self._raw.leading :])  # type: ignore[assignment]
        self.dtype = raw.dtype
        level = self._raw.level
        if level is not None:
            self.voxel_size_nm: list[float] | None = list(level.scale) if self._raw.in_nm else None
        else:
            size = group.attrs.get("voxel_size_nm")
            self.voxel_size_nm = [float(v) for v in size] if size else None
        keys = [dict(label_keys or {}).get(name, name) for name in self.class_names]
        self._crops: list[_LabelPiece] | None = None
        self._labels: list[ImageRef | None] = []
        if label_crops is None:
            self._labels = [self._label(group, f"labels/{key}") for key in [*keys, "mask"]]
        else:
            self._crops = self._find_crops(group, label_crops, keys)
        if self._crops is None:
            self.labelled = tuple(label is not None for label in self._labels[:-1])
        else:
            present = {piece.channel for piece in self._crops}
            self.labelled = tuple(channel in present for channel in range(len(keys)))
        self.normalization = self._resolve_normalization(raw, normalization or {})

    # -- opening ---------------------------------------------------------------------------

    def _group(self) -> zarr.Group:
        group = open_zarr(self._store or self.path, storage_options=self.storage_options)
        assert isinstance(group, zarr.Group)  # open_zarr(group=True) opens groups only
        return group

    def _resolve(
        self,
        group: zarr.Group,
        key: str,
        scale_level: int | None = None,
        voxel_size_nm: Sequence[float] | None = None,
        like: ScaleLevel | None = None,
    ) -> ImageRef:
        where = f"{self.path}/{key}".rstrip("/")
        try:
            return resolve_image(group, key, where, scale_level, voxel_size_nm, like)
        except MetadataError as err:
            raise VolumeError(str(err)) from None

    def _label(self, group: zarr.Group, key: str) -> ImageRef | None:
        if group.get(key) is None:
            return None
        label = self._resolve(group, key, like=self._raw.level)
        shape = group[label.path].shape[label.leading :]
        if tuple(shape) != self.shape:
            raise VolumeError(f"{self.path}/{key}: shape {shape} differs from raw {self.shape}")
        return label

    def _find_crops(
        self, group: zarr.Group, label_crops: str | Sequence[str], keys: list[str]
    ) -> list[_LabelPiece]:
        raw = self._raw.level
        if raw is None:
            raise VolumeError(
                f"{self.path}/{self.raw_key}: label_crops need the raw image's OME-Zarr scale "
                "and translation; set raw_key to a multiscale group or one of its levels"
            )
        if isinstance(label_crops, str):
            if group.get(label_crops) is None:
                raise VolumeError(f"{self.path}: no label_crops group '{label_crops}'")
            crops = [f"{label_crops}/{name}" for name in sorted(group[label_crops].group_keys())]
        else:
            crops = list(label_crops)
        pieces = []
        for crop in crops:
            for channel, key in enumerate(keys):
                if group.get(f"{crop}/{key}") is None:
                    continue  # this crop does not annotate the class
                image = self._resolve(group, f"{crop}/{key}", like=raw)
                if image.level is None:
                    raise VolumeError(f"{self.path}/{crop}/{key}: no OME-Zarr multiscales")
                array = group[image.path]
                shape = tuple(array.shape[image.leading :])
                encoding = _encoding(array.attrs) or _encoding(group[f"{crop}/{key}"].attrs)
                pieces.append(
                    _LabelPiece(
                        crop,
                        channel,
                        image,
                        shape,
                        box_in(image.level, shape, raw),  # type: ignore[arg-type]
                        absent=encoding.get("absent", 0),
                        unknown=encoding.get("unknown"),
                        present=encoding.get("present"),
                    )
                )
        if not pieces:
            raise VolumeError(
                f"{self.path}: no crop in {label_crops} has any of {keys} "
                "(check label_crops and label_keys)"
            )
        return pieces

    def _resolve_normalization(self, raw: zarr.Array, given: Mapping[str, Any]) -> dict:
        kind = given.get("kind", "dtype_range")
        where = f"{self.path}/{self._raw.path}"
        if kind == "dtype_range" and raw.dtype not in DTYPE_RANGE and raw.dtype.kind != "f":
            raise VolumeError(
                f"{where}: unsupported dtype {raw.dtype} for dtype_range normalization "
                "(expected uint8, uint16 or float; use kind 'fixed' or 'percentile')"
            )
        if raw.dtype.kind not in "iuf":
            raise VolumeError(f"{where}: unsupported dtype {raw.dtype} (expected int or float)")
        if kind == "dtype_range":
            sample = intensity_sample(raw, where, self._raw.leading)
            fix = (
                "say how its values map to [0, 1] with "
                "+data.volume.normalization={kind:percentile} (or {kind:fixed,min:..,max:..})"
            )
            return fit_normalization(sample, {"kind": "dtype_range"}, where, fix)
        if kind == "fixed" and {"min", "max"} <= set(given):
            if not float(given["min"]) < float(given["max"]):
                raise VolumeError(f"{where}: normalization min must be below max, got {given}")
            resolved = {"kind": "fixed", "min": float(given["min"]), "max": float(given["max"])}
            if "percentile" in given:  # a checkpoint's resolved percentile normalisation
                resolved["percentile"] = [float(v) for v in given["percentile"]]
            else:  # a range the user chose: say so if the data does not fit it
                sample = intensity_sample(raw, where, self._raw.leading)
                fit_normalization(sample, resolved, where, "")
            return resolved
        if kind == "percentile":
            low, high = float(given.get("low", 0.5)), float(given.get("high", 99.5))
            sample = intensity_sample(raw, where, self._raw.leading)
            lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
            if not lo < hi:
                hi = lo + 1.0  # a constant sample: map it to 0 rather than divide by zero
            return {"kind": "fixed", "min": lo, "max": hi, "percentile": [low, high]}
        raise VolumeError(
            f"{where}: normalization {dict(given)} not understood (expected kind 'dtype_range', "
            "'fixed' with min and max, or 'percentile' with low and high)"
        )

    def _checked(self, image: np.ndarray, window: tuple) -> np.ndarray:
        return check_finite(image, f"{self.path}/{self._raw.path}", window)

    def __getstate__(self) -> dict:
        # Workers reopen the store; a cached copy is not worth pickling into each of them.
        return {**self.__dict__, "_arrays": None}

    # -- reading ---------------------------------------------------------------------------

    @property
    def has_crops(self) -> bool:
        """Whether labels come from separate crops (CellMap) rather than whole-volume arrays."""
        return self._crops is not None

    def annotated_boxes(self) -> list[tuple[int, int, int, int, int, int]]:
        """Where labels exist, as half-open (z0, z1, y0, y1, x0, x1) boxes in raw voxels.

        One box per label crop (clipped to the volume), or the whole volume without crops.
        """
        if self._crops is None:
            return [(0, self.shape[0], 0, self.shape[1], 0, self.shape[2])]
        boxes: dict[str, np.ndarray] = {}
        for piece in self._crops:  # a crop's classes usually share one extent; take the union
            box = np.array(piece.box).reshape(3, 2)  # (axis, start/stop)
            old = boxes.get(piece.crop, box)
            boxes[piece.crop] = np.stack(
                [np.minimum(old[:, 0], box[:, 0]), np.maximum(old[:, 1], box[:, 1])], axis=1
            )
        clipped = []
        for box in boxes.values():
            box = np.clip(box, 0, np.array(self.shape)[:, None])
            if (box[:, 0] < box[:, 1]).all():
                clipped.append(tuple(int(v) for v in box.ravel()))
        return clipped  # type: ignore[return-value]

    def _load(self) -> tuple:
        if self._arrays is None:
            group = self._group()
            raw: Any = group[self._raw.path]  # a zarr array, or in memory below
            labels = [None if lb is None else group[lb.path] for lb in self._labels]
            pieces = [group[piece.image.path] for piece in self._crops or []]
            label_bytes = sum(a.nbytes for a in [*labels, *pieces] if a is not None)
            try:
                if raw.nbytes + label_bytes <= self.cache_bytes:
                    raw = raw[...]
                if label_bytes <= self.cache_bytes:
                    labels = [None if a is None else a[...] for a in labels]
                    pieces = [a[...] for a in pieces]
            except Exception as err:  # codecs raise their own types (zstd, blosc, OSError)
                raise VolumeError(
                    f"{self.path}: cannot load its arrays into memory ({type(err).__name__}: "
                    f"{err}); a chunk is corrupt or missing: copy or convert the volume again"
                ) from err
            self._arrays = (raw, labels, pieces)
        return self._arrays

    def read(
        self, z: int, y: int, x: int, size: int | tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """See ``_read``; a chunk that cannot be decoded becomes a ``VolumeError`` naming it."""
        try:
            return self._read(z, y, x, size)
        except VolumeError:
            raise
        except Exception as err:  # codecs raise their own types (zstd, blosc, JSON, OSError)
            height, width = (size, size) if isinstance(size, int) else size
            raise VolumeError(
                f"{self.path}: cannot read slice z={z}, y {y}:{y + height}, x {x}:{x + width} "
                f"({type(err).__name__}: {err}); a chunk is corrupt or missing: copy or "
                "convert the volume again"
            ) from err

    def check_label_values(self, z_start: int, z_stop: int, max_slices: int = 4) -> None:
        """Raise a ``VolumeError`` unless the label masks hold only 0 and 1 (sampled slices).

        Instance IDs or 0/255 masks would otherwise train silently on wrong targets.
        """
        if self._crops is not None:
            return  # crops carry their own encoding (absent/unknown/present), read per crop
        _, labels, _ = self._load()
        slices = np.unique(np.linspace(z_start, z_stop - 1, max_slices).round().astype(int))
        for name, label, info in zip(self.class_names, labels[:-1], self._labels, strict=False):
            if label is None:
                continue
            for z in slices:
                values = np.unique(np.asarray(label[(0,) * info.leading + (int(z),)]))
                if values.size and (values.min() < 0 or values.max() > 1):
                    raise VolumeError(
                        f"{self.path}/labels/{name}: values {values[:6].tolist()} in slice "
                        f"z={z}, expected a 0/1 mask. Convert instance IDs or 0/255 masks with "
                        "`python -m joenet.data.convert ... --label-mode auto` (or binary)"
                    )

    def _read(
        self, z: int, y: int, x: int, size: int | tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window of slice ``z`` whose top-left corner is (y, x), ``size`` = side or (h, w).

        Returns:
            image (1, h, w) float32 in [0, 1], target (C, h, w) uint8 (zeros for unlabelled
            classes: callers mask them with ``labelled``) and valid (1, h, w) uint8 (0 where
            ``labels/mask`` says the pixel is not annotated, or, with crops, outside every crop
            or where a labelled class is unknown).
        """
        height, width = (size, size) if isinstance(size, int) else size
        raw, labels, pieces = self._load()
        window = (z, slice(y, y + height), slice(x, x + width))
        image = normalize(
            self._checked(np.asarray(raw[(0,) * self._raw.leading + window]), window),
            self.normalization,
        )
        if self._crops is not None:
            return (image[None], *self._read_crops(pieces, z, y, x, height, width))
        target = np.zeros((len(labels) - 1, height, width), dtype=np.uint8)
        for channel, (label, info) in enumerate(zip(labels[:-1], self._labels, strict=False)):
            if label is not None:
                target[channel] = label[(0,) * info.leading + window]
        mask, info = labels[-1], self._labels[-1]
        if mask is None:
            valid = np.ones((1, height, width), dtype=np.uint8)
        else:
            valid = (np.asarray(mask[(0,) * info.leading + window]) != 0).astype(np.uint8)[None]
        return image[None], target, valid

    def _read_crops(
        self, arrays: list, z: int, y: int, x: int, height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        channels = len(self.class_names)
        target = np.zeros((channels, height, width), dtype=np.uint8)
        known = np.zeros((channels, height, width), dtype=bool)
        raw = self._raw.level
        for piece, array in zip(self._crops or [], arrays, strict=True):
            z0, z1, y0, y1, x0, x1 = piece.box
            if not (z0 <= z < z1 and y0 < y + height and y < y1 and x0 < x + width and x < x1):
                continue
            level = piece.image.level
            jz = int(to_index(np.array([z]), raw, level, 0)[0])  # type: ignore[arg-type]
            jy = to_index(np.arange(y, y + height), raw, level, 1)  # type: ignore[arg-type]
            jx = to_index(np.arange(x, x + width), raw, level, 2)  # type: ignore[arg-type]
            rows = (jy >= 0) & (jy < piece.shape[1])
            cols = (jx >= 0) & (jx < piece.shape[2])
            if not (0 <= jz < piece.shape[0] and rows.any() and cols.any()):
                continue
            # Read only the block the window covers, then pick voxels by nearest index.
            ry, rx = jy[rows], jx[cols]
            block = np.asarray(
                array[
                    (0,) * piece.image.leading
                    + (jz, slice(ry.min(), ry.max() + 1), slice(rx.min(), rx.max() + 1))
                ]
            )
            values = block[np.ix_(ry - ry.min(), rx - rx.min())]
            inside = np.ix_(rows, cols)
            unknown = (
                np.zeros(values.shape, dtype=bool)
                if piece.unknown is None
                else values == piece.unknown
            )
            present = (
                values == piece.present
                if piece.present is not None
                else ((values != piece.absent) & ~unknown)
            )
            known[piece.channel][inside] |= ~unknown
            target[piece.channel][inside] |= present.astype(np.uint8)
        labelled = [c for c in range(channels) if self.labelled[c]]
        valid = known[labelled].all(axis=0) if labelled else known.any(axis=0)
        return target, valid.astype(np.uint8)[None]


def _encoding(attrs: Mapping[str, Any]) -> dict[str, int]:
    """CellMap's ``cellmap.annotation.annotation_type.encoding`` (absent/unknown/present)."""
    annotation = (attrs.get("cellmap") or {}).get("annotation") or {}
    return dict((annotation.get("annotation_type") or {}).get("encoding") or {})
