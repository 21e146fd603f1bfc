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
