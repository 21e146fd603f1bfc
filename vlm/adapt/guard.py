"""Per-label never-worse guard and source-aware sampling for few-shot adaptation.

A macro validation AUC lets one label's gain hide another's loss (chest4 on the unseen starter:
TUBERCULOSIS rises, COVID19 within COVID-QU falls). After a method has chosen its adapter, the
guard decides label by label on the validation images, within source where the rows name sources:
a label keeps its adapted score only when the gain over zero-shot holds up under a paired
bootstrap (`vlm.metrics.per_label_confident_gain`: gain >= MIN_GAIN and the 5 % quantile > 0);
every other label is served by its zero-shot prompt score (`heads.GuardedHead`, saved in the
adapter, so analyze / batch / eval / the API all serve the same thing).

The served scores are what the guard validated: the fallen-back labels' zero-shot values and the
other labels' adapted values, unchanged (multi-class rows are not renormalised, see
`heads.compose_with_zero_shot`). `choose_fallbacks` still re-checks the composed output until the
mask is stable, so a head whose labels interact would be caught too (the mask only grows: at most L
rounds; with these heads one round decides).

`source_matched_sample`: shots or validation rows where each label's positive sources also bring
same-source negatives, so a within-source comparison (COVID-QU COVID vs COVID-QU normals) is
possible at all on a small validation sample.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from ..data import LabelledData, sample_shots
from ..metrics import per_label_confident_gain, source_stratified_auc
from .heads import GuardedHead, PromptHead

logger = logging.getLogger(__name__)

MIN_GAIN = 0.005  # a label keeps its adapted score only if it beats zero-shot by this AUC on validation
# ... and the gain's paired-bootstrap 5 % quantile is above 0 (1000 resamples). Measured on chest4
# (benchmarks/fewshot.md, guard_settings.py): at 10 % / 200 resamples one 16-shot run in three of the
# linear probe and Tip-Adapter kept COVID19 on a validation gain that held-out images did not confirm
QUANTILE = 0.05
N_BOOT = 1000  # paired bootstrap resamples of the validation rows
ENABLED = True  # measurement scripts (benchmarks/fewshot-v2/guard_settings.py) switch it off to see adapters unguarded


def _is_negative(data: LabelledData, j: int) -> np.ndarray:
    if data.label_set.multilabel:
        return data.targets[:, j] == 0
    return data.class_index != j


def source_matched_sample(data: LabelledData, shots: int | None, seed: int = 0) -> np.ndarray:
    """`sample_shots` (k per class), then for each label and each source of its sampled positives,
    negatives of that label from the same source until there are k of them (as far as the data hold).

    Without a `source` column this is `sample_shots` exactly."""
    chosen = sample_shots(data, shots, seed)
    sources = np.asarray(data.column("source"), dtype=object)
    if shots is None or not any(sources):
        return chosen
    rng = np.random.default_rng(seed + 7919)  # its own stream: the k per class stay those of sample_shots
    picked = set(chosen.tolist())
    for j in range(data.targets.shape[1]):
        neg = _is_negative(data, j)
        positive_sources = sorted({sources[i] for i in picked if not neg[i] and sources[i]})
        for src in positive_sources:
            same = np.flatnonzero((sources == src) & neg)
            have = [i for i in same if i in picked]
            pool = np.setdiff1d(same, list(picked))
            need = min(max(0, shots - len(have)), len(pool))
            if need:
                picked.update(rng.choice(pool, size=need, replace=False).tolist())
    return np.array(sorted(picked))


def _confident(gain: np.ndarray, lower: np.ndarray) -> np.ndarray:
    return (np.nan_to_num(gain, nan=-1.0) >= MIN_GAIN - 1e-12) & (lower > 0)


def _tie_groups(mask: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """A group's members fall back together: evaluation merges them into one class (skin12 "benign
    keratosis" = seborrheic keratosis + solar lentigo, scored by the members' summed probability), and
    a sum of one zero-shot and one adapted member is a score nobody validated."""
    out = mask.copy()
    for idx in groups:
        if out[idx].any():
            out[idx] = True
    return out


def choose_fallbacks(targets: np.ndarray, p_zero_shot: np.ndarray, score_with_mask: Callable[[np.ndarray], np.ndarray],
                     sources=None, seed: int = 0, groups: list[list[int]] = ()) -> tuple[np.ndarray, list[dict]]:
    """(keep_zero_shot (L,) bool, rounds): grow the mask of zero-shot labels (group members together)
    until every label outside it clearly beats zero-shot on the served scores `score_with_mask(mask)`."""
    mask = np.zeros(targets.shape[1], dtype=bool)
    rounds = []
    while True:
        gain, lower = per_label_confident_gain(targets, score_with_mask(mask), p_zero_shot, sources, n_boot=N_BOOT,
                                               seed=seed, quantile=QUANTILE)
        rounds.append({"keep_zero_shot": mask.tolist(), "gain": _floats(gain), "lower": _floats(lower)})
        grown = _tie_groups(mask | ~_confident(gain, lower), list(groups))
        if (grown == mask).all():
            return mask, rounds
        mask = grown


def _floats(a: np.ndarray) -> list:
    return [None if not np.isfinite(x) else round(float(x), 6) for x in a]


def _mean_probs(head, emb: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return head(emb).mean(-2).cpu().numpy()  # (N, S, L) -> (N, L): the Scorer's style average


def label_groups(label_set) -> list[list[int]]:
    """Member indices of each of the label set's groups (labels the evaluation may merge)."""
    names = list(label_set.names)
    return [[names.index(m) for m in members if m in names] for members in (label_set.groups or {}).values()]


