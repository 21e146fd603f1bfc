"""The engine's CPU stage: one input path -> its stored embedding (looked up by file content) or its
model-size uint8 pixels, one array per preprocessing variant; or the reason it could not be read.

Free of torch, so that what runs it - the local engine's DataLoader workers and Ray's read tasks,
each a process of its own on a cluster - starts without importing it (~2 s of CPU a process).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import ImageLoadError, LoadOptions, load_image
from .transforms import variant_arrays

# The OOD guard's stage features of the 'original' variant (vlm.ood.StageFeatures), captured in the
# main forward pass and kept in the store beside the embeddings under this pseudo-variant name.
FEATURES_VARIANT = "ood-stage-features:original"
FEATURES_OF = "original"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: the content part of an image's store key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class StoreLookup:
    """What a worker needs to look an image up in the store (a location, not a connection: workers fork)."""

    location: str
    max_bytes: int | None
    fingerprint: str
    prep: str


@dataclass
class PreparedImage:
    """One input after the CPU stage: model-size uint8 pixels (V, C, H, W; `variant_arrays`), a stored
    embedding, or a failure."""

    path: str
    meta: dict = field(default_factory=dict)  # id, view, size, info
    pixels: np.ndarray | None = None  # uint8, normalised on the encoder's device (`_forward`)
    cached: np.ndarray | None = None  # (V, D) from the store
    digest: str | None = None
    error: str | None = None
    cached_features: np.ndarray | None = None  # (F,) the OOD guard's stage features, when stored with it


def prepare_image(path: str, variants: list[str], size: int, load_options: LoadOptions | None = None,
                  lookup: StoreLookup | None = None) -> PreparedImage:
    """The CPU stage for one path: store lookup by content, else load + variants + resize (uint8 pixels;
    normalised on the encoder's device)."""
    digest = None
    try:
        if lookup is not None:
            try:
                digest = file_digest(path)  # the key new embeddings are stored under
            except OSError:
                digest = None  # unreadable: load_image below names the reason
            if digest is not None and os.path.exists(lookup.location):  # (a cluster node may have no store)
                from .store import open_store

                hit = open_store(lookup.location, lookup.max_bytes).get_image_entry(
                    lookup.fingerprint, digest, lookup.prep, variants, optional=(FEATURES_VARIANT,))
                if hit is not None:
                    emb, meta, extra = hit
                    return PreparedImage(path, meta, cached=emb, digest=digest,
                                         cached_features=extra.get(FEATURES_VARIANT))
        image = load_image(path, load_options)
        x = variant_arrays(image, variants, size)
        meta = {"view": image.view, "size": list(image.size), "info": image.result_info()}
        return PreparedImage(path, meta, pixels=x, digest=digest)
    except ImageLoadError as e:
        return PreparedImage(path, error=e.reason)
    except Exception as e:  # noqa: BLE001 - one bad file must not stop a batch; reason is reported
        return PreparedImage(path, error=f"{type(e).__name__}: {e}")
