"""Training-time augmentation on preloaded uint8 batches, and the pixel normalisation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..labels import LabelSet

FLIPPABLE_MODALITIES = ("dermo", "skin", "photo", "patholog", "histo", "fundus")


def allows_flips(ls: LabelSet) -> bool:
    """Mirror images only where anatomy has no side (dermoscopy, pathology, ...), never chest films."""
    m = (ls.modality or "").lower()
    return any(k in m for k in FLIPPABLE_MODALITIES)


def augment(x: torch.Tensor, flips: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """x: float (B,3,H,W) in [0,1]. Small random-resized crop (zoom 1-1.2, shift +-5 %), rotation
    +-10 deg, brightness/contrast/gamma jitter; flips only where `flips` (dermoscopy), never for CXR."""
    b = x.shape[0]
    dev = x.device

    def u(lo, hi, n=b):
        return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(dev)

    ang = u(-10, 10) * strength * math.pi / 180
    zoom = 1 + u(0, 0.2) * strength
    tx, ty = u(-0.05, 0.05) * strength, u(-0.05, 0.05) * strength
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    fx = torch.where(flips & (torch.rand(b, generator=gen) < 0.5).to(dev), -1.0, 1.0)
    fy = torch.where(flips & (torch.rand(b, generator=gen) < 0.5).to(dev), -1.0, 1.0)
    theta = torch.stack([torch.stack([cos * fx, -sin * fy, tx], 1), torch.stack([sin * fx, cos * fy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = u(1 - 0.2 * strength, 1 + 0.2 * strength).view(b, 1, 1, 1)
    bright = u(-0.08, 0.08).view(b, 1, 1, 1) * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + bright).clamp(0, 1)
    gamma = torch.exp(u(-0.2, 0.2) * strength).view(b, 1, 1, 1)
    return x.clamp_min(1e-6) ** gamma


def normalize_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
