"""The one prompt-classifier builder: text embeddings per label and prompt style, ensembled.

    ensemble(emb (K, D)) -> (D,)                 CLIP's prompt ensembling
    build_prompt_classifier(label_set, styles, embed_texts, logit_scale) -> TextClassifier
    text_classifier(backbone, label_set, styles, cache) -> TextClassifier   (through the text cache)

Scoring, prompt comparison, LoRA's prompt head and pre-training evaluation all build their
classifiers here, so "the prompt classifier" means one computation everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch

from .labels import LabelSet, PromptPair

if TYPE_CHECKING:
    from .models import Backbone
    from .text_cache import TextEmbeddingCache

PromptTables = Mapping[str, Mapping[str, PromptPair]]  # {style name: {label name: PromptPair}}


@dataclass
class TextClassifier:
    """Ensembled prompt embeddings per style.

    multilabel: weights[style] is (L, 2, D) = (positive, negative) per label.
    multiclass: weights[style] is (L, D) = positive prompts per class.
    A label a style has no prompts for has NaN weights, so its logits and probabilities are NaN.
    """

    label_set: LabelSet
    styles: list[str]
    weights: dict[str, torch.Tensor]
    logit_scale: float

    def logits(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """emb (..., D) -> per style: (..., L, 2) for multilabel or (..., L) for multiclass."""
        return {s: prompt_logits(emb, self.weights[s].to(emb.device, emb.dtype), self.logit_scale,
                                 self.label_set.multilabel) for s in self.styles}

    def probabilities(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (..., D) -> probabilities (..., S, L): P(label) per style."""
        per_style = [prompt_probabilities(lg, self.label_set.multilabel) for lg in self.logits(emb).values()]
        return torch.stack(per_style, dim=-2)


def prompt_logits(emb: torch.Tensor, weight: torch.Tensor, logit_scale: float, multilabel: bool) -> torch.Tensor:
    """emb (..., D) against one style's weights: (L, 2, D) -> (..., L, 2) multilabel; (L, D) -> (..., L).

    The one arithmetic for prompt logits: adapter heads call it too, so an untrained head is zero-shot
    bit for bit."""
    if multilabel:
        return logit_scale * torch.einsum("...d,lkd->...lk", emb, weight)
    return logit_scale * emb @ weight.T


def prompt_probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Prompt logits (..., L, 2) multilabel (P = softmax over positive vs negative) or (..., L)
    multiclass (softmax over the classes) -> probabilities (..., L)."""
    p = logits.softmax(-1)
    return p[..., 0] if multilabel else p


def ensemble(emb: torch.Tensor) -> torch.Tensor:
    """Mean of normalised prompt embeddings (K, D), re-normalised (CLIP's prompt ensembling)."""
    return torch.nn.functional.normalize(emb.mean(0), dim=-1)


def _prompt_tables(label_set: LabelSet, styles: Sequence[str] | PromptTables | None) -> PromptTables:
    if isinstance(styles, Mapping):
        unknown = [n for table in styles.values() for n in table if n not in label_set.names]
        if unknown:
            raise ValueError(f"prompt tables name labels not in {label_set.name!r}: {', '.join(unknown)}")
        return styles
    return {s: {lab.name: lab.prompts[s] for lab in label_set.labels} for s in label_set.styles(styles)}


def build_prompt_classifier(
    label_set: LabelSet,
    styles: Sequence[str] | PromptTables | None,
    embed_texts: Callable[[list[str]], torch.Tensor],
    logit_scale: float,
) -> TextClassifier:
    """A `TextClassifier` whose weights are the ensembled prompt embeddings of each label and style.

    styles: style names of `label_set` (None: all), or prompt tables {style: {label: PromptPair}}
    (e.g. from a prompt file; labels a table lacks get NaN weights). embed_texts maps a list of
    texts (label-major, then style; may repeat) to L2-normalised embeddings (T, D) in that order."""
    tables = _prompt_tables(label_set, styles)
    texts: list[str] = []
    for lab in label_set.labels:
        for table in tables.values():
            if lab.name in table:
                texts += list(table[lab.name].positive) + list(table[lab.name].negative)
    emb = embed_texts(texts)
    lookup = dict(zip(texts, emb))
    missing = torch.full((2, emb.shape[-1]) if label_set.multilabel else (emb.shape[-1],), float("nan"),
                         dtype=emb.dtype, device=emb.device)
    weights = {}
    for s, table in tables.items():
        rows = []
        for lab in label_set.labels:
            pair = table.get(lab.name)
            if pair is None:
                rows.append(missing)
                continue
            pos = ensemble(torch.stack([lookup[t] for t in pair.positive]))
            if label_set.multilabel:
                rows.append(torch.stack([pos, ensemble(torch.stack([lookup[t] for t in pair.negative]))]))
            else:
                rows.append(pos)
        weights[s] = torch.stack(rows)
    return TextClassifier(label_set, list(tables), weights, logit_scale)


def text_classifier(
    backbone: "Backbone",
    label_set: LabelSet,
    styles: list[str] | None = None,
    cache: "TextEmbeddingCache | None" = None,
) -> TextClassifier:
    """The zero-shot classifier of `backbone` for `label_set`, text embeddings through `cache`."""
    from .text_cache import TextEmbeddingCache

    cache = cache or TextEmbeddingCache()
    return build_prompt_classifier(label_set, label_set.styles(styles), lambda texts: cache.embed(backbone, texts),
                                   backbone.logit_scale)
