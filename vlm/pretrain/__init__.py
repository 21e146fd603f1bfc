"""LiT-style contrastive pre-training of a small image tower against a locked MiniLM text tower.

    pretrain(PretrainConfig(data=[(csv, label set or None), ...], out_dir=..., ...)) -> metrics
    (or pretrain(data, out_dir, **settings))

trains an open_clip `CustomTextCLIP` (text tower `sentence-transformers/all-MiniLM-L6-v2`, locked
or LoRA-adapted; image tower a small timm network) and writes an open_clip folder that
`vlm.models.load_model(out_dir)` reads: open_clip_config.json, open_clip_model.safetensors (fp16),
metrics.json, README.md (model card) and, while training, train_state.pt.

Modules:
    config      PretrainConfig (JSON round-trip, resume check), TEXT_CFG, parse_data_spec
    dataset     training rows through vlm.data, patient split, withheld labels, image preload
    captions    captions per label combination, prompt bank
    model       model config and construction, the text side (precomputed or LoRA)
    augment     training augmentation, pixel normalisation
    losses      multi-positive contrastive, SigLIP, prompt losses
    scheduler   warm-up + cosine learning rate (optionally time-budgeted)
    loop        TrainingRun, one step, one epoch
    evaluation  zero-shot validation AUCs (+ patient-bootstrap intervals)
    checkpoint  safetensors weights, train_state.pt
    card        model cards from templates/model_card.md.j2 and model_card_stage2.md.j2
    train       pretrain(): prepare, train, finish
    extras      train-only data, class-balanced sampling, low-resolution augmentation
    stage2      stage2(Stage2Config): attention blocks on a trained, frozen conv body (the v2 starters)

Names are imported lazily so that importing the package (the CLI) does not import torch.
"""
from __future__ import annotations

import importlib

from .config import DEFAULT_IMAGE_TOWER, TEXT_CFG, TEXT_WIDTH, PretrainConfig, parse_data_spec

_LAZY = {
    "pretrain": "train", "prepare_run": "train",
    "Row": "dataset", "read_rows": "dataset", "split_rows": "dataset", "preload_images": "dataset",
    "make_captions": "captions", "prompt_bank": "captions",
    "build_model_cfg": "model", "build_model": "model",
    "zero_shot_auc": "evaluation", "zero_shot_probs": "evaluation",
    "model_card": "card", "stage2_card": "card",
    "Stage2Config": "stage2", "stage2": "stage2",
}

__all__ = ["DEFAULT_IMAGE_TOWER", "TEXT_CFG", "TEXT_WIDTH", "PretrainConfig", "parse_data_spec",
           "detect_label_set", *_LAZY]


def __getattr__(name: str):
    if name == "detect_label_set":  # lives in vlm.data; re-exported for existing callers
        from ..data import detect_label_set

        return detect_label_set
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
