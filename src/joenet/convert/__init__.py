"""Convert a TIFF stack, a slice folder, HDF5 or N5 into the zarr layout joenet reads.

``python -m joenet.convert`` (``cli``); :func:`convert` without the command line
(``converter``); ``readers`` open each input format as a lazy (z, y, x) source.
"""

from joenet.convert.converter import DEFAULT_CHUNKS, ConvertError, convert
from joenet.convert.readers import SUPPORTED, Source, SourceError, open_source

__all__ = [
    "DEFAULT_CHUNKS",
    "SUPPORTED",
    "ConvertError",
    "Source",
    "SourceError",
    "convert",
    "open_source",
]
