"""Augmentations that transform an image chip and its target mask together, for any number of bands.

Plain tensor operations on ``image`` float32 ``(C, H, W)`` (already normalised, so brightness and noise
are in standard deviations) and ``target`` int64 ``(H, W)``. Every random draw comes from the
``torch.Generator`` passed in, so a chip's augmentation depends only on its seed.

Geometric operations (flips, 90-degree rotations, any rotation, shift and shear, scale and crop) move image and target alike; photometric
ones (brightness, contrast, noise) touch the image only. Pixels brought in from outside the chip by a
zoom-out are ignored in the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from geoseg.errors import unknown_name
from geoseg.learn.config import AugmentConfig

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


@dataclass
class _Flip:
    p: float = 0.5
    dim = -1  # the axis flipped: -1 columns (horizontal), -2 rows (vertical)

    def __call__(self, image: torch.Tensor, target: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if _u(g) < self.p:
            return image.flip(self.dim), target.flip(self.dim)
        return image, target


class HFlip(_Flip):
    """A left-right flip with probability ``p``."""

    dim = -1


class VFlip(_Flip):
    """An up-down flip with probability ``p``."""

    dim = -2


@dataclass
class Rot90:
    """A rotation by 90, 180 or 270 degrees with probability ``p`` (square chips keep their shape)."""

    p: float = 0.5

    def __call__(self, image: torch.Tensor, target: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if _u(g) < self.p and image.shape[-1] == image.shape[-2]:
            k = int(torch.randint(1, 4, (), generator=g))
            return torch.rot90(image, k, (-2, -1)), torch.rot90(target, k, (-2, -1))
        return image, target


@dataclass
class ScaleCrop:
    """Zoom by a factor in ``[lo, hi]``, then crop (zoom in) or pad (zoom out) back to the chip size.

    The image is resampled bilinearly, the target by nearest neighbour; padding is ignored in the target.
    """

    lo: float = 0.8
    hi: float = 1.25
    p: float = 0.3
    ignore_index: int = -100

    def __call__(self, image: torch.Tensor, target: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if _u(g) >= self.p:
            return image, target
        _, h, w = image.shape
        s = _u(g, self.lo, self.hi)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        img = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        tgt = F.interpolate(target[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        if nh >= h and nw >= w:
            r = int(torch.randint(0, nh - h + 1, (), generator=g))
            c = int(torch.randint(0, nw - w + 1, (), generator=g))
            return img[:, r:r + h, c:c + w].contiguous(), tgt[r:r + h, c:c + w].contiguous()
        out_img = image.new_zeros(image.shape)
        out_tgt = target.new_full(target.shape, self.ignore_index)
        ch, cw = min(nh, h), min(nw, w)
        r = int(torch.randint(0, h - ch + 1, (), generator=g))
        c = int(torch.randint(0, w - cw + 1, (), generator=g))
        out_img[:, r:r + ch, c:c + cw] = img[:, :ch, :cw]
        out_tgt[r:r + ch, c:c + cw] = tgt[:ch, :cw]
        return out_img, out_tgt


@dataclass
class Affine:
    """With probability ``p``: a rotation by up to +- ``rotate`` degrees, a shift by up to +- ``shift`` of the
    chip and a shear by up to +- ``shear`` degrees, about the chip's centre (the paper's augmentation for the
    Amazon set: rotations up to 180 degrees, shifts, shear). The image is resampled bilinearly, the target by
    nearest neighbour; pixels brought in from outside the chip are zero in the image and ignored in the target.
    """

    rotate: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    p: float = 0.5
    ignore_index: int = -100

    def __call__(self, image: torch.Tensor, target: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if _u(g) >= self.p:
            return image, target
        a = math.radians(_u(g, -self.rotate, self.rotate))
        sh = math.radians(_u(g, -self.shear, self.shear))
        tx, ty = _u(g, -self.shift, self.shift) * 2, _u(g, -self.shift, self.shift) * 2  # in [-1, 1] units
        # output -> input sampling matrix in normalised coordinates: rotation then shear, then the shift
        cos, sin = math.cos(a), math.sin(a)
        rot = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float32)
        shear = torch.tensor([[1.0, math.tan(sh)], [0.0, 1.0]], dtype=torch.float32)
        theta = torch.cat([rot @ shear, torch.tensor([[tx], [ty]], dtype=torch.float32)], dim=1)[None]
        grid = F.affine_grid(theta, [1, 1, *image.shape[-2:]], align_corners=False)
        img = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        # the target moved by nearest neighbour; outside the chip: ignored (shifted by one so 0 marks outside)
        tgt = F.grid_sample((target[None, None].float() - self.ignore_index + 1), grid, mode="nearest",
                            padding_mode="zeros", align_corners=False)[0, 0]
        out = torch.where(tgt == 0, torch.full_like(tgt, self.ignore_index), tgt + self.ignore_index - 1)
        return img, out.round().long()


@dataclass
class BrightnessContrast:
    """Per band: ``x * gain + shift`` around the band's chip mean, gain in ``1 +- contrast``, shift in
    ``+- brightness`` standard deviations."""

    brightness: float = 0.1
    contrast: float = 0.1

    def __call__(self, image: torch.Tensor, target: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c = image.shape[0]
        gain = 1 + (torch.rand(c, 1, 1, generator=g) * 2 - 1) * self.contrast
        shift = (torch.rand(c, 1, 1, generator=g) * 2 - 1) * self.brightness
        mean = image.mean(dim=(1, 2), keepdim=True)
        return (image - mean) * gain + mean + shift, target


@dataclass
class Noise:
    """Additive gaussian noise of standard deviation ``std`` (in normalised units)."""

    std: float = 0.02

    def __call__(self, image: torch.Tensor, target: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.std <= 0:
            return image, target
        return image + torch.randn(image.shape, generator=g) * self.std, target


TRANSFORMS: dict[str, type] = {
    "hflip": HFlip, "vflip": VFlip, "rot90": Rot90, "scale": ScaleCrop, "affine": Affine,
    "brightness_contrast": BrightnessContrast, "noise": Noise,
}


def transform(name: str, **kwargs: float) -> Transform:
    """A transform from the registry by name.

    Raises:
        UnknownNameError: the name is not registered (the message lists the valid names).
    """
    if name not in TRANSFORMS:
        raise unknown_name("augmentation", name, list(TRANSFORMS))
    return TRANSFORMS[name](**kwargs)  # type: ignore[no-any-return]


class Compose:
    """Apply transforms in order, each drawing from the same generator."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        for t in self.transforms:
            image, target = t(image, target, g)
        return image, target

    def __len__(self) -> int:
        return len(self.transforms)


