"""A read-only zarr store that makes up its chunks on request: any volume size, no disk, no RAM.

For benchmarks and tests of lazy reading: ``SyntheticStore(shape=(16384, 8192, 8192))`` is a
1 TiB uint8 volume in the project layout (``raw`` + ``labels/mito``) that costs a few hundred
kilobytes. Each chunk is one of a few pre-encoded tiles, picked by a hash of its grid position, so
reads pay the real decode cost (zstd by default) but nothing is generated per read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import numpy as np
import zarr
from scipy import ndimage
from zarr.abc.store import ByteRequest, RangeByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import MemoryStore

_TILES = 8  # distinct chunk contents per array: enough variety for caches to be useless


class SyntheticStore(Store):
    """A zarr v3 group ``raw`` (uint8 EM-like texture) + ``labels/mito`` (0/1 blobs).

    Chunks are listed by no ``list`` call (like an object store with billions of keys, only
    metadata is listed). ``gets`` counts chunk reads, to check that a window read touches only
    the chunks it overlaps.

    Args:
        shape: (z, y, x) of the volume.
        chunks: (z, y, x) chunk shape (the real data uses (1, 256, 256)).
        compressed: zstd-compress chunks (as the real data is) or store them raw.
        voxel_size_nm: written to the group's ``voxel_size_nm`` attribute.
        seed: seeds the tiles.
    """

    supports_writes = False
    supports_deletes = False
    supports_listing = True

    def __init__(
        self,
        shape: Sequence[int],
        chunks: Sequence[int] = (1, 256, 256),
        compressed: bool = True,
        voxel_size_nm: Sequence[float] = (8.0, 8.0, 8.0),
        seed: int = 0,
    ):
        super().__init__(read_only=True)
        self.shape, self.chunks = tuple(shape), tuple(chunks)
        self.compressed, self.voxel_size_nm, self.seed = compressed, tuple(voxel_size_nm), seed
        self.gets = 0
        self._metadata, self._tiles = _encode(
            self.shape, self.chunks, compressed, voxel_size_nm, seed
        )
        self._is_open = True

    def __reduce__(self) -> tuple:
        # Rebuilt from its arguments in each DataLoader worker, like a store reopened from a URL.
        return (
            SyntheticStore,
            (self.shape, self.chunks, self.compressed, self.voxel_size_nm, self.seed),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SyntheticStore) and self.__reduce__() == other.__reduce__()

    def __hash__(self) -> int:
        return hash(self.__reduce__()[1])

    def __str__(self) -> str:
        return f"synthetic://{'x'.join(map(str, self.shape))}.zarr"

    def _bytes(self, key: str) -> bytes | None:
        if key in self._metadata:
            return self._metadata[key]
        array, sep, index = key.rpartition("/c/")
        if not sep or array not in self._tiles:
            return None
        position = [int(i) for i in index.split("/")]
        self.gets += 1
        pick = (position[0] * 73856093) ^ (position[1] * 19349663) ^ (position[2] * 83492791)
        return self._tiles[array][pick % _TILES]

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        data = self._bytes(key)
        if data is None:
            return None
        if isinstance(byte_range, RangeByteRequest):
            data = data[byte_range.start : byte_range.end]
        elif byte_range is not None:
            raise NotImplementedError(f"{self}: byte range {byte_range} not supported")
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return self._bytes(key) is not None

    async def set(self, key: str, value: Buffer) -> None:
        raise PermissionError(f"{self} is read-only")

    async def delete(self, key: str) -> None:
        raise PermissionError(f"{self} is read-only")

    async def list(self) -> AsyncIterator[str]:
        for key in self._metadata:
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in self._metadata:
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/") + "/" if prefix.rstrip("/") else ""
        children = {
            key[len(prefix) :].split("/")[0] for key in self._metadata if key.startswith(prefix)
        }
        for child in sorted(children):
            yield child


def _encode(
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    compressed: bool,
    voxel_size_nm: Sequence[float],
    seed: int,
) -> tuple[dict[str, bytes], dict[str, list[bytes]]]:
    """Metadata documents of the group, and ``_TILES`` encoded chunks per array, made by zarr."""
    rng = np.random.default_rng(seed)
    # Smoothed noise compresses like EM (zstd ratio ~1.5), unlike white noise.
    texture = ndimage.gaussian_filter(rng.normal(size=(_TILES, *chunks)), (0, 0, 1.5, 1.5)[-4:])
    raw = np.clip(128 + 40 * texture / texture.std() + rng.normal(0, 8, texture.shape), 0, 255)
    blobs = ndimage.gaussian_filter(rng.normal(size=(_TILES, *chunks)), (0, 0, 12, 12)[-4:])
    tiles = {
        "raw": raw.astype(np.uint8),
        "labels/mito": (blobs > 1.2 * blobs.std()).astype(np.uint8),
    }
    codecs: dict[str, Any] = {"compressors": zarr.codecs.ZstdCodec(level=3) if compressed else None}
    store: dict[str, bytes] = {}
    group = zarr.open_group(
        MemoryStore(store), mode="w", attributes={"voxel_size_nm": list(voxel_size_nm)}
    )
    encoded: dict[str, list[bytes]] = {}
    for name, data in tiles.items():
        group.create_array(name, shape=shape, chunks=chunks, dtype="uint8", fill_value=0, **codecs)
        # Write the tiles as the first chunks of a scratch array with the same codecs.
        tiles_store: dict[str, Any] = {}
        scratch = zarr.create_array(
            MemoryStore(tiles_store),
            shape=(_TILES * chunks[0], *chunks[1:]),
            chunks=chunks,
            dtype="uint8",
            fill_value=0,
            config={"write_empty_chunks": True},  # an all-zero label tile is a tile too
            **codecs,
        )
        scratch[...] = data.reshape(_TILES * chunks[0], *chunks[1:])
        encoded[name] = [tiles_store[f"c/{i}/0/0"].to_bytes() for i in range(_TILES)]
    metadata = {key: value.to_bytes() for key, value in store.items() if key.endswith("zarr.json")}
    return metadata, encoded
