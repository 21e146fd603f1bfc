"""Zero-shot validation during pre-training: the label sets' prompt ensembles, built by the one
prompt-classifier builder from the in-training text side, scored with the shared AUC code."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..labels import LabelSet
from ..metrics import bootstrap_auc, label_aucs
from ..prompt_classifier import build_prompt_classifier
from .augment import normalize_pixels


def zero_shot_probs(img: torch.Tensor, ls: LabelSet, embed_texts, scale: float) -> np.ndarray:
    """img: normalised image embeddings (N, E) -> (N, L) probabilities averaged over prompt styles
    (multi-label: softmax[pos, neg] per label; multi-class: softmax over the classes' prompts)."""
    clf = build_prompt_classifier(ls, None, embed_texts, scale)
    return clf.probabilities(img).mean(-2).cpu().numpy()


def zero_shot_auc(probs: np.ndarray, rows, ls: LabelSet) -> dict[str, float]:
    """AUC per label (and per group) where both classes occur among `rows`."""
    targets = np.array([[name in r.labels for name in ls.names] for r in rows], dtype=np.int8)
    return {k: float(v) for k, v in label_aucs(targets.reshape(len(rows), len(ls.names)), probs, ls).items()
            if v is not None}


def _key_columns(probs: np.ndarray, rows, ls: LabelSet, keys) -> tuple[np.ndarray, np.ndarray]:
    """Targets and scores (N, K) of the AUC keys: a label's own column, or a group's members
    (positive when any is; score their sum for multi-class sets, their maximum for multi-label)."""
    t_cols, s_cols = [], []
    for k in keys:
        members = ls.groups[k[:-len(" (group)")]] if k.endswith(" (group)") else [k]
        cols = [ls.names.index(n) for n in members]
        t_cols.append([any(n in r.labels for n in members) for r in rows])
        s_cols.append(probs[:, cols].max(1) if ls.multilabel else probs[:, cols].sum(1))
    return np.array(t_cols, dtype=np.int8).T.reshape(len(rows), len(keys)), np.stack(s_cols, 1)


def auc_intervals(probs: np.ndarray, rows, ls: LabelSet, aucs: dict, n_boot: int) -> dict[str, list[float]]:
    """95 % patient-level bootstrap interval per AUC key (patients resampled whole)."""
    if n_boot <= 0 or not aucs:
        return {}
    keys = list(aucs)
    t, s = _key_columns(probs, rows, ls, keys)
    boot = bootstrap_auc(t, s, n_boot=n_boot, seed=0, groups=[r.group for r in rows])
    out = {}
    for j, k in enumerate(keys):
        col = boot[:, j][~np.isnan(boot[:, j])]
        if len(col):
            out[k] = [float(np.percentile(col, 2.5)), float(np.percentile(col, 97.5))]
    return out


def _summary(aucs: dict, rows, ls: LabelSet, withheld: frozenset) -> dict:
    members = {**{n: [n] for n in ls.names}, **{f"{g} (group)": list(m) for g, m in ls.groups.items()}}
    n_pos = {k: sum(any(n in r.labels for n in members[k]) for r in rows) for k in aucs}
    seen = [v for k, v in aucs.items() if k not in withheld and not k.endswith(" (group)")]
    held = [aucs[k] for k in aucs if k in withheld]
    return {"n": len(rows), "auc": aucs, "n_pos": n_pos, "mean_auc": float(np.mean(seen)) if seen else float("nan"),
            "mean_auc_withheld": float(np.mean(held)) if held else None}


@torch.no_grad()
def image_embeddings(model, pixels: torch.Tensor, mean, std, device, use_amp: bool, batch: int = 256) -> torch.Tensor:
    embs = []
    for i in range(0, len(pixels), batch):
        x = normalize_pixels(pixels[i:i + batch].to(device).float() / 255, mean, std)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            embs.append(F.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(embs) if embs else torch.zeros(0, model.text.proj.out_features)


def validation_summary(run, img: torch.Tensor, n_boot: int = 0) -> dict:
    """Per label set of `run.val_rows` (image embeddings `img`, in row order): AUCs, their summary
    and, when `n_boot`, patient-bootstrap intervals. `run` gives label_sets, val_rows, withheld,
    embed_prompt_texts and model (its logit scale): a stage-1 `TrainingRun` or a stage-2 run."""
    scale = float(run.model.logit_scale.exp().clamp(max=100))
    res = {}
    for sname, ls in run.label_sets.items():
        sel = [i for i, r in enumerate(run.val_rows) if r.label_set == sname]
        if not sel:
            continue
        rows = [run.val_rows[i] for i in sel]
        probs = zero_shot_probs(img[sel], ls, run.embed_prompt_texts, scale)
        aucs = zero_shot_auc(probs, rows, ls)
        res[sname] = _summary(aucs, rows, ls, run.withheld)
        if n_boot:
            res[sname]["auc_ci"] = auc_intervals(probs, rows, ls, aucs, n_boot)
    return res


@torch.no_grad()
def evaluate(run, n_boot: int = 0) -> dict:
    """{label set: {n, auc, n_pos, mean_auc (non-withheld labels), mean_auc_withheld[, auc_ci]}} on
    the validation rows of a `TrainingRun` (`auc_ci` when `n_boot` > 0). Leaves the model training."""
    model = run.model
    model.eval()
    img = image_embeddings(model, run.val_px, run.mean, run.std, run.device, run.use_amp)
    res = validation_summary(run, img, n_boot)
    model.train()
    if not run.config.text_lora:
        model.text.eval()
    return res
