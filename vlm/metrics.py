"""The one metrics module: ROC AUC (+ bootstrap CIs), ROC curves, calibration error, threshold
metrics and operating-threshold choice. NumPy only (no torch, no models), so eval, calibrate,
few-shot adaptation, prompt comparison and pre-training all report the same numbers.

Definitions:
- AUC: Mann-Whitney U / (n_pos * n_neg), ties count 1/2 (equal to scikit-learn's roc_auc_score);
  None when a label has no positive or no negative rows.
- Bootstrap: `bootstrap_weights` multiplicities; whole groups (patients) are resampled when given.
- ECE: `n_bins` equal-width probability bins on [0, 1] (the last bin includes 1.0),
  sum_b n_b/N * |mean(target in b) - mean(prob in b)|.
- Threshold metrics: positive when probability >= threshold.
- Evaluated classes: multi-label sets one per label; multi-class sets merge the members of a group
  that occur together in the targets (e.g. skin12 "benign keratosis") into one class whose
  probability is the members' sum (`evaluation_classes`, `merge_classes`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


# ----------------------------------------------------------------------------- primitives

def roc_auc(y: np.ndarray, s: np.ndarray) -> float | None:
    """ROC AUC of scores `s` for binary targets `y` (ties count 1/2); None if a class is absent."""
    auc = _weighted_auc(np.asarray(y), np.asarray(s, dtype=np.float64), np.ones((1, len(y))))[0]
    return None if math.isnan(auc) else float(auc)


def _weighted_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC for each row of weights `w` (B, N) (bootstrap multiplicities); NaN where undefined.

    One sort, then cumulative sums of negative weight: O(B * N), no Python loop over resamples."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(s, kind="mergesort")
    ss, ys = s[order], y[order]
    starts = np.searchsorted(ss, ss, side="left")
    ends = np.searchsorted(ss, ss, side="right")
    ws = w[:, order].astype(np.float64)
    neg = ws * ~ys
    pos = ws * ys
    cum = np.concatenate([np.zeros((ws.shape[0], 1)), np.cumsum(neg, axis=1)], axis=1)
    below = cum[:, starts]
    tied = cum[:, ends] - below
    num = (pos * (below + 0.5 * tied)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def bootstrap_weights(n: int, n_boot: int, seed: int = 0, groups: Sequence | None = None) -> np.ndarray:
    """(n_boot, n) multiplicities of each row in each resample; whole groups are resampled if given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float32)
    _, idx = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    g = int(idx.max()) + 1
    counts = rng.multinomial(g, np.full(g, 1.0 / g), size=n_boot).astype(np.float32)
    return counts[:, idx]


