"""Text embeddings keyed by (model fingerprint, prompt text), kept on disk.

Prompt ensembles are re-used across runs; encoding them is pure waste after the first
time. One `.npz` file per model fingerprint holds {sha1(text): embedding}; it is written
atomically so concurrent or interrupted runs never leave a half-written cache.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_path


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLM_XRAY_CACHE", Path.home() / ".cache" / "vlm-xray"))


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class TextEmbeddingCache:
    def __init__(self, directory: str | Path | None = None, enabled: bool = True):
        self.directory = Path(directory) if directory else default_cache_dir() / "text"
        self.enabled = enabled
        self._mem: dict[str, dict[str, np.ndarray]] = {}
        self.encoded = 0  # texts that went through a text encoder (benchmarks read this)
        self.hits = 0

    def _file(self, fingerprint: str) -> Path:
        return self.directory / f"{fingerprint}.npz"

    def _table(self, fingerprint: str) -> dict[str, np.ndarray]:
        if fingerprint not in self._mem:
            table: dict[str, np.ndarray] = {}
            f = self._file(fingerprint)
            if self.enabled and f.is_file():
                try:
                    with np.load(f, allow_pickle=False) as z:
                        table = {k: z[k] for k in z.files}
                except (OSError, ValueError) as e:
                    # A corrupt cache is rebuilt, and said so: it only costs text-encoder time.
                    import warnings

                    warnings.warn(f"text-embedding cache {f} is unreadable ({e}); rebuilding it")
            self._mem[fingerprint] = table
        return self._mem[fingerprint]

    def _save(self, fingerprint: str) -> None:
        if not self.enabled:
            return
        with atomic_path(self._file(fingerprint)) as tmp:
            np.savez(tmp, **self._table(fingerprint))

    @torch.no_grad()
    def embed(self, backbone, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised embeddings for `texts` (T, D), encoding only those not cached."""
        fp = backbone.fingerprint
        if not fp:
            raise ValueError("backbone has no fingerprint; cannot key the text cache")
        table = self._table(fp)
        todo = list(dict.fromkeys(t for t in texts if _key(t) not in table))
        self.hits += len(texts) - len(todo)
        if todo:
            was_training = backbone.module.training
            backbone.module.eval()
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                emb = backbone.encode_texts(chunk).cpu().numpy().astype(np.float32)
                for t, e in zip(chunk, emb):
                    table[_key(t)] = e
            backbone.module.train(was_training)
            self.encoded += len(todo)
            self._save(fp)
        return torch.from_numpy(np.stack([table[_key(t)] for t in texts]))
