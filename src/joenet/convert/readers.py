"""Stream a (z, y, x) volume, slab by slab, from a TIFF stack, a slice folder, HDF5 or N5.

Every reader opens lazily and reads only the z range it is asked for, so a stack larger than
memory can be converted. The packages a format needs are imported on first use; a missing one is
reported with the ``pip install`` that fixes it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np
import zarr

SUPPORTED = (
    "a multi-page .tif/.tiff stack, a folder of .tif/.tiff/.png slices, an HDF5 dataset "
    "'file.h5:/path/to/dataset' or an N5 dataset 'container.n5:/path/to/dataset'"
)
SLICE_SUFFIXES = (".tif", ".tiff", ".png")
_HDF5 = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|he5))(?::(?P<key>.*))?$", re.IGNORECASE)
_N5 = re.compile(r"^(?P<file>.+?\.n5)(?::(?P<key>.*))?$", re.IGNORECASE)
_PIL_DTYPES = {
    "1": np.uint8,
    "L": np.uint8,
    "P": np.uint8,  # palette index: label PNGs often store class or instance ids this way
    "I;16": np.uint16,
    "I;16B": np.uint16,
    "I": np.int32,
    "F": np.float32,
}
_PACKAGES = {"tifffile": "tifffile", "PIL": "pillow", "h5py": "h5py", "tensorstore": "tensorstore"}


class SourceError(ValueError):
    """An input that cannot be read; the message names the file and what was expected."""


class Source:
    """A lazily read volume: ``shape`` (z, y, x), ``dtype`` and ``read(start, stop)`` along z.

    Attributes:
        path: what was read, as stored in the output's ``source`` attribute.
        file: the file or folder that holds it.
        z_chunk: slices per storage chunk along z in the input; reading whole chunks avoids
            decompressing one input chunk again for each of its slices.
    """

    path: str
    file: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    z_chunk: int = 1

    def read(self, start: int, stop: int) -> np.ndarray:
        """Slices ``start`` to ``stop`` (exclusive) as an array (stop - start, y, x)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_source(spec: str) -> Source:
    """Open ``spec`` (a file, a folder or ``container:dataset``) as a volume source.

    Raises:
        SourceError: the input does not exist, is of an unsupported kind, is not 2D or 3D
            single-channel data, or needs a package that is not installed.
    """
    for pattern, opener in ((_HDF5, _open_hdf5), (_N5, _open_n5)):
        match = pattern.match(spec)
        if match:
            return opener(Path(match["file"]), (match["key"] or "").strip("/"))
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"{spec}: no such file or directory")
    if path.is_dir():
        if (path / "attributes.json").is_file():  # an N5 dataset folder given directly
            return _open_n5(path, "")
        return SliceFolder(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return TiffStack(path)
    if suffix == ".png":
        return SliceFolder(path)
    raise SourceError(f"{spec}: unsupported input (expected {SUPPORTED})")


def natural_key(name: str) -> list[Any]:
    """Sort key that orders the numbers in a name by value: ``slice_2`` before ``slice_10``."""
    # re.split with a group alternates text and digit runs, so list positions never mix types.
    return [int(part) if part.isdecimal() else part.lower() for part in re.split(r"(\d+)", name)]


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise a SourceError naming the ``pip install`` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = _PACKAGES.get(module.split(".")[0], module)
        raise SourceError(
            f"{purpose} needs the '{package}' package: pip install {package} "
            "(or pip install 'joenet[io]')"
        ) from None


class ArraySource(Source):
    """A source over a sliceable array (h5py dataset, zarr array, tensorstore view).

    Singleton axes are dropped, so (1, z, y, x) or (z, y, x, 1) data reads as (z, y, x); a 2D
    array, or a volume of one slice, reads as one slice.
    """

    def __init__(
        self,
        file: Path,
        path: str,
        array: Any,
        chunks: tuple[int, ...] | None = None,
        closer: Any = None,
    ):
        self.file, self.path, self._array, self._closer = file.resolve(), path, array, closer
        shape = tuple(int(s) for s in array.shape)
        kept = [axis for axis, size in enumerate(shape) if size != 1]
        if not 2 <= len(kept) <= 3:
            raise SourceError(
                f"{path}: expected 2D (y, x) or 3D (z, y, x) single-channel data, got shape {shape}"
            )
        self._axes = kept
        self._has_z = len(kept) == 3
        self.shape = (shape[kept[0]] if self._has_z else 1, shape[kept[-2]], shape[kept[-1]])
        # tensorstore has its own dtype class; numpy_dtype is its numpy equivalent.
        self.dtype = np.dtype(getattr(array.dtype, "numpy_dtype", array.dtype))
        if self._has_z and chunks:
            self.z_chunk = max(1, int(chunks[kept[0]]))

    def read(self, start: int, stop: int) -> np.ndarray:
        z_axis = self._axes[0] if self._has_z else None
        key = tuple(
            slice(start, stop) if a == z_axis else slice(None) if a in self._axes else 0
            for a in range(len(self._array.shape))
        )
        data = self._fetch(key)
        return data if self._has_z else data[None]

    def _fetch(self, key: tuple) -> np.ndarray:
        return np.asarray(self._array[key])

    def close(self) -> None:
        if self._closer is not None:
            self._closer.close()


class _TensorstoreSource(ArraySource):
    def _fetch(self, key: tuple) -> np.ndarray:
        return np.asarray(self._array[key].read().result())


class TiffStack(ArraySource):
    """A (multi-page) TIFF file read page by page through tifffile's zarr store."""

    def __init__(self, path: Path):
        tifffile = require("tifffile", "reading TIFF")
        try:
            tif = tifffile.TiffFile(path)
        except Exception as err:  # tifffile raises several types for a damaged file
            raise SourceError(f"{path}: not a readable TIFF file ({err})") from None
        if len(tif.series) != 1:
            tif.close()
            raise SourceError(
                f"{path}: pages differ in shape or dtype ({len(tif.series)} series); expected "
                "one stack of equal 2D pages"
            )
        array = zarr.open_array(tif.series[0].aszarr(), mode="r")
        super().__init__(path, str(path.resolve()), array, array.chunks, closer=tif)


class SliceFolder(Source):
    """2D slices, one per file, in natural order of their names (``slice_2`` before ``slice_10``).

    A single ``.png`` file is a folder of one slice.
    """

    def __init__(self, path: Path):
        if path.is_dir():
            files = [
                p
                for p in path.iterdir()
                if p.suffix.lower() in SLICE_SUFFIXES and not p.name.startswith(".")
            ]
            if not files:
                raise SourceError(f"{path}: no {'/'.join(SLICE_SUFFIXES)} slices in this folder")
        else:
            files = [path]
        self.file = path.resolve()
        self.path = str(self.file)
        self.files = sorted(files, key=lambda p: natural_key(p.name))
        first = self._read_file(self.files[0])
        self.shape = (len(self.files), *first.shape)  # type: ignore[assignment]
        self.dtype = first.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        for i, file in enumerate(self.files[start:stop]):
            image = self._read_file(file)
            if image.shape != self.shape[1:] or image.dtype != self.dtype:
                raise SourceError(
                    f"{file}: slice is {image.shape} {image.dtype}, but {self.files[0].name} is "
                    f"{self.shape[1:]} {self.dtype}; all slices must match"
                )
            out[i] = image
        return out

    @staticmethod
    def _read_file(file: Path) -> np.ndarray:
        if file.suffix.lower() == ".png":
            pil = require("PIL.Image", "reading PNG")
            try:
                with pil.open(file) as img:
                    if img.mode not in _PIL_DTYPES:
                        raise SourceError(
                            f"{file}: PNG mode {img.mode} is not single-channel; expected a "
                            "grayscale (L, I;16) or palette image"
                        )
                    image = np.asarray(img, dtype=_PIL_DTYPES[img.mode])
            except OSError as err:
                raise SourceError(f"{file}: not a readable PNG file ({err})") from None
        else:
            tifffile = require("tifffile", "reading TIFF")
            try:
                image = tifffile.imread(file)
            except Exception as err:  # tifffile raises several types for a damaged file
                raise SourceError(f"{file}: not a readable TIFF file ({err})") from None
        image = np.squeeze(image)
        if image.ndim != 2:
            raise SourceError(
                f"{file}: expected one 2D single-channel slice, got shape {image.shape}"
            )
        return image


def _open_hdf5(file: Path, key: str) -> Source:
    h5py = require("h5py", "reading HDF5")
    if not file.is_file():
        raise SourceError(f"{file}: no such file")
    try:
        handle = h5py.File(file, "r")
    except OSError as err:
        raise SourceError(f"{file}: not a readable HDF5 file ({err})") from None
    datasets: list[str] = []
    handle.visititems(lambda name, obj: datasets.append(name) if hasattr(obj, "shape") else None)
    if not key and len(datasets) == 1:
        key = datasets[0]  # the only dataset: no need to name it
    if key not in datasets:
        handle.close()
        found = ", ".join(datasets[:10]) + (" ..." if len(datasets) > 10 else "") or "none"
        what = f"no dataset '{key}'" if key else "several datasets; name one as file.h5:/dataset"
        raise SourceError(f"{file}: {what} (datasets: {found})")
    dataset = handle[key]
    try:
        return ArraySource(file, f"{file.resolve()}:/{key}", dataset, dataset.chunks, handle)
    except SourceError:
        handle.close()
        raise


def _open_n5(container: Path, key: str) -> Source:
    ts = require("tensorstore", "reading N5 (zarr-python 3 has no N5 store)")
    path = container / key if key else container
    if not (path / "attributes.json").is_file():
        raise SourceError(
            f"{path}: no N5 dataset here (expected a folder with an attributes.json that has "
            "'dimensions'; name it as container.n5:/path/to/dataset)"
        )
    spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(path.resolve())}}
    try:
        store = ts.open(spec, read=True).result()
    except ValueError as err:
        raise SourceError(f"{path}: not a readable N5 dataset ({err})") from None
    # N5 lists dimensions fastest first (x, y, z), as Java tools and zarr v2's N5Store write them;
    # tensorstore keeps that order, so reverse it to (z, y, x).
    view = store.T
    chunks = tuple(view.chunk_layout.read_chunk.shape or ())
    return _TensorstoreSource(container, str(path.resolve()), view, chunks or None)