def bootstrap_auc(targets: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0,
                  groups: Sequence | None = None, chunk: int = 250) -> np.ndarray:
    """(n_boot, L) bootstrap AUCs (NaN where a resample lacks a class). Same resamples for all labels."""
    n, n_labels = targets.shape
    out = np.full((n_boot, n_labels), np.nan)
    if n_boot <= 0 or n == 0:
        return out[:0]
    w_all = bootstrap_weights(n, n_boot, seed, groups)
    for b0 in range(0, n_boot, chunk):
        w = w_all[b0 : b0 + chunk]
        for j in range(n_labels):
            y = targets[:, j]
            if y.min() == y.max():
                continue
            out[b0 : b0 + chunk, j] = _weighted_auc(y, probs[:, j].astype(np.float64), w)
    return out


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending over the unique scores; starts at (0, 0) with +inf."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    ss, ys = s[order], y[order]
    last = np.r_[np.where(np.diff(ss) != 0)[0], len(ss) - 1] if len(ss) else np.array([], int)
    tp = np.cumsum(ys)[last]
    fp = np.cumsum(~ys)[last]
    n_pos, n_neg = max(int(ys.sum()), 1), max(int((~ys).sum()), 1)
    return (np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, ss[last]])


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Equal-width bins: per bin count, mean probability and observed frequency (None when empty)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    idx = np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
                    "mean_prob": float(p[m].mean()) if n else None,
                    "frac_pos": float(y[m].mean()) if n else None})
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float | None:
    """ECE with `n_bins` equal-width bins: sum_b n_b/N * |mean(y_b) - mean(p_b)|; None for no rows."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return None
    idx = np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)
    sy = np.bincount(idx, weights=y, minlength=n_bins)
    sp = np.bincount(idx, weights=p, minlength=n_bins)
    return float(np.abs(sy - sp).sum() / len(y))


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Confusion counts and sensitivity/specificity/precision/F1 at `p >= threshold` (None if undefined)."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())

    def div(a, b):
        return a / b if b else None

    sens, prec = div(tp, tp + fn), div(tp, tp + fp)
    f1 = div(2 * tp, 2 * tp + fp + fn)
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "sensitivity": sens,
            "specificity": div(tn, tn + fp), "precision": prec, "f1": f1}


# ----------------------------------------------------------------------------- label handling

def _label_info(label_set) -> tuple[list[str], bool, dict[str, tuple[str, ...]]]:
    """(names, multilabel, groups) from a LabelSet or a plain list of names (multi-label)."""
    if hasattr(label_set, "names"):
        return list(label_set.names), bool(label_set.multilabel), dict(getattr(label_set, "groups", {}) or {})
    return [str(n) for n in label_set], True, {}


def evaluation_classes(label_set, targets: np.ndarray) -> list[tuple[str, list[int]]]:
    """The evaluated classes as (name, member label indices).

    Multi-label: one per label. Multi-class: one per label, except that the members of a group
    that occur together in some row of `targets` (group-labelled rows) become one class named
    after the group."""
    names, multilabel, groups = _label_info(label_set)
    if multilabel:
        return [(n, [i]) for i, n in enumerate(names)]
    targets = np.asarray(targets)
    merged: dict[int, tuple[str, list[int]]] = {}
    for g, members in groups.items():
        idx = [names.index(m) for m in members if m in names]
        if len(idx) > 1 and (targets[:, idx].sum(1) > 1).any():
            for i in idx:
                merged[i] = (g, idx)
    out, seen = [], set()
    for i, n in enumerate(names):
        if i in merged:
            g, idx = merged[i]
            if g not in seen:
                seen.add(g)
                out.append((g, idx))
        else:
            out.append((n, [i]))
    return out


def merge_classes(classes, targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Targets (any member) and probabilities (sum of members) per evaluated class."""
    t = np.stack([np.asarray(targets)[:, idx].max(1) for _, idx in classes], 1)
    p = np.stack([np.asarray(probs)[:, idx].sum(1) for _, idx in classes], 1)
    return t, np.clip(p, 0.0, 1.0)


# ----------------------------------------------------------------------------- thresholds

