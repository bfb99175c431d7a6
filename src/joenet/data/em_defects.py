"""EM section defects as an augmentation: what serial sectioning and FIB-SEM do to real stacks.

A 2D model sees one section at a time, so each defect is what it looks like in one section (as
torch-em's and PyTorch Connectomics' defect augmentations, there applied to 3D stacks):

- ``low_contrast``: a badly stained or charged section, contrast about the mean cut to 10-40 %;
- ``missing_band``: a stripe of lost data (a fold, a tear, a missed tile), filled with black;
  nothing there can be seen, so its pixels do not count in the loss (``valid`` 0);
- ``misaligned_band``: the lower part of the section shifted sideways by up to 1/16 of the patch
  (a stitching or alignment error), image and labels alike; the pixels wrapped in from the other
  side do not count.

Each patch gets at most one defect, with probability ``defects``; all draws come from the
sample's own generator (see ``BatchAugment.sample_params``).
"""

from __future__ import annotations

import torch
from torch import Tensor

KINDS = ("low_contrast", "missing_band", "misaligned_band")
DRAWS = 4  # uniforms per sample: whether, which kind, where, how strong


def apply_defects(
    image: Tensor, target: Tensor | None, valid: Tensor | None, u: Tensor, probability: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Apply each sample's defect, if it drew one.

    Args:
        image: (B, 1, P, P) patches.
        target: (B, C, P, P) masks, or None.
        valid: (B, 1, P, P) 1/0 pixel weights, or None.
        u: (B, 4) uniforms in [0, 1) from the samples' generators.
        probability: chance of a defect per patch.

    Returns:
        New ``(image, target, valid)``; samples without a defect are unchanged.
    """
    size = image.shape[-1]
    image = image.clone()
    target = None if target is None else target.clone()
    valid = torch.ones_like(image[:, :1]) if valid is None else valid.clone()
    for i, (hit, which, where, strength) in enumerate(u.tolist()):
        if hit >= probability:
            continue
        kind = KINDS[min(int(which * len(KINDS)), len(KINDS) - 1)]
        if kind == "low_contrast":
            mean = image[i].mean()
            image[i] = mean + (image[i] - mean) * (0.1 + 0.3 * strength)
            continue
        if kind == "missing_band":
            height = size // 16 + int(strength * size / 4)
            top = int(where * (size - height))
            image[i, :, top : top + height] = 0.0
            valid[i, :, top : top + height] = 0
            continue
        shift = round((2 * strength - 1) * size / 16) or 1
        top = int(where * size * 3 / 4)  # at least the lower quarter moves
        parts = [image] + ([target] if target is not None else []) + [valid]
        for part in parts:
            part[i, :, top:] = torch.roll(part[i, :, top:], shift, dims=-1)
        wrapped = slice(0, shift) if shift > 0 else slice(size + shift, size)
        valid[i, :, top:, wrapped] = 0
    return image, target, valid
