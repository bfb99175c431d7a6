"""joenet: a lightweight 2D U-Net for nuclei and mitochondria segmentation in EM volumes."""

__version__ = "0.1.0"
