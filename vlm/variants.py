"""Named preprocessing variants (test-time augmentation).

Each variant maps 8-bit RGB pixels (H, W, 3) - or one grey plane (H, W), the same numbers
as each channel of a grey RGB image - to pixels of the same kind, any size; the model's
own resize and normalisation are applied afterwards. Scores are averaged over variants and
their spread is reported as uncertainty: a finding that appears only under one contrast
setting is less trustworthy than one that survives all of them.

Add a variant by decorating a function with `@register_variant("name")`.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from .images import equal_channels

VariantFn = Callable[[np.ndarray], np.ndarray]
_VARIANTS: dict[str, tuple[VariantFn, str]] = {}

DEFAULT_VARIANTS = ("original", "clahe", "equalize", "gamma", "hflip")


def register_variant(name: str):
    def deco(fn: VariantFn) -> VariantFn:
        _VARIANTS[name] = (fn, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def _per_channel_grey(rgb: np.ndarray, op: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a greyscale operation to luminance only, so colour photos keep their hue."""
    if rgb.ndim == 2:
        return op(rgb)
    if equal_channels(rgb):
        g = op(np.ascontiguousarray(rgb[..., 0]))
        return np.repeat(g[:, :, None], 3, axis=2)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lab[..., 0] = op(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


@register_variant("original")
def original(rgb: np.ndarray) -> np.ndarray:
    """The image as read, unchanged."""
    return rgb


@register_variant("clahe")
def clahe(rgb: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (clip 2.0, 8x8 tiles): local contrast, as radiologists window."""
    op = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    return _per_channel_grey(rgb, op.apply)


@register_variant("equalize")
def equalize(rgb: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of luminance: spreads intensities over the full range."""
    return _per_channel_grey(rgb, cv2.equalizeHist)


@register_variant("gamma")
def gamma(rgb: np.ndarray) -> np.ndarray:
    """Gamma 0.8 (brightens mid-tones), a mild exposure change such as between scanners."""
    table = (np.linspace(0, 1, 256) ** 0.8 * 255 + 0.5).astype(np.uint8)
    return cv2.LUT(rgb, table)


@register_variant("hflip")
def hflip(rgb: np.ndarray) -> np.ndarray:
    """Horizontal flip: left-right mirror (tests laterality robustness; situs is not inferred)."""
    return cv2.flip(rgb, 1)  # = rgb[:, ::-1], contiguous, several times faster than numpy's copy


@register_variant("center_crop")
def center_crop(rgb: np.ndarray) -> np.ndarray:
    """Central 90% crop: removes borders, burnt-in markers and collimation edges."""
    h, w = rgb.shape[:2]
    dh, dw = int(h * 0.05), int(w * 0.05)
    return np.ascontiguousarray(rgb[dh : h - dh, dw : w - dw])


def list_variants() -> dict[str, str]:
    """Variant name -> one-line description."""
    return {name: doc for name, (_, doc) in _VARIANTS.items()}


def get_variant(name: str) -> VariantFn:
    try:
        return _VARIANTS[name][0]
    except KeyError:
        raise ValueError(f"unknown preprocessing variant {name!r}; available: {', '.join(_VARIANTS)}") from None


def resolve_variants(names: list[str] | tuple[str, ...] | str | None) -> list[str]:
    """Accept a list or a comma-separated string; validate names; keep order, drop repeats."""
    if names is None or names == "" or names == ():
        return list(DEFAULT_VARIANTS)
    if isinstance(names, str):
        names = [names]
    flat = [n.strip() for item in names for n in item.split(",") if n.strip()]
    for n in flat:
        get_variant(n)
    return list(dict.fromkeys(flat))
