"""Few-shot adaptation orchestration: sample shots, adapt with a method, evaluate, save."""
from __future__ import annotations

import logging
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import LabelledData, sample_shots
from ..labels import LabelSet
from ..models import Backbone
from .io import check_adapter_target, load_adapter, read_adapter_meta, save_adapter
from .lora import LoraSettings, LoraTargetError, detect_targets, find_candidates, train_lora, verify_targets
from ..metrics import auc_metrics

from . import LORA_METHODS, METHODS

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "Adapted", "LoraSettings", "LoraTargetError", "finetune", "load_adapter", "save_adapter",
           "read_adapter_meta", "detect_targets", "find_candidates", "verify_targets", "evaluate_adapter",
           "exclude_groups", "adapter_probabilities"]


@dataclass
class Adapted:
    backbone: Backbone  # the backbone to encode images with (LoRA kept: adapted copy; else the base)
    head: torch.nn.Module
    label_set: LabelSet
    info: dict
    lora_config: object = None
    metrics: dict | None = None
    out_dir: Path | None = None
    extra_state: dict | None = None


def exclude_groups(data: LabelledData, used: LabelledData) -> LabelledData:
    """`data` without the rows of any patient in `used` and without `used`'s files. Patients are matched
    by group key and by bare patient id, so a patient in two datasets' CSVs is excluded too."""
    groups, patients, paths = set(used.groups), set(used.patient_ids), set(used.paths)
    keep = [i for i, (g, q, p) in enumerate(zip(data.groups, data.patient_ids, data.paths))
            if g not in groups and q not in patients and p not in paths]
    return data.subset(keep)


AUTO_VAL_SHOTS = 8  # validation images per class drawn from --data when no validation set is given


def validation_set(data: LabelledData, train: LabelledData, val: LabelledData | None = None,
                   val_shots: int | None = None, seed: int = 0) -> LabelledData | None:
    """The validation images selection and the never-worse guard score: `val` (rows of training
    patients removed; `val_shots` per class, source-matched, None = all), or, when no `val` is given,
    `val_shots` (default AUTO_VAL_SHOTS) per class from the other patients of `data` - so the guard
    runs by default. None when no image is left (e.g. every row was a shot)."""
    from .guard import source_matched_sample  # same-source negatives for within-source selection

    if val is None:
        val, val_shots = data, AUTO_VAL_SHOTS if val_shots is None else val_shots
    val = exclude_groups(val, train)
    if val_shots is not None and len(val):
        val = val.subset(source_matched_sample(val, val_shots, seed + 1))
    return val if len(val) else None


