"""Evaluation that cannot be fooled by the source: within-source AUCs and a source probe.

Where each class comes from a different collection (chest4: COVID-QU, Kermany, TBX11K; skin:
SCC only from ISIC9), a one-vs-rest AUC rewards recognising the *collection*. `within_source`
scores each label twice:

- **one-vs-rest**: label vs every other image;
- **within source**: label vs negatives from the *same* `source` value only (COVID-QU COVID vs
  COVID-QU normals, Kermany pneumonia vs Kermany normals, NIH labels within NIH). A (label,
  source) pair needs `min_pos` positives and `min_neg` same-source negatives; labels with none
  (TBX11K holds only TB) are reported as cross-source only.

Every AUC has a patient-bootstrap 95 % interval; all comparisons share the same resamples, so
the macro means get an interval too. `source_probe` fits a logistic regression predicting the
source from image embeddings (grouped 5-fold cross-validation) and the source-only label score
(out-of-fold P(source | image) x the label's frequency in that source): the one-vs-rest AUC that
recognising the source alone would reach. NumPy/scikit-learn only, no torch.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from .metrics import _weighted_auc, bootstrap_weights, evaluation_classes, merge_classes


def _ci(boots: np.ndarray) -> list[float] | None:
    b = boots[np.isfinite(boots)]
    return [round(float(np.percentile(b, 2.5)), 6), round(float(np.percentile(b, 97.5)), 6)] if len(b) >= 20 else None


def _auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    point = _weighted_auc(y, s, np.ones((1, len(y))))[0]
    return float(point), (_weighted_auc(y, s, w) if len(w) else np.zeros(0))


def comparisons(y: np.ndarray, sources: np.ndarray, min_pos: int, min_neg: int) -> list[tuple[str, np.ndarray]]:
    """[(source or "all", row indices)] to score one label on: all rows, then each source of its
    positives that also holds enough negatives."""
    out = [("all", np.arange(len(y)))] if 0 < y.sum() < len(y) else []
    for src in sorted(set(sources[y.astype(bool)])):
        idx = np.flatnonzero(sources == src)
        if y[idx].sum() >= min_pos and (1 - y[idx]).sum() >= min_neg:
            out.append((src, idx))
    return out


def within_source(targets: np.ndarray, probs: np.ndarray, label_set, sources: Sequence[str],
                  groups: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0, min_pos: int = 3,
                  min_neg: int = 10, exclude: Sequence[str] = ()) -> dict:
    """{"labels": {label: {"one_vs_rest", "within": [...], "cross_source_only"}}, "macro": {...}}.

    targets/probs: (N, L) in label order; sources: the `source` column per row; groups: patient
    keys for the bootstrap. Labels in `exclude` (e.g. withheld) stay out of the macro means."""
    sources = np.asarray([s or "(none)" for s in sources], dtype=object)
    classes = evaluation_classes(label_set, targets)
    t, p = merge_classes(classes, targets, probs)
    w = bootstrap_weights(len(t), n_boot, seed, groups) if n_boot else np.zeros((0, len(t)))
    labels, boots = {}, {"one-vs-rest": [], "within": []}
    points = {"one-vs-rest": [], "within": []}
    for j, (name, _) in enumerate(classes):
        y, s = t[:, j].astype(np.int8), p[:, j].astype(np.float64)
        entry = {"one_vs_rest": None, "within": [], "positive_sources": dict(Counter(sources[y == 1]))}
        for src, idx in comparisons(y, sources, min_pos, min_neg):
            auc, b = _auc(y[idx], s[idx], w[:, idx] if len(w) else w)
            row = {"auc": round(auc, 6), "ci95": _ci(b), "n_pos": int(y[idx].sum()), "n_neg": int(len(idx) - y[idx].sum())}
            kind = "one-vs-rest" if src == "all" else "within"
            if kind == "within":
                row["source"] = str(src)
                entry["within"].append(row)
            else:
                entry["one_vs_rest"] = row
            if name not in exclude:
                points[kind].append(auc)
                boots[kind].append(b)
        entry["cross_source_only"] = bool(y.sum()) and not entry["within"]
        labels[name] = entry
    macro = {}
    for kind in ("one-vs-rest", "within"):
        if points[kind]:
            b = np.nanmean(np.stack(boots[kind]), 0) if n_boot else np.zeros(0)
            macro[kind] = {"auc": round(float(np.mean(points[kind])), 6), "ci95": _ci(b), "n_comparisons": len(points[kind])}
    return {"labels": labels, "macro": macro, "min_pos": min_pos, "min_neg": min_neg, "n_boot": n_boot}


def source_probe(embeddings: np.ndarray, sources: Sequence[str], groups: Sequence[str], seed: int = 0,
                 targets: np.ndarray | None = None, label_names: Sequence[str] = ()) -> dict | None:
    """How well a linear probe names the source from the embeddings (grouped 5-fold CV); with
    `targets` (N, L) also the source-only one-vs-rest AUC per label. None with < 2 sources."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(sources, dtype=object).astype(str)
    present = sorted(set(y))
    counts = Counter(y)
    if len(present) < 2:
        return None
    n_splits = max(2, min(5, min(counts.values())))
    oof = np.zeros((len(y), len(present)))
    folds = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(embeddings, y, np.asarray(groups))
    for tr, te in folds:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        clf.fit(embeddings[tr], y[tr])
        proba, known = clf.predict_proba(embeddings[te]), list(clf.classes_)
        oof[te] = np.stack([proba[:, known.index(s)] if s in known else np.zeros(len(te)) for s in present], 1)
    pred = np.array(present)[oof.argmax(1)]
    out = {"sources": dict(counts), "accuracy": round(float((pred == y).mean()), 6),
           "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 6),
           "majority": round(max(counts.values()) / len(y), 6), "folds": n_splits,
           "auc_per_source": {s: _rounded(_weighted_auc((y == s).astype(np.int8), oof[:, k], np.ones((1, len(y))))[0])
                              for k, s in enumerate(present)}}
    if targets is not None:
        out["source_only_label_auc"] = {}
        for j, name in enumerate(label_names):
            t = np.asarray(targets)[:, j].astype(np.int8)
            if 0 < t.sum() < len(t):
                freq = np.array([t[y == s].mean() for s in present])
                out["source_only_label_auc"][name] = _rounded(_weighted_auc(t, oof @ freq, np.ones((1, len(t))))[0])
    return out


def _rounded(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def summary_lines(report: dict) -> list[str]:
    """Short human-readable lines (CLI output)."""
    m = report["macro"]
    lines = [f"macro AUC one-vs-rest {_fmt(m.get('one-vs-rest'))}, within source {_fmt(m.get('within'))}"]
    for name, e in report["labels"].items():
        parts = [f"{w['source']} {w['auc']:.3f} ({w['n_pos']}/{w['n_neg']})" for w in e["within"]]
        ovr = e["one_vs_rest"]
        lines.append(f"  {name}: one-vs-rest {ovr['auc']:.3f}" if ovr else f"  {name}: one-vs-rest -")
        lines[-1] += ("; within " + ", ".join(parts)) if parts else ("; cross-source only" if e["cross_source_only"] else "")
    return lines


def _fmt(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{m['auc']:.3f}" + (f" ({m['ci95'][0]:.3f}-{m['ci95'][1]:.3f})" if m.get("ci95") else "")
