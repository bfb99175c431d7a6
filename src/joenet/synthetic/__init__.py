"""A synthetic EM volume with exact nuclei and mitochondria labels: runs and tests need no download.

``render`` draws the scene in memory, ``generator`` writes it to disk (atomically, once per shape
and seed), ``stores`` serves a volume of any size without writing it (for benchmarks).
"""

from joenet.synthetic.generator import (
    VERSION,
    VOXEL_SIZE_NM,
    ensure_synthetic_volume,
    generate_synthetic_volume,
)
from joenet.synthetic.render import render_synthetic_volume

__all__ = [
    "VERSION",
    "VOXEL_SIZE_NM",
    "ensure_synthetic_volume",
    "generate_synthetic_volume",
    "render_synthetic_volume",
]