@torch.no_grad()
def adapter_probabilities(backbone: Backbone, head, data: LabelledData, variants=("original",), cache=None,
                          batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(targets, probabilities (N, L)) of `data` as the Scorer would give them: head outputs
    averaged over variants x styles. Unreadable images are dropped."""
    from ..scoring import ImageFailure, encode_images

    probs, keep = [], []
    for i, enc in enumerate(encode_images(backbone, data.paths, list(variants), batch_size=batch_size, cache=cache)):
        if isinstance(enc, ImageFailure):
            continue
        probs.append(head(enc.embeddings.to(backbone.device)).mean((0, 1)).cpu().numpy())
        keep.append(i)
    return data.targets[keep], np.stack(probs)


def evaluate_adapter(base: Backbone, adapted: Adapted, data: LabelledData, styles=None,
                     variants=("original",), cache=None) -> dict:
    """Per-label and macro AUC of the adapter and of the base model's zero-shot prompts on `data`."""
    from .heads import PromptHead
    from ..scoring import text_classifier

    zs_head = PromptHead.from_classifier(text_classifier(base, adapted.label_set, styles)).to(base.device)
    t, p_zs = adapter_probabilities(base, zs_head, data, variants, cache)
    same_images = adapted.backbone is base or adapted.backbone.module is base.module
    t2, p_ad = adapter_probabilities(adapted.backbone, adapted.head, data, variants,
                                     cache if same_images else None)
    return {"data": str(data.csv_path), "variants": list(variants),
            "zero_shot": auc_metrics(t, p_zs, adapted.label_set), "adapter": auc_metrics(t2, p_ad, adapted.label_set)}


def finetune(
    backbone: Backbone,
    label_set: LabelSet,
    data: LabelledData,
    *,
    method: str = "lora",
    shots: int | None = 16,
    seed: int = 0,
    styles: list[str] | None = None,
    val: LabelledData | None = None,
    eval_data: LabelledData | None = None,
    settings: LoraSettings | None = None,
    out_dir: str | Path | None = None,
    cache=None,
    progress: bool = True,
    training_meta: dict | None = None,
    eval_variants=("original",),
) -> Adapted:
    """Sample `shots` per class from `data` (seeded; None = all rows), adapt, optionally evaluate
    on `eval_data` (rows of training patients removed) and save the adapter folder.

    `val`: the validation images of selection and the per-label guard; without them the guard cannot
    run. `vlm-xray finetune` passes `validation_set(data, train)` by default (8 per class from the other
    patients of `data`); do the same from Python for the same result."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if out_dir is not None:
        check_adapter_target(out_dir)  # before training: a run must not be lost to an unusable --out
    idx = sample_shots(data, shots, seed)
    if len(idx) == 0:
        raise ValueError(f"{data.csv_path}: no rows to train on for label set {label_set.name}")
    train = data.subset(idx)
    counts = dict(zip(label_set.names, train.targets.sum(0).astype(int).tolist()))
    logger.info(f"{method}: {len(train)} training images from {data.csv_path} "
        f"({'all rows' if shots is None else f'{shots} shots per class'}, seed {seed}): "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    t0 = time.time()
    if method in LORA_METHODS:
        st = dataclasses.replace(settings or LoraSettings(), seed=seed, **LORA_METHODS[method])
        if val is not None:
            val = exclude_groups(val, train)
        res = train_lora(backbone, label_set, train, val, st, styles, progress=progress)
        adapted = Adapted(res.backbone, res.head, label_set, res.info, res.lora_config)
        adapted.extra_state = res.extra_state
    elif method == "linear-probe":
        from .baselines import train_linear_probe

        if val is not None:
            val = exclude_groups(val, train)
        head, info = train_linear_probe(backbone, label_set, train, styles, seed, cache, val=val)
        adapted = Adapted(backbone, head.to(backbone.device), label_set, info)
    else:
        from .baselines import train_tip_adapter

        if val is not None:
            val = exclude_groups(val, train)
        head, info = train_tip_adapter(backbone, label_set, train, styles, seed, cache, val=val)
        adapted = Adapted(backbone, head.to(backbone.device), label_set, info)
    adapted.info["shots_per_class"] = counts
    if eval_data is not None:
        held = exclude_groups(eval_data, train)
        adapted.metrics = evaluate_adapter(backbone, adapted, held, styles, eval_variants, cache)
        a, z = adapted.metrics["adapter"], adapted.metrics["zero_shot"]
        logger.info(f"held-out ({a['n']} images) macro AUC: adapter {_fmt(a['macro_auc'])} vs zero-shot {_fmt(z['macro_auc'])}")
        for name, v in a["per_label"].items():
            logger.info(f"  {name:<28} adapter {_fmt(v)}  zero-shot {_fmt(z['per_label'].get(name))}")
    if out_dir is not None:
        training = {"data": str(data.csv_path), "shots": "all" if shots is None else shots, "seed": seed,
                    "device": str(backbone.device), "n_val_images": len(val) if val is not None else None,
                    "seconds": round(time.time() - t0, 1), **(training_meta or {})}
        if method in LORA_METHODS:
            training["settings"] = adapted.info["settings"]
        save_adapter(out_dir, backbone, label_set, adapted.head, adapted.info,
                     lora_module=adapted.backbone.module if adapted.lora_config is not None else None,
                     lora_config=adapted.lora_config, extra_state=getattr(adapted, "extra_state", None),
                     training=training, metrics=adapted.metrics)
        adapted.out_dir = Path(out_dir)
        logger.info(f"wrote adapter {out_dir}")
    return adapted


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