def choose_threshold(y: np.ndarray, p: np.ndarray, method: str = "youden",
                     target_sensitivity: float | None = None) -> dict:
    """Operating threshold for binary targets `y` and probabilities `p` (positive when p >= t).

    Returns {threshold, method, sensitivity, specificity, youden_j} as achieved on (y, p)."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return {"threshold": 0.5, "method": "default 0.5 (no positive or no negative rows)",
                "sensitivity": None, "specificity": None, "youden_j": None}
    fpr, tpr, thr = roc_curve(y, p)
    # the +inf start (call nothing positive) is stored as halfway between the top score and 1
    thr = thr.copy()
    thr[0] = min(1.0, (thr[1] + 1.0) / 2) if len(thr) > 1 else 1.0
    if method == "youden":
        j = tpr - fpr
        # thresholds are descending: the first (near-)maximum is the highest threshold among ties, so a
        # label no cut separates better than chance (max J = 0) is never called rather than always
        i = int(np.argmax(j >= j.max() - 1e-9))
        name = "youden" if j[i] > 1e-9 else "youden (no cut better than chance: nothing called positive)"
        if i == 0:
            return {"threshold": float(thr[0]), "method": name, "sensitivity": 0.0, "specificity": 1.0,
                    "youden_j": 0.0}
    elif method == "target_sensitivity":
        if target_sensitivity is None or not 0 < target_sensitivity <= 1:
            raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
        i = int(np.argmax(tpr >= target_sensitivity - 1e-12))
        name = f"target sensitivity {target_sensitivity:g}"
        i = max(i, 1)  # target > 0: never the call-nothing cut
    else:
        raise ValueError(f"unknown threshold method {method!r} (youden, target_sensitivity)")
    # halfway to the next lower observed score: the same calls on (y, p), robust to float noise
    lower = thr[i + 1] if i + 1 < len(thr) else 0.0
    return {"threshold": float((thr[i] + lower) / 2), "method": name, "sensitivity": float(tpr[i]),
            "specificity": float(1 - fpr[i]), "youden_j": float(tpr[i] - fpr[i])}


# ----------------------------------------------------------------------------- AUC summaries

def _round6(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def prediction_arrays(targets, probs) -> tuple[np.ndarray, np.ndarray]:
    """(targets, float64 probs) checked to be the same (N, L) shape."""
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    if targets.shape != probs.shape or targets.ndim != 2:
        raise ValueError(f"targets {targets.shape} and probs {probs.shape} must both be (N, L)")
    return targets, probs


def auc_metrics(targets: np.ndarray, probs: np.ndarray, label_set) -> dict:
    """{"macro_auc", "per_label": {class: auc | None}, "n"} for (N, L) arrays over the evaluated classes.

    Values are rounded to 6 digits and the macro AUC is the mean of the rounded per-class AUCs,
    exactly as `vlm-xray eval` reports `mean_auc` (`evaluate_predictions`)."""
    targets, probs = prediction_arrays(targets, probs)
    classes = evaluation_classes(label_set, targets)
    t, p = merge_classes(classes, targets, probs)
    per = {name: _round6(roc_auc(t[:, j], p[:, j])) for j, (name, _) in enumerate(classes)}
    vals = [v for v in per.values() if v is not None]
    return {"macro_auc": _round6(np.mean(vals)) if vals else None, "per_label": per, "n": int(len(targets))}


def label_aucs(targets: np.ndarray, probs: np.ndarray, label_set) -> dict[str, float | None]:
    """{label: auc | None} per label, plus {"<group> (group)": auc} for each of the label set's groups
    whose AUC is defined: the group is positive when any member is, and its score is the members'
    summed probability (multi-class) or their maximum (multi-label)."""
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    names, multilabel, groups = _label_info(label_set)
    out: dict[str, float | None] = {n: roc_auc(targets[:, j], probs[:, j]) for j, n in enumerate(names)}
    for group, members in groups.items():
        cols = [names.index(n) for n in members if n in names]
        if not cols:
            continue
        y = targets[:, cols].max(1)
        s = probs[:, cols].max(1) if multilabel else probs[:, cols].sum(1)
        auc = roc_auc(y, s)
        if auc is not None:
            out[f"{group} (group)"] = auc
    return out


def source_stratified_auc(y: np.ndarray, s: np.ndarray, sources: np.ndarray | None) -> float | None:
    """AUC over (positive, negative) pairs from the same source only (pair-weighted mean of the
    per-source AUCs); the plain AUC when no source holds both classes or `sources` is None.
    A label whose every positive comes from a source without negatives (cross-source only)
    therefore keeps its one-vs-rest AUC: there is nothing within source to measure."""
    if sources is None:
        return roc_auc(y, s)
    y = np.asarray(y).astype(bool)
    num = den = 0.0
    for src in set(np.asarray(sources)[y]):
        m = np.asarray(sources) == src
        n_pos, n_neg = int(y[m].sum()), int((~y[m]).sum())
        if n_pos and n_neg:
            num += roc_auc(y[m], s[m]) * n_pos * n_neg
            den += n_pos * n_neg
    return num / den if den else roc_auc(y, s)


def _mean_column_auc(targets: np.ndarray, probs: np.ndarray, sources: np.ndarray | None = None) -> float | None:
    vals = [source_stratified_auc(targets[:, j], probs[:, j], sources) for j in range(targets.shape[1])]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def selection_auc(targets: np.ndarray, probs: np.ndarray, sources: np.ndarray | None = None) -> float | None:
    """The macro AUC few-shot selection maximises: within source wherever the selection data allow
    (so an adapter is not chosen for recognising collections), one-vs-rest elsewhere."""
    return _mean_column_auc(np.asarray(targets), np.asarray(probs), sources)


def confident_gain(targets: np.ndarray, p_new: np.ndarray, p_ref: np.ndarray, label_set=None, n_boot: int = 200,
                   seed: int = 0, quantile: float = 0.1, sources: np.ndarray | None = None) -> tuple[float, float]:
    """(mean per-column AUC gain of p_new over p_ref, its `quantile` over a paired bootstrap of the rows).

    Few-shot selection data are small: a candidate should replace zero-shot only when its gain
    holds up under resampling (lower quantile > 0), not when it wins by noise. `label_set` is
    accepted for the callers' symmetry; the gain is over the (N, L) columns as given."""
    targets = np.asarray(targets)
    p_new, p_ref = np.asarray(p_new), np.asarray(p_ref)
    src = None if sources is None else np.asarray(sources)
    gain = _mean_column_auc(targets, p_new, src) - _mean_column_auc(targets, p_ref, src)
    rng = np.random.default_rng(seed)
    n = len(targets)
    gains = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        s_idx = None if src is None else src[idx]
        a, b = _mean_column_auc(targets[idx], p_new[idx], s_idx), _mean_column_auc(targets[idx], p_ref[idx], s_idx)
        if a is not None and b is not None:
            gains.append(a - b)
    lower = float(np.quantile(gains, quantile)) if gains else float("-inf")
    return float(gain), lower


