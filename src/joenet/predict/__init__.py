"""Tiled, resumable prediction of a zarr volume into an OME-Zarr.

``python -m joenet.predict ckpt_path=... input=... output=...`` (``cli``); without Hydra,
:func:`predict_volume` (``pipeline``). The parts: ``input_image`` (the input), ``tiling`` (one
plane, tile by tile, blended), ``work_units`` (blocks of the volume: read, predict, write),
``worker`` (what a predicting process holds: the job's network in its fast form, the block task),
``executor`` (local or Dask), ``writer`` (the output group and its completion record).
"""

from joenet.predict.pipeline import predict_volume
from joenet.predict.tiling import PlanePredictor

__all__ = ["PlanePredictor", "predict_volume"]
