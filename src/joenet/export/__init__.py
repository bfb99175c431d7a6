"""``python -m joenet.export``: a trained checkpoint as TorchScript, ONNX or a bioimage.io package.

``exporter`` writes and checks the TorchScript and ONNX files; ``metadata`` is what every export
carries besides the weights (classes, normalisation, tile and halo).
"""

from joenet.export.exporter import FORMATS, export_model

__all__ = ["FORMATS", "export_model"]
