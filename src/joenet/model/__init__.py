"""The joenet U-Net, how a training run builds it, and its receptive-field calculator."""

from joenet.model.receptive_field import receptive_field
from joenet.model.unet import DEFAULT_CLASS_NAMES, UNet2d, build_network

__all__ = ["DEFAULT_CLASS_NAMES", "UNet2d", "build_network", "receptive_field"]
