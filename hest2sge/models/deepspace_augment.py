"""Image augmentation families of DeepSpaCE (albumentations 0.4.6) as torchvision
``transforms.v2`` counterparts, applied per sample to float (3, H, W) tensors in [0, 1] on any
device (CPU or GPU), e.g. inside a model's batch hook.

Families (each applied in the order given):

* ``flip``: RandomRotate90, Flip (horizontal, vertical or both) and Transpose, each p 0.5;
* ``crop``: RandomResizedCrop (scale 0.5-1) p 0.5;
* ``color``: HueSaturationValue (hue 20/180, saturation 30/255, value 20/255), ChannelShuffle
  and RGBShift (20/255), each p 0.5;
* ``random``: exactly one of Gaussian noise (variance 10-50 on the 0-255 scale), blur
  (Gaussian, box 3-7 or median 3 for motion/box/median blur) or distortion (elastic, affine
  shift-scale-rotate or perspective for optical/grid/piecewise-affine/shift-scale-rotate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENT_FAMILIES = ("flip", "crop", "color", "random")


def parse_families(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Augmentation families from ``"flip,crop,color,random"`` (``"none"`` or empty: none)."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    fams = tuple(s.strip().lower() for s in items if s.strip() and s.strip().lower() != "none")
    bad = [f for f in fams if f not in AUGMENT_FAMILIES]
    if bad:
        raise ValueError(f"unknown augmentation famil{'ies' if len(bad) > 1 else 'y'} {bad}; "
                         f"choose from {AUGMENT_FAMILIES} or 'none'")
    return fams


def _rand() -> float:
    return float(torch.rand(()))


def _flip(x: Tensor) -> Tensor:
    """albumentations RandomRotate90, Flip and Transpose, each with p 0.5."""
    if _rand() < 0.5:
        x = torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))
    if _rand() < 0.5:  # Flip: horizontal, vertical or both
        x = x.flip([(-1,), (-2,), (-1, -2)][int(torch.randint(0, 3, ()))])
    if _rand() < 0.5:
        x = x.transpose(-1, -2)
    return x


def _rgb_shift(x: Tensor, limit: float = 20 / 255) -> Tensor:
    return x + (torch.rand(3, 1, 1, device=x.device, dtype=x.dtype) * 2 - 1) * limit


def _gauss_noise(x: Tensor) -> Tensor:
    """GaussNoise(var_limit 10-50 on the 0-255 scale)."""
    std = math.sqrt(10 + 40 * _rand()) / 255.0
    return x + torch.randn_like(x) * std


def _median_blur(x: Tensor) -> Tensor:
    k = 3
    pad = F.pad(x[None], (1, 1, 1, 1), mode="reflect")
    return pad.unfold(2, k, 1).unfold(3, k, 1).reshape(*x.shape, k * k).median(-1).values


def _box_blur(x: Tensor) -> Tensor:
    k = int(torch.randint(1, 4, ())) * 2 + 1  # 3, 5, 7 (albumentations blur_limit 7)
    return F.avg_pool2d(F.pad(x[None], (k // 2,) * 4, mode="reflect"), k, stride=1)[0]


def build_augmenter(families: Sequence[str], size: int):
    """A callable (3, H, W) -> (3, H, W) applying the families in order (torchvision v2)."""
    from torchvision.transforms import v2

    steps: list = []
    for fam in families:
        if fam == "flip":
            steps.append(_flip)
        elif fam == "crop":
            steps.append(v2.RandomApply([v2.RandomResizedCrop(size, scale=(0.5, 1.0),
                                                              antialias=True)], p=0.5))
        elif fam == "color":  # HueSaturationValue, ChannelShuffle, RGBShift, each p 0.5
            steps += [v2.RandomApply([v2.ColorJitter(brightness=20 / 255, saturation=30 / 255,
                                                     hue=20 / 180)], p=0.5),
                      v2.RandomApply([v2.RandomChannelPermutation()], p=0.5),
                      v2.RandomApply([_rgb_shift], p=0.5)]
        elif fam == "random":  # one of noise, blur, distortion
            noise = _gauss_noise
            blur = v2.RandomChoice([v2.GaussianBlur(5, sigma=(0.1, 2.0)), _box_blur,
                                    _median_blur])
            dist = v2.RandomChoice([
                v2.ElasticTransform(alpha=30.0, sigma=5.0),
                v2.RandomAffine(degrees=45, translate=(0.0625, 0.0625), scale=(0.9, 1.1)),
                v2.RandomPerspective(distortion_scale=0.2, p=1.0),
            ])
            steps.append(v2.RandomChoice([noise, blur, dist]))

    def apply(x: Tensor) -> Tensor:
        for step in steps:
            x = step(x)
        return x

    return apply
