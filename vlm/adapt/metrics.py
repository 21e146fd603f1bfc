"""Per-label and macro ROC AUC for adapters and the few-shot study.

Uses `vlm.evaluate.evaluate_predictions` (the definitions `vlm-xray eval` reports, including the
merging of group members in multi-class sets) when it is installed, else sklearn per label.
"""
from __future__ import annotations

import numpy as np


def auc_metrics(targets: np.ndarray, probs: np.ndarray, label_set) -> dict:
    """{"macro_auc": float | None, "per_label": {name: auc | None}, "n": int} for (N, L) arrays."""
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    try:
        from ..evaluate import evaluate_predictions
    except ImportError:
        evaluate_predictions = None
    if evaluate_predictions is not None:
        m = evaluate_predictions(targets, probs, label_set, 0.5, n_boot=0)
        per = {k: v["auc"] for k, v in m["per_label"].items()}
        return {"macro_auc": m["mean_auc"], "per_label": per, "n": int(len(targets))}
    from sklearn.metrics import roc_auc_score

    per: dict[str, float | None] = {}
    for j, n in enumerate(label_set.names):
        y = targets[:, j]
        per[n] = float(roc_auc_score(y, probs[:, j])) if 0 < y.sum() < len(y) else None
    vals = [v for v in per.values() if v is not None]
    return {"macro_auc": float(np.mean(vals)) if vals else None, "per_label": per, "n": int(len(targets))}


def confident_gain(targets: np.ndarray, p_new: np.ndarray, p_ref: np.ndarray, label_set, n_boot: int = 200,
                   seed: int = 0, quantile: float = 0.1) -> tuple[float, float]:
    """(macro-AUC gain of p_new over p_ref, its `quantile` over a paired bootstrap of the rows).

    Few-shot selection data are small: a candidate should replace zero-shot only when its gain
    holds up under resampling (lower quantile > 0), not when it wins by noise."""
    targets = np.asarray(targets)
    gain = _macro(targets, p_new, label_set) - _macro(targets, p_ref, label_set)
    rng = np.random.default_rng(seed)
    n = len(targets)
    gains = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        a, b = _macro(targets[idx], p_new[idx], label_set), _macro(targets[idx], p_ref[idx], label_set)
        if a is not None and b is not None:
            gains.append(a - b)
    lower = float(np.quantile(gains, quantile)) if gains else float("-inf")
    return float(gain), lower


def _macro(t, p, label_set):
    from sklearn.metrics import roc_auc_score

    vals = []
    for j in range(t.shape[1]):
        y = t[:, j]
        if 0 < y.sum() < len(y):
            vals.append(roc_auc_score(y, p[:, j]))
    return float(np.mean(vals)) if vals else None
