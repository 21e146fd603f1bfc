"""Text embeddings keyed by (model fingerprint, prompt text), kept in the embedding store.

Prompt ensembles are re-used across runs; encoding them is pure waste after the first
time. Vectors live in `vlm.store` (one SQLite file shared with the image embeddings, safe for
concurrent runs, bounded); this class keeps an in-memory table per model on top and counts
how many texts really went through a text encoder. A model folder may ship its label sets' prompt
embeddings (text-embeddings.safetensors, `python -m vlm.text_cache ship`): a text missing from the
store is taken from there while the model's fingerprint matches the file's, before it is encoded.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .store import default_cache_dir, open_store  # noqa: F401 - default_cache_dir is re-exported


logger = logging.getLogger(__name__)


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class TextEmbeddingCache:
    """directory: where the store lives (default $VLM_XRAY_CACHE); enabled=False: memory only."""

    def __init__(self, directory: str | Path | None = None, enabled: bool = True, use_shipped: bool = True):
        self.directory = Path(directory) if directory else default_cache_dir()
        self.enabled = enabled
        self.use_shipped = use_shipped  # False: encode even what the model folder ships (`ship` does)
        self._mem: dict[str, dict[str, np.ndarray]] = {}
        self.encoded = 0  # texts that went through a text encoder (benchmarks read this)
        self.shipped = 0  # texts taken from the model folder's shipped embeddings
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
        self._from_shipped(backbone, table, texts)
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

    def _from_shipped(self, backbone, table: dict[str, np.ndarray], texts: list[str]) -> None:
        """Missing texts that the model's shipped embeddings hold go into `table` (and the store)."""
        missing = [k for k in dict.fromkeys(_key(t) for t in texts) if k not in table]
        shipped = shipped_text_embeddings(backbone) if missing and self.use_shipped else {}
        found = {k: shipped[k] for k in missing if k in shipped}
        if found:
            table.update(found)
            self.shipped += len(found)
            if self.enabled:
                open_store(self.directory).put_texts(backbone.fingerprint, found)


_SHIPPED: dict[tuple[str, str], dict[str, np.ndarray]] = {}


def shipped_text_embeddings(backbone) -> dict[str, np.ndarray]:
    """{text key: embedding} from the model folder's text-embeddings.safetensors, or {} when it has none or
    it was computed with other weights (its fingerprint differs: a retrained model, an adapter's copy)."""
    path = getattr(backbone, "text_embeddings", None)
    if path is None:
        return {}
    cache_key = (str(path), backbone.fingerprint)
    if cache_key not in _SHIPPED:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") == backbone.fingerprint:
                _SHIPPED[cache_key] = dict(zip(json.loads(meta.get("keys", "[]")), f.get_tensor("embeddings")))
            else:  # the right result either way: the prompts are encoded, as without the file
                logger.info("%s holds embeddings of model %s, not %s: prompts are encoded instead", path,
                            meta.get("fingerprint"), backbone.fingerprint)
                _SHIPPED[cache_key] = {}
    return _SHIPPED[cache_key]


def ship(model_dir: str | Path, label_sets: list[str]) -> Path:
    """Write MODEL_DIR/text-embeddings.safetensors: every prompt a scorer of each label set encodes (all its
    prompt styles, the OOD guard's too), computed with the model in that folder, keyed by its fingerprint."""
    from safetensors.numpy import save_file

    from .api import load_scorer
    from .fileio import atomic_path
    from .labels import load_label_set
    from .models.base import SHIPPED_TEXT_EMBEDDINGS

    recorder = TextEmbeddingCache(enabled=False, use_shipped=False)
    fingerprint = None
    for name in label_sets:
        label_set = load_label_set(name)
        scorer = load_scorer(str(model_dir), labels=label_set, prompt_styles=label_set.styles(), calibration="none",
                             text_cache=recorder)
        fingerprint = scorer.backbone.fingerprint
    table = recorder._mem[fingerprint]
    keys = sorted(table)
    out = Path(model_dir) / SHIPPED_TEXT_EMBEDDINGS
    with atomic_path(out) as tmp:
        save_file({"embeddings": np.stack([table[k] for k in keys]).astype(np.float32)}, str(tmp),
                  metadata={"fingerprint": fingerprint, "keys": json.dumps(keys), "label_sets": ",".join(label_sets),
                            "made_by": f"python -m vlm.text_cache ship {model_dir} --labels {','.join(label_sets)}"})
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vlm.text_cache", description="Ship a model folder's prompt "
                                 "embeddings with it, so scoring its label sets needs no text encoder pass.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ship", help="write MODEL_DIR/text-embeddings.safetensors")
    p.add_argument("model_dir")
    p.add_argument("--labels", required=True, help="comma-separated label sets (names or YAML paths)")
    args = ap.parse_args(argv)
    out = ship(args.model_dir, [x for x in args.labels.split(",") if x])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
