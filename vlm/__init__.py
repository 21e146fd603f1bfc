"""vlm-xray: zero-/few-shot medical image reading with CLIP-style vision-language models.

Research software, not a diagnostic device.

    from vlm import load_scorer
    scorer = load_scorer("vlm-xray-starter", labels="chestxray14")
    result = next(scorer.score(["chest.png"], threshold=0.4))

Public names are imported lazily, so `import vlm` (and `vlm-xray --help`) does not import torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "load_scorer": "api", "resolve_device": "api",
    "Image": "images", "ImageLoadError": "images", "load_image": "images",
    "LabelSet": "labels", "LabelSetError": "labels", "list_label_sets": "labels", "load_label_set": "labels",
    "Backbone": "models", "ModelLoadError": "models", "list_models": "models", "load_model": "models",
    "Finding": "results", "ImageFailure": "results", "ImageResult": "results",
    "Scorer": "scoring", "score_image": "scoring",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
