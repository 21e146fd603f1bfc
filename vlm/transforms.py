"""Image pixels -> model tensors: THE resize + centre-crop, used by inference and training alike.

`resize_center_crop` is open_clip's eval geometry (shorter side to `size`, centre crop) done in
OpenCV so it runs in DataLoader workers without PIL round-trips; `model_transform` adds the [0, 1]
scaling and mean/std normalisation. Pre-training, LoRA fine-tuning and scoring all call these, so
training and inference cannot drift apart. torch is imported only by the tensor functions.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np


def crop_geometry(h: int, w: int, size: int) -> tuple[float, int, int, int, int]:
    """(scale, resized height, resized width, crop top, crop left) of `resize_center_crop` for an
    h x w image: what maps model-input positions back to original pixels (e.g. heatmaps)."""
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return scale, nh, nw, (nh - size) // 2, (nw - size) // 2


def resize_center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 -> uint8 size x size x 3: shorter side resized to `size` (area filter when
    shrinking, bicubic when enlarging), then the centre `size` x `size` crop."""
    scale, nh, nw, top, left = crop_geometry(*pixels.shape[:2], size)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    img = cv2.resize(pixels, (nw, nh), interpolation=interp)
    return np.ascontiguousarray(img[top : top + size, left : left + size])


@lru_cache(maxsize=8)
def _normalise_table(mean: tuple, std: tuple) -> np.ndarray:
    """(3, 256) float32: (v / 255 - mean) / std for every uint8 value v, computed with the very torch
    ops of the per-pixel form, so looking pixels up gives the same float32 numbers, faster."""
    import torch

    v = torch.arange(256, dtype=torch.float32).div_(255.0)[None, :]
    m = torch.tensor(mean, dtype=torch.float32)[:, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None]
    return ((v - m) / s).numpy()


def model_transform(pixels: np.ndarray, size: int, mean, std):
    """uint8 HxWx3 (or one grey plane HxW) -> normalised float32 tensor 3 x size x size (open_clip's
    eval transform: [0, 1] scaling, then mean/std per channel)."""
    import torch

    img = resize_center_crop(pixels, size)
    table = _normalise_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    if img.ndim == 2:  # grey: every channel reads the same plane
        return torch.from_numpy(np.take(table, img, axis=1))
    return torch.from_numpy(np.stack([np.take(table[c], img[..., c]) for c in range(3)]))


def model_tensors(pixels: Sequence[np.ndarray], size: int, mean, std):
    """A list of uint8 HxWx3 images -> one (N, 3, size, size) tensor via `model_transform`."""
    import torch

    return torch.stack([model_transform(p, size, mean, std) for p in pixels])


def variant_tensors(image, variants: list[str], size: int, mean, std):
    """(V, 3, size, size): each named preprocessing variant of `image.pixels`, model-transformed
    (on one plane when the image is grey: the same numbers, a third of the work)."""
    from .variants import get_variant

    pixels = np.ascontiguousarray(image.pixels[..., 0]) if getattr(image, "is_grey", False) else image.pixels
    return model_tensors([get_variant(v)(pixels) for v in variants], size, mean, std)
