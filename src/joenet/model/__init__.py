"""The joenet U-Net and its receptive-field calculator."""

from joenet.model.unet import UNet2d, receptive_field

__all__ = ["UNet2d", "receptive_field"]
