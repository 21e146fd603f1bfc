"""Text embeddings keyed by (model fingerprint, prompt text), kept in the embedding store.

Prompt ensembles are re-used across runs; encoding them is pure waste after the first
time. Vectors live in `vlm.store` (one SQLite file shared with the image embeddings, safe for
concurrent runs, bounded); this class keeps an in-memory table per model on top and counts
how many texts really went through a text encoder.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .store import default_cache_dir, open_store  # noqa: F401 - default_cache_dir is re-exported


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class TextEmbeddingCache:
    """directory: where the store lives (default $VLM_XRAY_CACHE); enabled=False: memory only."""

    def __init__(self, directory: str | Path | None = None, enabled: bool = True):
        self.directory = Path(directory) if directory else default_cache_dir()
        self.enabled = enabled
        self._mem: dict[str, dict[str, np.ndarray]] = {}
        self.encoded = 0  # texts that went through a text encoder (benchmarks read this)
        self.hits = 0

    def _table(self, fingerprint: str, keys: list[str]) -> dict[str, np.ndarray]:
        """The in-memory table of a model, filled from the store with whichever of `keys` it holds."""
        table = self._mem.setdefault(fingerprint, {})
        missing = [k for k in dict.fromkeys(keys) if k not in table]
        if missing and self.enabled:
            table.update(open_store(self.directory).get_texts(fingerprint, missing))
        return table

    @torch.no_grad()
    def embed(self, backbone, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised embeddings for `texts` (T, D), encoding only those not cached."""
        fp = backbone.fingerprint
        if not fp:
            raise ValueError("backbone has no fingerprint; cannot key the text cache")
        table = self._table(fp, [_key(t) for t in texts])
        # by length, so each batch pads (and the tokenizer trims) to similar prompt lengths
        todo = sorted(dict.fromkeys(t for t in texts if _key(t) not in table), key=len)
        self.hits += len(texts) - len(todo)
        if todo:
            was_training = backbone.module.training
            backbone.module.eval()
            new = {}
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                emb = backbone.encode_texts(chunk).cpu().numpy().astype(np.float32)
                new.update({_key(t): e for t, e in zip(chunk, emb)})
            backbone.module.train(was_training)
            table.update(new)
            self.encoded += len(todo)
            if self.enabled:
                open_store(self.directory).put_texts(fp, new)
        return torch.from_numpy(np.stack([table[_key(t)] for t in texts]))