def from_config(cfg: AugmentConfig, ignore_index: int = -100) -> Compose | None:
    """Build the pipeline of a :class:`geoseg.learn.config.AugmentConfig`; None when disabled."""
    if not cfg.enabled:
        return None
    ts: list[Transform] = []
    if cfg.hflip > 0:
        ts.append(HFlip(cfg.hflip))
    if cfg.vflip > 0:
        ts.append(VFlip(cfg.vflip))
    if cfg.rot90 > 0:
        ts.append(Rot90(cfg.rot90))
    if (cfg.rotate > 0 or cfg.shift > 0 or cfg.shear > 0) and cfg.affine_p > 0:
        ts.append(Affine(cfg.rotate, cfg.shift, cfg.shear, cfg.affine_p, ignore_index))
    scale = cfg.scale
    if scale is not None and cfg.scale_p > 0:
        ts.append(ScaleCrop(scale[0], scale[1], cfg.scale_p, ignore_index))
    if cfg.brightness > 0 or cfg.contrast > 0:
        ts.append(BrightnessContrast(cfg.brightness, cfg.contrast))
    if cfg.noise > 0:
        ts.append(Noise(cfg.noise))
    return Compose(ts) if ts else None


__all__ = ["Affine", "HFlip", "VFlip", "Rot90", "ScaleCrop", "BrightnessContrast", "Noise", "Compose", "TRANSFORMS",
           "transform", "from_config"]
