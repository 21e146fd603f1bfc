"""Image pixels -> model tensors: THE resize + centre-crop, used by inference and training alike.

`resize_center_crop` is open_clip's eval geometry (shorter side to `size`, centre crop) done in
OpenCV so it runs in DataLoader workers without PIL round-trips; `normalise` does the [0, 1]
scaling and mean/std normalisation (in the engine, after the uint8 pixels reach the encoder's device);
`model_transform` is the two together. Pre-training, LoRA fine-tuning and scoring all call these, so
training and inference cannot drift apart. torch is imported only by the tensor functions.
"""
from __future__ import annotations

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


def model_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 (or one grey plane HxW) -> uint8 C x size x size, C = 3 (or 1): `resize_center_crop`,
    channels first. What the engine's workers send: a quarter of the bytes of the normalised floats (a
    twelfth for a grey plane)."""
    img = resize_center_crop(pixels, size)
    return img[None] if img.ndim == 2 else img.transpose(2, 0, 1)


def cat_pixels(tensors: Sequence):
    """uint8 tensors (N_i, C_i, H, W) -> one (sum N_i, C, H, W); grey planes (C = 1) are repeated to three
    channels only when colour images share the batch."""
    import torch

    if len({t.shape[-3] for t in tensors}) > 1:
        tensors = [t.expand(*t.shape[:-3], 3, *t.shape[-2:]) for t in tensors]
    return torch.cat(list(tensors))


def normalise(pixels, mean, std):
    """uint8 tensor (..., C, H, W), C = 3, or 1 for a grey plane that every channel reads -> float32
    (..., 3, H, W): open_clip's eval normalisation ([0, 1] scaling, then mean/std per channel), on the
    device the pixels are on (the engine normalises after the uint8 copy to the encoder's device)."""
    import torch

    m = torch.tensor([float(v) for v in mean], dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    s = torch.tensor([float(v) for v in std], dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.to(torch.float32).div_(255.0) - m) / s


def model_transform(pixels: np.ndarray, size: int, mean, std):
    """uint8 HxWx3 (or one grey plane HxW) -> normalised float32 tensor 3 x size x size (open_clip's
    eval transform: resize + centre crop, [0, 1] scaling, then mean/std per channel)."""
    import torch

    return normalise(torch.from_numpy(model_pixels(pixels, size)), mean, std)


def model_tensors(pixels: Sequence[np.ndarray], size: int, mean, std):
    """A list of uint8 HxWx3 images -> one (N, 3, size, size) tensor via `model_transform`."""
    import torch

    return normalise(cat_pixels([torch.from_numpy(model_pixels(p, size))[None] for p in pixels]), mean, std)


def variant_arrays(image, variants: list[str], size: int) -> np.ndarray:
    """uint8 (V, C, size, size): each named preprocessing variant of `image.pixels`, resized and cropped;
    C = 1 when the image is grey (varied and resized on one plane: the same numbers, a third of the work).
    numpy only: the engine's CPU stage (`vlm.prepare`) runs without torch."""
    from .variants import get_variant

    pixels = np.ascontiguousarray(image.pixels[..., 0]) if getattr(image, "is_grey", False) else image.pixels
    return np.stack([model_pixels(get_variant(v)(pixels), size) for v in variants])


def variant_pixels(image, variants: list[str], size: int):
    """`variant_arrays` as a torch tensor."""
    import torch

    return torch.from_numpy(variant_arrays(image, variants, size))


def variant_tensors(image, variants: list[str], size: int, mean, std):
    """(V, 3, size, size): `variant_pixels`, normalised."""
    return normalise(variant_pixels(image, variants, size), mean, std)
