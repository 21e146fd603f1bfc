"""Pre-training losses as plain functions of embeddings, logits and targets.

- `multipos_loss`: label-aware multi-positive contrastive loss. Image i and caption j are a
  positive pair whenever rows i and j carry the same label combination, so the many rows that share
  a caption ("No Finding", "nevus") are never pushed apart as false negatives (plain CLIP/InfoNCE
  would). Targets are uniform over those positives, in both directions.
- `siglip_loss`: pairwise sigmoid loss with the same positives.
- prompt losses: train exactly what zero-shot scoring later computes, per label a softmax over
  [positive prompt, negative prompt] (multi-label sets) or over the classes' positive prompts
  (multi-class sets).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def positives(combos: torch.Tensor) -> torch.Tensor:
    """(B, B) float mask: 1 where two rows share a label combination (the diagonal included)."""
    return (combos[:, None] == combos[None, :]).float()


def multipos_loss(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """logits (B, B) image x caption (scaled); pos the positive mask."""
    t = pos / pos.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-t * logits.log_softmax(1), 1).mean()
                  + torch.sum(-t.T * logits.T.log_softmax(1), 1).mean())


def siglip_loss(logits: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    logits = logits + bias
    return -F.logsigmoid((2 * pos - 1) * logits).sum() / len(logits)


def multilabel_prompt_loss(img: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor,
                           targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """img (N, D); pos/neg prompt embeddings (L, D); targets (N, L) 0/1: per label a binary
    softmax over [positive, negative] prompt, i.e. BCE on the scaled similarity difference."""
    d = scale * (img @ pos_emb.T - img @ neg_emb.T)
    return F.binary_cross_entropy_with_logits(d, targets)


def multiclass_prompt_loss(img: torch.Tensor, class_emb: torch.Tensor, targets: torch.Tensor,
                           scale: torch.Tensor) -> torch.Tensor:
    """img (N, D); class prompt embeddings (C, D); targets (N, C) multi-hot (a group label is any of
    its members): -log of the softmax mass on the row's classes."""
    lg = scale * img @ class_emb.T
    lpos = lg.masked_fill(targets == 0, float("-inf")).logsumexp(1)
    return (lg.logsumexp(1) - lpos).mean()


CONTRASTIVE = {"multipos": lambda logits, pos, model: multipos_loss(logits, pos),
               "siglip": lambda logits, pos, model: siglip_loss(logits, pos, model.logit_bias)}
