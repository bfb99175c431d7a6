"""Tiled, resumable prediction of a zarr volume into an OME-Zarr (see ``joenet.predict``)."""

from joenet.inference.checkpoint import LoadedModel, load_model
from joenet.inference.pipeline import predict_volume
from joenet.inference.tiling import PlanePredictor

__all__ = ["LoadedModel", "PlanePredictor", "load_model", "predict_volume"]
