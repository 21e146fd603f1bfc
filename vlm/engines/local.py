"""The local engine: one process, DataLoader decode workers sized to the machine, one model.

It is `vlm.scoring.encode_images` (streaming, store lookups in the workers, all variants of a batch
in one forward pass, pinned memory + channels-last + autocast on GPU; the OOD guard's stage features
captured in that same pass) followed by `Scorer.outcome`;
`compile=True` puts the image encoder through `torch.compile` first.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
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
        encoded = encode_images(scorer.backbone, paths, scorer.variants, scorer.batch_size, workers,
                                scorer.image_cache, load_options=scorer.load_options, encoder=encoder,
                                features=scorer.wants_ood_features)
        with single_threaded_blas():
            for enc in encoded:
                if isinstance(enc, ImageFailure):
                    yield enc
                    continue
                with one_torch_thread():
                    out = scorer.outcome(enc, thr)
                yield out


@contextmanager
def single_threaded_blas():
    """numpy's BLAS on one thread while the loop runs: it only does one image's small products here (the
    OOD distance), and its threads' wake-ups and spinning cost more CPU than they saved, CPU the encoder
    and the decode workers need. torch's own threads (OpenMP) are not touched."""
    from threadpoolctl import ThreadpoolController

    with ThreadpoolController().limit(limits=1, user_api="blas"):
        yield


def one_torch_thread():
    """One image's scoring on one torch thread: a few products of (variants x D) rows, where waking the
    encoder's other threads costs more than it gives (0.72 vs 1.86 CPU ms an image in development
    profiling). Process-wide, so only for this single-threaded loop (the API server scores beside a
    running encoder)."""
    import torch

    from ..scoring import temporary_setting

    return temporary_setting(torch.get_num_threads, torch.set_num_threads, 1)
