"""A custom-text CLIP whose pretrained Hugging Face text tower is built when text is first needed.

Why: building that tower imports transformers' BERT modelling and loads the text model's weights (90 MB
for MiniLM): ~0.8 s of every process's start-up on this 2-core machine (benchmarks/RESULTS.md), while a
batch, an `analyze` or an API call whose prompt embeddings are already in the store never runs it.
`load_model(..., defer_text=True)` asks for it (`load_scorer` does, without an adapter); training and
adapter code load eagerly.

The model is open_clip's `CustomTextCLIP` with `text` missing until first use: `model.text` (what
`encode_text` reads) builds it, loads the checkpoint's own text entries (its projection) into it, puts it
on the image tower's device and training mode, and registers it, so from then on the model is exactly
the eagerly built one. Until then `state_dict()` and `named_modules()` have no `text.*` entries:
`vlm.models.complete(module)` builds the tower first (LoRA target search and adapter application call it).
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
from open_clip.model import CustomTextCLIP
from torch import nn

from .base import ModelLoadError

# one build at a time (the API server may encode two new prompt sets at once); module-level, as a lock in
# the model would stop it being deep-copied
_BUILD_LOCK = threading.RLock()

# what CustomTextCLIP builds in place of the real tower during __init__ (removed right after): as small as it goes
_PLACEHOLDER_TEXT_CFG = {"context_length": 1, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}


class DeferredTextCLIP(CustomTextCLIP):
    _FROM_TEXT = ("text", "context_length", "vocab_size")  # what CustomTextCLIP has from its text tower

    def __init__(self, build_text: Callable[[], nn.Module], text_state: dict[str, torch.Tensor], source: str,
                 **clip_cfg):
        super().__init__(**{**clip_cfg, "text_cfg": _PLACEHOLDER_TEXT_CFG})
        del self.text, self.context_length, self.vocab_size
        self._build_text = build_text  # () -> the text tower with its pretrained weights
        self._text_state = text_state  # the checkpoint's text.* tensors, loaded into it when built
        self._source = source  # the weights file, for errors

    def __getattr__(self, name: str):  # only called for what is not found the normal way
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in DeferredTextCLIP._FROM_TEXT or "_build_text" not in self.__dict__:
                raise
        self.materialize_text()
        return getattr(self, name)

    def materialize_text(self) -> nn.Module:
        with _BUILD_LOCK:
            if "text" not in self._modules:
                self._build_and_register_text()
        return self._modules["text"]

    def _build_and_register_text(self) -> None:
        text = self._build_text()
        missing, unexpected = text.load_state_dict(self._text_state, strict=False)
        bad_missing = [k for k in missing if not k.startswith("transformer.")]  # pretrained, from its package
        if bad_missing or unexpected:
            raise ModelLoadError(f"{self._source}: text weights do not match the text tower: missing "
                                 f"{bad_missing[:5]}, unexpected {unexpected[:5]}")
        self.text = text.to(next(self.visual.parameters()).device).train(self.training)
        self.context_length, self.vocab_size = text.context_length, text.vocab_size
        self._text_state = {}
