"""The one interface every checkpoint layout is loaded into."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

SHIPPED_TEXT_EMBEDDINGS = "text-embeddings.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelLoadError(Exception):
    """A model could not be loaded. The message names the model, where we looked and the fix."""


@dataclass
class Backbone:
    """A CLIP-style model behind one interface.

    `module` must provide `encode_image(pixels)` and `encode_text(tokens)` (open_clip's
    convention); HF `CLIPModel`s are wrapped to match. `tokenize` turns strings into what
    `encode_text` takes. Embeddings returned by `encode_images`/`encode_texts` are L2-normalised.
    """

    name: str
    module: nn.Module
    tokenize: Callable[[list[str]], object]
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    fingerprint: str = ""
    source: str = ""  # where the weights came from (path or hub id)
    layout: str = ""  # which loader read it
    card: str | None = None  # model card markdown, when the checkpoint ships one
    info: dict = field(default_factory=dict)
    # Side files a model folder ships beside its weights, read once by the factory:
    # metrics.json (training/validation record) and calibration-LABELSET.json files.
    metrics: dict | None = None
    calibrations: dict[str, Path] = field(default_factory=dict)  # label-set name -> calibration file
    # text-embeddings.safetensors: its label sets' prompt embeddings, computed with this model when it was
    # made (`python -m vlm.text_cache ship`); used in place of encoding them while the fingerprint matches
    text_embeddings: Path | None = None

    def calibration_for(self, label_set_name: str) -> Path | None:
        """The calibration this model ships for a label set (fitted on data it was trained with), if any."""
        return self.calibrations.get(label_set_name)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def logit_scale(self) -> float:
        s = getattr(self.module, "logit_scale", None)
        if s is None:
            return 100.0
        return float(s.detach().exp().clamp(max=100.0).item()) if isinstance(s, torch.Tensor) else float(s)

    def to(self, device: str | torch.device) -> "Backbone":
        self.module.to(device)
        return self

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.module.encode_image(pixels)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        if isinstance(tokens, dict):
            tokens = {k: v.to(self.device) for k, v in tokens.items()}
        else:
            tokens = tokens.to(self.device)
        feats = self.module.encode_text(tokens)
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def complete(module: nn.Module) -> nn.Module:
    """`module` with every tower built: a model whose text tower is deferred (`vlm.models.deferred_text`)
    builds it now; any other model is returned as it is. For code that walks modules or parameters."""
    if hasattr(type(module), "materialize_text"):
        module.materialize_text()
    return module


def read_side_files(folder: Path) -> dict:
    """card, metrics and shipped calibrations of a model folder (each optional)."""
    from ..fileio import read_json

    card = folder / "README.md"
    metrics = folder / "metrics.json"
    texts = folder / SHIPPED_TEXT_EMBEDDINGS
    return {
        "text_embeddings": texts if texts.is_file() else None,
        "card": card.read_text(encoding="utf-8") if card.is_file() else None,
        "metrics": read_json(metrics, "model metrics", ModelLoadError) if metrics.is_file() else None,
        "calibrations": {f.name[len("calibration-"):-len(".json")]: f
                         for f in sorted(folder.glob("calibration-*.json"))},
    }


def file_fingerprint(*paths: str | Path, extra: str = "") -> str:
    """sha256 over the bytes of the weight/config files (+ extra), 16 hex chars.

    Used to key caches and to refuse adapters trained on another base model.
    """
    h = hashlib.sha256(extra.encode())
    for p in paths:
        p = Path(p)
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def state_dict_fingerprint(module: nn.Module) -> str:
    """Fingerprint of a module's weights, for models built in memory (e.g. tests)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes()[:4096])
        h.update(str(tuple(v.shape)).encode())
    return h.hexdigest()[:16]
