# long: one class, BatchAugment, whose parameter draw and application must stay side by side
# (what sample_params draws, apply consumes, key by key).
"""Batched, on-device augmentation of training windows.

DataLoader workers only read: each training sample is a window larger than the output patch (see
``window_size``), and after the transfer the whole batch is augmented here with a few tensor ops,
on the GPU when there is one. Geometry (rotation about the window centre, flips, elastic
displacement) is composed into ONE sampling grid per sample, so the image is resampled once, and
the masks are resampled with the very same grid and thresholded, so they stay binary and aligned
with the image to sub-pixel accuracy. Intensity (contrast, brightness, gamma, noise) follows on the
image only.

Why hand-written rather than kornia or torchvision v2:

- a chain of kornia/torchvision transforms resamples once per geometric transform: the image is
  blurred several times and each step costs its own ``grid_sample`` (kornia's elastic transform
  also blurs a full-resolution noise field per sample); here one composed grid, one resampling;
- masks go through the same grid and a 0.5 threshold, so mask edges follow the image edges rather
  than nearest-neighbour rounding of a different interpolation;
- every random parameter is a pure function of the sample's ``seed`` (drawn on the CPU from its
  own ``torch.Generator``), so the result depends neither on the device, nor on the batch a sample
  lands in, nor on the number of DataLoader workers; the libraries draw a batch's parameters from
  torch's global RNG, so a sample's augmentation depends on its batch-mates and the RNG state;
- torchvision wheels pin one exact torch version: installing it from PyPI beside the CPU build of
  torch we use would replace that torch with another version and its CUDA wheels.

Batch contract (``BatchAugment.__call__``): ``image`` (B, 1, W, W) float in [0, 1], ``target``
(B, C, W, W) 0/1 masks, ``valid`` (B, 1, W, W) 1/0, ``seed`` (B,) int64; ``target`` and ``valid``
may be absent. The returned dict holds the same keys, with ``image``, ``target`` and ``valid``
centre-cropped/resampled to (B, ., P, P); every other key passes through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from joenet.data import em_defects

_MASK_KEYS = ("target", "valid")


def window_size(patch_size: int, rotate: bool, elastic_alpha: float) -> int:
    """Smallest even window side from which a rotated, displaced patch never leaves the window.

    Output pixel centres lie within (P - 1) / 2 of the patch centre on each axis, hence within
    (P - 1) / sqrt(2) < P / sqrt(2) of it after any rotation, on each axis. The elastic field is
    clamped to ``elastic_alpha`` per coordinate, so a sampling point lies within
    P / sqrt(2) + alpha of the window centre on each axis. A bilinear tap at offset ``c`` reads the
    pixel centres around it, which exist when |c| <= (W - 1) / 2: hence
    W = ceil(P * sqrt(2) + 2 * alpha) + 1, rounded up to even so window and patch share a centre.

    Args:
        patch_size: side P of the output patch (even).
        rotate: whether patches are rotated by any angle.
        elastic_alpha: maximum elastic displacement per coordinate, in pixels (0 when off).

    Returns:
        The window side W; ``patch_size`` itself without rotation and elastic displacement.
    """
    if patch_size <= 0 or patch_size % 2:
        raise ValueError(f"patch_size must be a positive even number, got {patch_size}")
    if elastic_alpha < 0:
        raise ValueError(f"elastic_alpha must be >= 0, got {elastic_alpha}")
    if not rotate and elastic_alpha == 0:
        return patch_size
    extent = patch_size * math.sqrt(2) if rotate else float(patch_size)
    side = math.ceil(extent + 2 * elastic_alpha) + 1
    return side + side % 2


def center_crop(x: Tensor, size: int) -> Tensor:
    """Crop the central ``size`` x ``size`` region of the last two dimensions.

    An odd margin leaves the extra pixel on the bottom/right, as ``torchvision``'s centre crop.
    """
    height, width = x.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"cannot crop {size} x {size} from {height} x {width}")
    top, left = (height - size) // 2, (width - size) // 2
    return x[..., top : top + size, left : left + size]


class BatchAugment:
    """Random rotation, flips, elastic displacement and intensity changes of a batch of windows.

    Geometry is off when ``rotate``, ``flip`` and ``elastic`` are all False: the window is then
    centre-cropped to the patch without resampling (flips alone also avoid resampling). The
    elastic field lives on the output patch (``elastic_grid`` x ``elastic_grid`` control points
    spanning it) and displaces each sampling point in window pixels, after rotation and flips.
    Plain values only, so Hydra can pass the keyword arguments from a config.

    Args:
        patch_size: side P of the output patches (even).
        rotate: rotate by an angle uniform in [0, 2 pi).
        flip: mirror horizontally and vertically, each with probability 0.5.
        brightness: shift uniform in [-brightness, brightness].
        contrast: factor uniform in [1 - contrast, 1 + contrast] about the sample's mean.
        elastic: add a smooth random displacement field.
        elastic_alpha: maximum displacement per coordinate, in pixels.
        elastic_grid: control points per side; bicubic interpolation between them.
        noise: add Gaussian noise.
        noise_std: standard deviation of the noise.
        gamma: exponent log-uniform in [1 / (1 + gamma), 1 + gamma]; 0 turns it off.
        defects: probability of one EM section defect per patch (low contrast, a missing
            band, a misaligned band: :mod:`joenet.data.em_defects`); 0 turns them off.

    Attributes:
        window: side of the windows to read per sample, ``window_size(patch_size, ...)``.
    """

    def __init__(
        self,
        patch_size: int,
        rotate: bool = True,
        flip: bool = True,
        brightness: float = 0.1,
        contrast: float = 0.2,
        elastic: bool = False,
        elastic_alpha: float = 8.0,
        elastic_grid: int = 4,
        noise: bool = False,
        noise_std: float = 0.03,
        gamma: float = 0.0,
        defects: float = 0.0,
    ):
        if brightness < 0 or not 0 <= contrast < 1:
            raise ValueError(
                f"need brightness >= 0 and 0 <= contrast < 1, got {brightness} and {contrast}"
            )
        if elastic and (elastic_alpha <= 0 or elastic_grid < 2):
            raise ValueError(
                f"elastic needs elastic_alpha > 0 and elastic_grid >= 2, got {elastic_alpha} and "
                f"{elastic_grid}; set elastic=False to turn it off"
            )
        if noise_std < 0 or gamma < 0:
            raise ValueError(f"need noise_std >= 0 and gamma >= 0, got {noise_std} and {gamma}")
        if not 0 <= defects <= 1:
            raise ValueError(f"defects is a probability in [0, 1], got {defects}")
        self.patch_size = patch_size
        self.rotate = rotate
        self.flip = flip
        self.brightness = brightness
        self.contrast = contrast
        self.elastic = elastic
        self.elastic_alpha = elastic_alpha
        self.elastic_grid = elastic_grid
        self.noise = noise
        self.noise_std = noise_std
        self.gamma = gamma
        self.defects = defects
        self.window = window_size(patch_size, rotate, elastic_alpha if elastic else 0.0)
        self._cubic = _cubic_matrix(elastic_grid, patch_size) if elastic else torch.empty(0)

    def __repr__(self) -> str:
        keys: tuple[str, ...] = (
            "patch_size",
            "rotate",
            "flip",
            "brightness",
            "contrast",
            "elastic",
        )
        keys += ("elastic_alpha", "elastic_grid", "noise", "noise_std", "gamma", "defects")
        keys += ("window",)
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)}' for k in keys)})"

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Augment a batch of windows into patches; see the module docstring for the contract.

        Reads ``batch["seed"]`` back to the CPU (a small sync when it is on the GPU); to avoid it,
        call ``sample_params`` on the CPU seeds before the transfer and ``apply`` after it.
        """
        return self.apply(batch, self.sample_params(batch["seed"]))

    def sample_params(self, seeds: Tensor) -> dict[str, Tensor]:
        """Draw each sample's parameters on the CPU from a generator seeded with its seed alone.

        All scalars are drawn whether or not their augmentation is on, in a fixed order, so that
        turning one knob does not change the others' draws; the elastic control grid and then the
        noise follow. Noise is drawn at patch size (the only sizeable draw: P * P per sample).

        Args:
            seeds: (B,) integer seeds, on any device.

        Returns:
            ``angle`` (B,) radians, ``flip_h`` and ``flip_v`` (B,) bool, ``brightness`` (B,)
            shift, ``contrast`` (B,) factor, ``gamma`` (B,) exponent; with ``elastic``,
            ``elastic`` (B, 2, g, g) control displacements (x, y) in pixels; with ``noise``,
            ``noise`` (B, 1, P, P); with ``defects``, ``defect`` (B, 4) uniforms. All on the
            CPU, float32 unless stated.
        """
        seed_list = [int(s) for s in seeds.detach().cpu().reshape(-1).tolist()]
        num, grid, size = len(seed_list), self.elastic_grid, self.patch_size
        uniform = torch.empty(num, 6)
        control = torch.empty(num, 2, grid, grid) if self.elastic else None
        noise = torch.empty(num, 1, size, size) if self.noise else None
        defect = torch.empty(num, em_defects.DRAWS) if self.defects > 0 else None
        generator = torch.Generator()
        for i, seed in enumerate(seed_list):
            generator.manual_seed(seed)
            torch.rand(6, generator=generator, out=uniform[i])
            if control is not None:
                torch.rand(2, grid, grid, generator=generator, out=control[i])
            if noise is not None:
                torch.randn(1, size, size, generator=generator, out=noise[i])
            if defect is not None:  # last: turning defects on leaves the other draws as they were
                torch.rand(em_defects.DRAWS, generator=generator, out=defect[i])
        u = uniform.T  # (6, B)
        params = {
            "angle": u[0] * (2 * math.pi) if self.rotate else torch.zeros(num),
            "flip_h": (u[1] < 0.5) & self.flip,
            "flip_v": (u[2] < 0.5) & self.flip,
            "brightness": (2 * u[3] - 1) * self.brightness,
            "contrast": 1 + (2 * u[4] - 1) * self.contrast,
            "gamma": torch.exp((2 * u[5] - 1) * math.log1p(self.gamma)),
        }
        if control is not None:
            params["elastic"] = (2 * control - 1) * self.elastic_alpha
        if noise is not None:
            params["noise"] = noise * self.noise_std
        if defect is not None:
            params["defect"] = defect
        return params

    @torch.no_grad()
    def apply(self, batch: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict[str, Any]:
        """Augment a batch with given parameters.

        Separate from ``__call__`` so that parameters can be drawn before the transfer, or set by
        hand in tests.

        Args:
            batch: windows as in the module docstring; ``seed`` is not read here.
            params: as returned by ``sample_params``, on the CPU or on the batch's device.

        Returns:
            A new dict: ``image``, ``target`` and ``valid`` augmented to (B, ., P, P), other
            entries the same objects as in ``batch``.
        """
        image = batch["image"]  # (B, 1, W, W)
        height, width = image.shape[-2:]
        if height != width or height < self.window:
            raise ValueError(
                f"expected square windows of side >= {self.window} for patch {self.patch_size}, "
                f"got {height} x {width}; read windows of side BatchAugment.window"
            )
        p = {k: _to_device(v, image.device) for k, v in params.items()}
        masks = [k for k in _MASK_KEYS if k in batch]
        out = dict(batch)
        if self.rotate or self.elastic:
            grid = self._grid(p, width)  # (B, P, P, 2), float32
            out["image"] = _resample(image, grid)
            if masks:
                stacked = torch.cat([batch[k].float() for k in masks], dim=1)  # (B, C + 1, W, W)
                # Threshold at 0.5 instead of nearest sampling: the mask edge moves exactly where
                # the bilinearly resampled image edge does.
                binary = _resample(stacked, grid) > 0.5
                channels = [batch[k].shape[1] for k in masks]
                for k, part in zip(masks, binary.split(channels, dim=1), strict=True):
                    out[k] = part.to(batch[k].dtype)
        else:
            for k in ("image", *masks):
                out[k] = _flip(center_crop(batch[k], self.patch_size), p["flip_h"], p["flip_v"])
        if "defect" in p:
            image, target, valid = em_defects.apply_defects(
                out["image"], out.get("target"), out.get("valid"), p["defect"], self.defects
            )
            out["image"] = image
            out |= {k: v for k, v in (("target", target), ("valid", valid)) if k in batch}
        out["image"] = self._intensity(out["image"], p)
        return out

    def _grid(self, p: Mapping[str, Tensor], window: int) -> Tensor:
        """One sampling grid per sample, in normalised window coordinates (align_corners=False)."""
        size, scale = self.patch_size, 2 / window  # scale: window pixels -> normalised units
        cos, sin = p["angle"].cos(), p["angle"].sin()
        sign_x = 1 - 2 * p["flip_h"].float()
        sign_y = 1 - 2 * p["flip_v"].float()
        # sample(u) = R(angle) @ diag(sign_x, sign_y) @ u, for u the offset of an output pixel
        # centre from the patch centre; columns of that matrix, times the offsets, broadcast.
        col_x = torch.stack([cos * sign_x, sin * sign_x], dim=-1) * scale  # (B, 2)
        col_y = torch.stack([-sin * sign_y, cos * sign_y], dim=-1) * scale  # (B, 2)
        offset = torch.arange(size, device=cos.device, dtype=cos.dtype) + (0.5 - size / 2)  # (P,)
        # Broadcasting beats F.affine_grid (a batched matmul with inner size 3) several fold on CPU.
        grid = (
            offset.view(1, 1, size, 1) * col_x[:, None, None]
            + offset.view(1, size, 1, 1) * col_y[:, None, None]
        )  # (B, P, P, 2)
        if self.elastic:
            # Bicubic upsampling is separable: cubic @ control @ cubic.T equals F.interpolate's
            # bicubic (align_corners=True) at a tenth of its CPU cost.
            cubic = _to_device(self._cubic, cos.device)  # (P, g)
            field = cubic @ (p["elastic"] * scale) @ cubic.T  # (B, 2, P, P)
            # Bicubic overshoots its control points slightly; the clamp keeps window_size's bound.
            limit = self.elastic_alpha * scale
            grid = grid + field.clamp(-limit, limit).permute(0, 2, 3, 1)
        return grid

    def _intensity(self, x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        shape = (-1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        contrast, brightness = p["contrast"].view(shape), p["brightness"].view(shape)
        x = (x - mean) * contrast.to(x.dtype) + mean + brightness.to(x.dtype)
        if self.gamma > 0:
            # pow of a negative base is NaN, hence the clamp first.
            x = x.clamp(0, 1).pow(p["gamma"].view(shape).to(x.dtype))
        if self.noise:
            x = x + p["noise"].to(x.dtype)
        return x.clamp(0, 1)


def _cubic_matrix(points: int, size: int) -> Tensor:
    """(size, points) weights of F.interpolate's bicubic, align_corners=True, along one axis."""
    basis = torch.eye(points).view(points, 1, points, 1)  # one delta per control point
    upsampled = F.interpolate(basis, size=(size, 1), mode="bicubic", align_corners=True)
    return upsampled[:, 0, :, 0].T.contiguous()


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    # A pinned source lets the copy (a few MiB of noise at most) overlap with queued GPU work.
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def _resample(x: Tensor, grid: Tensor) -> Tensor:
    # Reflection only as a safety net: window_size keeps every tap inside the window.
    return F.grid_sample(
        x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False
    )


def _flip(x: Tensor, flip_h: Tensor, flip_v: Tensor) -> Tensor:
    shape = (-1, 1, 1, 1)
    x = torch.where(flip_h.view(shape), x.flip(-1), x)
    return torch.where(flip_v.view(shape), x.flip(-2), x)