def guard_head(head: torch.nn.Module, zero_shot: PromptHead, val_emb: torch.Tensor, val_targets: np.ndarray,
               val_sources, label_names: list[str], seed: int = 0,
               groups: list[list[int]] = ()) -> tuple[torch.nn.Module, dict]:
    """(the head to serve, report): `head` itself when every label clearly beats zero-shot on the
    validation embeddings `val_emb` (N, D; base-model embeddings), else a `GuardedHead` serving
    the other labels by their zero-shot prompt score."""
    if not ENABLED:
        return head, {"applied": False, "why": "switched off (vlm.adapt.guard.ENABLED, a measurement)"}
    p_zs = _mean_probs(zero_shot, val_emb)

    def served(mask: np.ndarray) -> np.ndarray:
        return _mean_probs(GuardedHead(head, zero_shot, mask.tolist(), label_names) if mask.any() else head, val_emb)

    mask, rounds = choose_fallbacks(val_targets, p_zs, served, val_sources, seed, groups)
    final = GuardedHead(head, zero_shot, mask.tolist(), label_names).eval() if mask.any() else head
    report = label_report(val_targets, served(mask), p_zs, val_sources, label_names, mask)
    report["rounds"] = len(rounds)
    report["first_round"] = dict(zip(label_names, zip(rounds[0]["gain"], rounds[0]["lower"])))
    log_report(report)
    return final, report


def label_report(targets, p_served, p_zs, sources, names: list[str], mask: np.ndarray) -> dict:
    """Per label: validation AUC (within source where possible) zero-shot vs served, and the decision."""
    src = None if sources is None else np.asarray(sources)
    per = {}
    for j, name in enumerate(names):
        y = targets[:, j]
        defined = 0 < y.sum() < len(y)
        z = source_stratified_auc(y, p_zs[:, j], src) if defined else None
        a = source_stratified_auc(y, p_served[:, j], src) if defined else None
        per[name] = {"zero_shot_val_auc": _round(z), "served_val_auc": _round(a),
                     "served": "zero-shot" if mask[j] else "adapted"}
    return {"min_gain": MIN_GAIN, "quantile": QUANTILE, "n_boot": N_BOOT, "within_source": src is not None,
            "n_val_images": int(len(targets)), "keep_zero_shot": dict(zip(names, mask.tolist())), "labels": per}


def _round(x):
    return None if x is None else round(float(x), 6)


def log_report(report: dict) -> None:
    fallen = [n for n, k in report["keep_zero_shot"].items() if k]
    logger.info(f"per-label guard on {report['n_val_images']} validation images"
                f"{' (within source)' if report['within_source'] else ''}: "
                + (f"zero-shot kept for {', '.join(fallen)}" if fallen else "every label clearly beats zero-shot"))
    for name, e in report["labels"].items():
        logger.info(f"  {name:<28} zero-shot {_fmt(e['zero_shot_val_auc'])}  served {_fmt(e['served_val_auc'])}"
                    f"  ({e['served']})")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def validation_sources(data: LabelledData | None, keep=None):
    """The `source` column of the (kept) validation rows as an array, or None when the rows name none."""
    if data is None:
        return None
    col = data.column("source")
    if keep is not None:
        col = [col[i] for i in keep]
    return np.asarray(col, dtype=object) if any(col) else None
