"""The local engine: one process, DataLoader decode workers sized to the machine, one model.

It is `vlm.scoring.encode_images` (streaming, store lookups in the workers, all variants of a batch
in one forward pass, pinned memory + channels-last + autocast on GPU; the OOD guard's stage features
captured in that same pass) followed by `Scorer.outcome`;
`compile=True` puts the image encoder through `torch.compile` first.
"""
from __future__ import annotations

import logging
from typing import Iterator

from . import register_engine

logger = logging.getLogger(__name__)


def compiled_encoder(backbone):
    """backbone.encode_images through torch.compile (dynamic batch sizes: the last batch is smaller)."""
    import torch

    return torch.compile(backbone.encode_images, dynamic=True)


@register_engine("local")
class LocalEngine:
    def __init__(self, num_workers: int | None = None, compile: bool = False):
        self.num_workers = num_workers
        self.compile = compile

    def results(self, scorer, paths, threshold) -> Iterator:
        from ..results import ImageFailure
        from ..scoring import encode_images

        thr = scorer.thresholds(threshold)
        workers = self.num_workers if self.num_workers is not None else scorer.num_workers
        encoder = compiled_encoder(scorer.backbone) if self.compile else None
        for enc in encode_images(scorer.backbone, paths, scorer.variants, scorer.batch_size, workers,
                                 scorer.image_cache, load_options=scorer.load_options, encoder=encoder,
                                 features=scorer.wants_ood_features):
            yield enc if isinstance(enc, ImageFailure) else scorer.outcome(enc, thr)
