"""The joenet U-Net and its receptive-field calculator."""

from joenet.model.receptive_field import receptive_field
from joenet.model.unet import UNet2d

__all__ = ["UNet2d", "receptive_field"]