def _stratified_auc_resampled(y: np.ndarray, s: np.ndarray, sources: np.ndarray | None, w: np.ndarray) -> np.ndarray:
    """`source_stratified_auc` under each row of weights `w` (B, N): the pair-weighted within-source AUC
    (weighted pair counts per source), one-vs-rest when no source of the positives holds negatives too."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    if sources is None:
        return _weighted_auc(y, s, w)
    sources = np.asarray(sources)
    num, den, within = np.zeros(len(w)), np.zeros(len(w)), False
    for src in set(sources[y]):
        m = sources == src
        if not (y[m].any() and (~y[m]).any()):
            continue
        within = True
        pairs = (w[:, m] * y[m]).sum(1) * (w[:, m] * ~y[m]).sum(1)
        num += np.nan_to_num(_weighted_auc(y[m], s[m], w[:, m])) * pairs
        den += pairs
    if not within:
        return _weighted_auc(y, s, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def per_label_confident_gain(targets: np.ndarray, p_new: np.ndarray, p_ref: np.ndarray,
                             sources: np.ndarray | None = None, n_boot: int = 200, seed: int = 0,
                             quantile: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(gain (L,), lower (L,)): per column, the AUC gain of p_new over p_ref (within source where the
    rows allow, as `selection_auc`) and its `quantile` over a paired bootstrap of the rows.

    `confident_gain` per label: a macro gain can hide one label's loss behind another's gain, so the
    few-shot guard decides label by label. NaN gain where a column's AUC is undefined; lower is -inf
    where no resample defines it (such a label can never count as a confident gain)."""
    targets, p_new = prediction_arrays(targets, p_new)
    p_ref = prediction_arrays(targets, p_ref)[1]
    src = None if sources is None else np.asarray(sources)
    n = len(targets)
    w = np.vstack([np.ones((1, n)), bootstrap_weights(n, n_boot, seed)]) if n else np.ones((1, 0))
    gain, lower = np.full(targets.shape[1], np.nan), np.full(targets.shape[1], -np.inf)
    for j in range(targets.shape[1]):
        y = targets[:, j]
        if n == 0 or y.min() == y.max():
            continue
        d = (_stratified_auc_resampled(y, p_new[:, j], src, w) - _stratified_auc_resampled(y, p_ref[:, j], src, w))
        gain[j] = d[0]
        boots = d[1:][np.isfinite(d[1:])]
        if len(boots):
            lower[j] = float(np.quantile(boots, quantile))
    return gain, lower
