"""Corruptions of an upsampler's low-resolution input in training (Ramesh et al. 2022, sec. 2.1; appendix).

    gaussian_blur_aug  64 -> 256: gaussian blur, kernel 3, sigma ~0.6, applied with a probability
    bsr_degrade        256 -> 1024: a BSR-style chain (Zhang et al. 2021, "Designing a Practical Degradation
                       Model for Deep Blind Image Super-Resolution") in random order: gaussian blur with a
                       random sigma, down- and back up-scaling with a random factor and filter, gaussian noise
    paired_random_crop the same random crop of the target and of the upsampled conditioning, per sample

All take and return (B, C, H, W) float tensors in [-1, 1] on any device, with no host-device sync.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

__all__ = ["gaussian_blur_aug", "bsr_degrade", "paired_random_crop"]


def _per_sample(mask_prob: float, batch: int, device: torch.device) -> torch.Tensor:
    return (torch.rand(batch, device=device) < mask_prob).view(-1, 1, 1, 1)


def gaussian_blur_aug(x: torch.Tensor, prob: float = 0.5, kernel_size: int = 3,
                      sigma: tuple[float, float] = (0.4, 0.6)) -> torch.Tensor:
    """Blur each image with probability `prob` (one sigma per batch, drawn on the host from `sigma`)."""
    if prob <= 0:
        return x
    s = random.uniform(*sigma)
    blurred = TF.gaussian_blur(x, kernel_size=[kernel_size, kernel_size], sigma=[s, s])
    return torch.where(_per_sample(prob, x.shape[0], x.device), blurred, x)


def bsr_degrade(x: torch.Tensor, prob: float = 1.0, blur_sigma: tuple[float, float] = (0.2, 2.0),
                scale: tuple[float, float] = (0.5, 1.0), noise_std: tuple[float, float] = (0.0, 0.05)) -> torch.Tensor:
    """BSR-style degradation in a random order; the result keeps the input's shape and stays in [-1, 1]."""
    if prob <= 0:
        return x
    h, w = x.shape[-2:]

    def blur(y: torch.Tensor) -> torch.Tensor:
        s = random.uniform(*blur_sigma)
        k = 2 * int(round(3 * s)) + 1
        return TF.gaussian_blur(y, kernel_size=[k, k], sigma=[s, s])

    def rescale(y: torch.Tensor) -> torch.Tensor:
        f = random.uniform(*scale)
        size = (max(1, int(h * f)), max(1, int(w * f)))
        down = F.interpolate(y, size=size, mode=random.choice(["bilinear", "bicubic", "area"]))
        return F.interpolate(down, size=(h, w), mode=random.choice(["bilinear", "bicubic"]), align_corners=False)

    def noise(y: torch.Tensor) -> torch.Tensor:
        std = torch.empty(y.shape[0], 1, 1, 1, device=y.device).uniform_(*noise_std) * 2  # [-1,1] range: x2
        return y + std * torch.randn_like(y)

    ops = [blur, rescale, noise]
    random.shuffle(ops)
    y = x
    for op in ops:
        y = op(y)
    return torch.where(_per_sample(prob, x.shape[0], x.device), y.clamp(-1, 1), x)


def paired_random_crop(a: torch.Tensor, b: torch.Tensor, size: int,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random (size x size) crop of a and b (B, C, H, W), a different location per sample.

    Gathers with index tensors built on the device, so the offsets never travel to the host.
    """
    if a.shape[0] != b.shape[0] or a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"paired crops need equal batch and size, got {tuple(a.shape)} and {tuple(b.shape)}")
    bsz, _, h, w = a.shape
    if size > min(h, w):
        raise ValueError(f"crop size {size} exceeds the image size {h}x{w}")
    if size == h and size == w:
        return a, b
    top = torch.randint(0, h - size + 1, (bsz, 1), device=a.device, generator=generator)
    left = torch.randint(0, w - size + 1, (bsz, 1), device=a.device, generator=generator)
    rows = (top + torch.arange(size, device=a.device)).view(bsz, 1, size, 1)  # (B, 1, S, 1)
    cols = (left + torch.arange(size, device=a.device)).view(bsz, 1, 1, size)  # (B, 1, 1, S)

    def crop(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        idx_rows = rows.expand(bsz, c, size, w)
        x = x.gather(2, idx_rows)  # (B, C, S, W)
        return x.gather(3, cols.expand(bsz, c, size, size))  # (B, C, S, S)

    return crop(a), crop(b)
