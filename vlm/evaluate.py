"""Evaluation against labelled data: ROC AUC with bootstrap CIs, threshold metrics, calibration error.

The metric primitives (AUC, bootstrap, ECE, threshold metrics) live in `vlm.metrics`; this module
combines them into the evaluation every tool reports (numpy-only, no model needed):

    evaluate_predictions(targets, probs, label_set, thresholds=0.5) -> dict

then the glue that scores a `LabelledData` with a `Scorer` (`score_dataset`) and writes
`metrics.json`, `predictions.csv` and `index.html` (`run_eval`).

Definitions (also written into metrics.json):
- AUC: Mann-Whitney U / (n_pos * n_neg), ties count 1/2; None when a label has no positive or no
  negative rows.
- AUC 95% CI: percentile bootstrap (default 1000 resamples, seed 0). When `groups` (patients) are
  given, whole patients are resampled (cluster bootstrap), so several images of one patient do not
  make the interval too narrow. Resamples in which a label has no positives or negatives are
  skipped for that label.
- Threshold metrics: a finding is called positive when probability >= threshold (as `analyze` does).
- ECE: 10 equal-width probability bins on [0, 1] (the last bin includes 1.0), per label
  sum_b n_b/N * |mean(target in b) - mean(prob in b)|; `mean_ece` averages the labels.
- Multi-class sets: predicted class = argmax; accuracy, macro-F1 (mean of per-class F1 over
  classes present in the targets or predictions), confusion matrix rows = true, columns = predicted.
  Group members that appear together in the data (e.g. skin12's "benign keratosis" = seborrheic
  keratosis + solar lentigo) are merged into one evaluated class whose probability is the sum of the
  members' probabilities.
"""
from __future__ import annotations

import logging
import csv
import io
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

# the metric primitives and label handling live in vlm.metrics (re-exported here: `from vlm.evaluate
# import roc_auc` keeps working)
from .metrics import (  # noqa: F401
    _label_info,
    binary_metrics,
    bootstrap_auc,
    bootstrap_weights,
    evaluation_classes,
    expected_calibration_error,
    merge_classes,
    prediction_arrays,
    reliability_bins,
    roc_auc,
    roc_curve,
)

logger = logging.getLogger(__name__)

ECE_METHOD = "10 equal-width bins on [0,1] per label (last bin includes 1.0), weighted by bin size; mean over labels"


# ----------------------------------------------------------------------------- the evaluation

def _thresholds_for(classes, names, thresholds) -> list[float]:
    if isinstance(thresholds, (int, float)):
        return [float(thresholds)] * len(classes)
    if isinstance(thresholds, dict):
        out = []
        for cname, idx in classes:
            if cname in thresholds:
                out.append(float(thresholds[cname]))
            else:
                out.append(float(np.mean([thresholds[names[i]] for i in idx])))
        return out
    thr = [float(t) for t in thresholds]
    return [float(np.mean([thr[i] for i in idx])) for _, idx in classes]


def _r(x, digits=6):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), digits)


def evaluate_predictions(
    targets: np.ndarray,
    probs: np.ndarray,
    label_set,
    thresholds: float | dict[str, float] | Sequence[float] = 0.5,
    *,
    groups: Sequence | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
    curves: bool = False,
) -> dict:
    """Metrics of predicted probabilities against 0/1 targets.

    targets: (N, L) 0/1 (as `LabelledData.targets`); probs: (N, L) probabilities in label order;
    label_set: a `LabelSet` (its mode decides multi-label vs multi-class) or a list of label names
    (treated as multi-label); thresholds: one float, {label: float}, or a per-label sequence.
    groups: optional patient id per row for a patient-level (cluster) bootstrap.
    curves=True adds ROC points and reliability bins per class (for plots).

    Returns a JSON-serialisable dict: `mean_auc`, `mean_auc_ci`, `mean_ece`, `per_label` {name:
    {auc, auc_ci [lo, hi], n_pos, n_neg, threshold, sensitivity, specificity, precision, f1, tp, fp,
    fn, tn, ece, ...}} and for multi-class sets `multiclass` {accuracy, macro_f1, confusion, ...}.
    Undefined values are None (e.g. AUC of a label without positive rows).
    """
    targets, probs = prediction_arrays(targets, probs)
    names, multilabel, _ = _label_info(label_set)
    if targets.shape[1] != len(names):
        raise ValueError(f"{targets.shape[1]} target columns but {len(names)} labels")
    classes = evaluation_classes(label_set, targets)
    t, p = merge_classes(classes, targets, probs)
    thr = _thresholds_for(classes, names, thresholds)
    boot = bootstrap_auc(t, p, n_boot, seed, groups) if n_boot else np.zeros((0, len(classes)))

    per_label, aucs = {}, []
    for j, (cname, idx) in enumerate(classes):
        y, s = t[:, j], p[:, j]
        auc = roc_auc(y, s)
        col = boot[:, j] if len(boot) else np.array([])
        col = col[~np.isnan(col)]
        ci = [_r(np.percentile(col, 2.5)), _r(np.percentile(col, 97.5))] if auc is not None and len(col) else None
        entry = {"auc": _r(auc), "auc_ci": ci, "n_pos": int(y.sum()), "n_neg": int(len(y) - y.sum()),
                 "prevalence": _r(y.mean()) if len(y) else None, "mean_prob": _r(s.mean()) if len(s) else None}
        bm = binary_metrics(y, s, thr[j])
        entry.update({k: _r(v) if isinstance(v, float) else v for k, v in bm.items()})
        entry["ece"] = _r(expected_calibration_error(y, s, n_bins))
        if len(idx) > 1:
            entry["members"] = [names[i] for i in idx]
        if curves:
            fpr, tpr, th = roc_curve(y, s)
            keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 300)).round().astype(int))
            entry["roc"] = {"fpr": [_r(x, 4) for x in fpr[keep]], "tpr": [_r(x, 4) for x in tpr[keep]]}
            entry["reliability"] = reliability_bins(y, s, n_bins)
        per_label[cname] = entry
        if auc is not None:
            aucs.append(j)

    mean_auc = float(np.mean([per_label[classes[j][0]]["auc"] for j in aucs])) if aucs else None
    mean_ci = None
    if aucs and len(boot):
        sel = boot[:, aucs]
        ok_rows = ~np.isnan(sel).all(1)
        m = np.nanmean(sel[ok_rows], axis=1) if ok_rows.any() else np.array([])
        if len(m):
            mean_ci = [_r(np.percentile(m, 2.5)), _r(np.percentile(m, 97.5))]
    eces = [e["ece"] for e in per_label.values() if e["ece"] is not None]
    out = {
        "mode": "multilabel" if multilabel else "multiclass",
        "n_images": int(len(t)),
        "mean_auc": _r(mean_auc),
        "mean_auc_ci": mean_ci,
        "n_labels_with_auc": len(aucs),
        "mean_ece": _r(np.mean(eces)) if eces else None,
        "ece_method": ECE_METHOD if n_bins == 10 else ECE_METHOD.replace("10", str(n_bins), 1),
        "thresholds": {c: thr[j] for j, (c, _) in enumerate(classes)},
        "bootstrap": {"resamples": int(n_boot), "seed": int(seed), "ci": 0.95, "method": "percentile",
                      "unit": "patient" if groups is not None and len(set(groups)) < len(t) else "image"},
        "per_label": per_label,
        "reliability_pooled": reliability_bins(t.ravel(), p.ravel(), n_bins) if curves else None,
    }
    if out["reliability_pooled"] is None:
        del out["reliability_pooled"]
    if not multilabel:
        out["multiclass"] = multiclass_metrics(t, p, [c for c, _ in classes], n_bins)
    return out


def multiclass_metrics(t: np.ndarray, p: np.ndarray, classes: list[str], n_bins: int = 10) -> dict:
    """Argmax metrics for one-hot targets `t` (N, C) and class probabilities `p` (N, C)."""
    true = t.argmax(1)
    pred = p.argmax(1)
    c = len(classes)
    conf = np.zeros((c, c), dtype=int)
    np.add.at(conf, (true, pred), 1)
    f1s = []
    per_class = {}
    for k in range(c):
        tp = conf[k, k]
        fp = conf[:, k].sum() - tp
        fn = conf[k, :].sum() - tp
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
        per_class[classes[k]] = {"recall": _r(tp / (tp + fn)) if tp + fn else None,
                                 "precision": _r(tp / (tp + fp)) if tp + fp else None, "f1": _r(f1)}
        if f1 is not None:
            f1s.append(f1)
    conf_top = p.max(1)
    return {
        "accuracy": _r((true == pred).mean()) if len(true) else None,
        "macro_f1": _r(np.mean(f1s)) if f1s else None,
        "classes": classes,
        "confusion": conf.tolist(),
        "confusion_axes": "rows = true class, columns = predicted class (argmax)",
        "per_class": per_class,
        "top_label_ece": _r(expected_calibration_error(true == pred, conf_top, n_bins)),
    }


# ----------------------------------------------------------------------------- scoring a dataset

def encode_dataset(backbone, paths: Sequence[str], variants: list[str], cache=None, batch_size: int = 16,
                   num_workers: int | None = None, progress: bool = False):
    """Encode every image once: (embeddings (N_ok, V, D) float32 tensor, ok indices, failures).

    With an `ImageEmbeddingCache` (the default for eval / prompts compare / calibrate) embeddings
    are read from disk when this model has seen the file content and variant before."""
    import torch

    from .results import ImageFailure
    from .scoring import encode_images

    embs, ok, failures = [], [], []
    for i, enc in enumerate(encode_images(backbone, paths, variants, batch_size, num_workers, cache, progress)):
        if isinstance(enc, ImageFailure):
            failures.append(enc)
        else:
            embs.append(enc.embeddings.float())
            ok.append(i)
    emb = torch.stack(embs) if embs else torch.zeros((0, len(variants), 1))
    return emb, np.array(ok, dtype=int), failures


def scorer_probabilities(scorer, emb, chunk: int = 256) -> np.ndarray:
    """(N, V, D) embeddings -> (N, V, S, L) probabilities through the scorer (adapter head,
    calibration or prompt classifier, exactly as `analyze` does)."""
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(emb), chunk):
            outs.append(scorer.probabilities(emb[i : i + chunk].to(scorer.backbone.device)).float().cpu())
    if not outs:
        return np.zeros((0, len(scorer.variants), len(scorer.styles), len(scorer.label_set.labels)))
    return torch.cat(outs).numpy()


def image_probabilities(scorer, emb, n_labels: int) -> np.ndarray:
    """(N, V, D) embeddings -> (N, L) mean probability over variants x styles."""
    p = scorer_probabilities(scorer, emb)
    return p.reshape(len(p), -1, p.shape[-1]).mean(1) if len(p) else p.reshape(0, n_labels)


def score_dataset(scorer, data, progress: bool = False):
    """Mean probability over variants x styles per image: (probs (N_ok, L), ok indices, failures)."""
    emb, ok, failures = encode_dataset(scorer.backbone, data.paths, scorer.variants, scorer.image_cache,
                                       scorer.batch_size, scorer.num_workers, progress)
    return image_probabilities(scorer, emb, len(data.label_set.labels)), ok, failures


def cache_line(cache) -> str:
    if cache is None:
        return "image encoder passes: all images (no image-embedding cache)"
    return f"image encoder passes: {cache.misses} (cached: {cache.hits})"


def run_eval(scorer, data, out_dir, threshold: float | None = None, *, n_boot: int = 1000, seed: int = 0,
             progress: bool = True, html: bool = True, extra: dict | None = None, within_source: bool = False) -> dict:
    """Score `data` with `scorer`, evaluate, and write DIR/metrics.json, predictions.csv, index.html.

    threshold None: the calibration's per-label thresholds when the scorer has one, else 0.5.
    within_source: add `within_source` (each label against same-source negatives only) and
    `source_probe` (`vlm.within_source`); needs a `source` column."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    emb, ok, failures = encode_dataset(scorer.backbone, data.paths, scorer.variants, scorer.image_cache,
                                       scorer.batch_size, scorer.num_workers, progress)
    probs = image_probabilities(scorer, emb, len(data.label_set.labels))
    if len(ok) == 0:
        raise ValueError(f"{data.csv_path}: none of the {len(data)} images could be read")
    thresholds = scorer.thresholds(threshold)
    thr_source = (f"--threshold {threshold}" if threshold is not None else
                  f"per-label thresholds from calibration {scorer.calibration.source}" if isinstance(thresholds, dict)
                  else f"default {thresholds}")
    sub = data.subset(ok)
    has_patients = any((r.get("patient") or "").strip() for r in sub.rows) if sub.rows else False
    metrics = evaluate_predictions(sub.targets, probs, data.label_set, thresholds,
                                   groups=sub.groups if has_patients else None, n_boot=n_boot, seed=seed,
                                   curves=True)
    cache = scorer.image_cache
    meta = {
        "data": str(data.csv_path),
        "label_set": data.label_set.name,
        "model": scorer.backbone.name,
        "model_fingerprint": scorer.backbone.fingerprint,
        "adapter": getattr(scorer, "adapter_name", None),
        "calibration": getattr(scorer.calibration, "source", None),
        "variants": list(scorer.variants),
        "prompt_styles": list(scorer.styles),
        "threshold_source": thr_source,
        "n_listed": len(data),
        "failed": [f.to_dict() for f in failures],
        "image_encoder_passes": None if cache is None else cache.misses,
        "image_cache_hits": None if cache is None else cache.hits,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    meta.update(extra or {})
    if within_source:
        meta.update(source_report(sub, probs, emb, n_boot, seed))
    metrics = {**meta, **metrics}
    logger.info(cache_line(cache))
    write_outputs(metrics, sub, probs, out_dir, html=html)
    return metrics


def source_report(data, probs: np.ndarray, emb, n_boot: int, seed: int) -> dict:
    """{"within_source": ..., "source_probe": ...} of scored rows (`vlm.within_source`)."""
    from .within_source import source_probe, within_source

    sources = data.column("source")
    if not any(sources):
        raise ValueError(f"{data.csv_path}: --within-source needs a 'source' column")
    e = emb.mean(1) if emb.ndim == 3 else emb
    e = e.numpy() if hasattr(e, "numpy") else np.asarray(e)
    return {"within_source": within_source(data.targets, probs, data.label_set, sources, data.groups, n_boot, seed),
            "source_probe": source_probe(e, sources, data.groups, seed, data.targets, data.label_set.names)}


def predictions_csv(data, probs: np.ndarray, thresholds: dict[str, float] | float) -> str:
    names = data.label_set.names
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "group", "true_labels", "predicted_labels", *names])
    for i, path in enumerate(data.paths):
        true = [n for j, n in enumerate(names) if data.targets[i, j]]
        thr = [thresholds.get(n, 0.5) if isinstance(thresholds, dict) else thresholds for n in names]
        pred = [n for j, n in enumerate(names) if probs[i, j] >= thr[j]]
        w.writerow([path, data.groups[i], "|".join(true), "|".join(pred), *[f"{x:.6f}" for x in probs[i]]])
    return buf.getvalue()


def _label_thresholds(metrics: dict, names: list[str]) -> dict[str, float]:
    thr = dict(metrics["thresholds"])
    for cname, e in metrics["per_label"].items():
        for m in e.get("members", []):
            thr.setdefault(m, thr[cname])
    return {n: thr.get(n, 0.5) for n in names}


def write_outputs(metrics: dict, data, probs: np.ndarray, out_dir: Path, html: bool = True) -> None:
    from .fileio import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_free = {**metrics, "per_label": {k: {kk: vv for kk, vv in v.items() if kk not in ("roc", "reliability")}
                                          for k, v in metrics["per_label"].items()}}
    plot_free.pop("reliability_pooled", None)
    atomic_write_json(out_dir / "metrics.json", plot_free, indent=2)
    atomic_write_text(out_dir / "predictions.csv",
                      predictions_csv(data, probs, _label_thresholds(metrics, data.label_set.names)))
    if html:
        atomic_write_text(out_dir / "index.html", eval_html(metrics, out_dir))


def eval_html(metrics: dict, out_dir: Path) -> str:
    import plotly.graph_objects as go

    from .html import figure_div, render, write_plotly_asset

    per = metrics["per_label"]
    roc = go.Figure()
    roc.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dash", "color": "#999"},
                             name="chance", hoverinfo="skip"))
    for name, e in per.items():
        if e["auc"] is None:
            continue
        roc.add_trace(go.Scatter(x=e["roc"]["fpr"], y=e["roc"]["tpr"], mode="lines",
                                 name=f"{name} ({e['auc']:.3f})"))
    roc.update_layout(xaxis_title="1 - specificity (false-positive rate)", yaxis_title="sensitivity",
                      height=520, margin={"t": 30}, legend={"font": {"size": 10}})
    rel = go.Figure()
    rel.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dash", "color": "#999"},
                             name="perfect calibration", hoverinfo="skip"))
    pooled = metrics.get("reliability_pooled") or []
    rel.add_trace(go.Scatter(x=[b["mean_prob"] for b in pooled if b["n"]],
                             y=[b["frac_pos"] for b in pooled if b["n"]], mode="lines+markers",
                             text=[f"n={b['n']}" for b in pooled if b["n"]], name="all labels pooled",
                             line={"width": 3}))
    for name, e in per.items():
        bins = [b for b in e["reliability"] if b["n"]]
        rel.add_trace(go.Scatter(x=[b["mean_prob"] for b in bins], y=[b["frac_pos"] for b in bins],
                                 mode="lines+markers", text=[f"n={b['n']}" for b in bins], name=name,
                                 visible="legendonly"))
    rel.update_layout(xaxis_title="mean predicted probability (bin)", yaxis_title="observed fraction positive",
                      xaxis_range=[0, 1], yaxis_range=[0, 1], height=520, margin={"t": 30},
                      legend={"font": {"size": 10}})
    figs = {"roc": figure_div(roc, "roc"), "reliability": figure_div(rel, "reliability")}
    mc = metrics.get("multiclass")
    if mc:
        conf = go.Figure(go.Heatmap(z=mc["confusion"], x=mc["classes"], y=mc["classes"], colorscale="Blues",
                                    text=mc["confusion"], texttemplate="%{text}", showscale=False))
        conf.update_layout(xaxis_title="predicted (argmax)", yaxis_title="true", yaxis_autorange="reversed",
                           height=480, margin={"t": 30})
        figs["confusion"] = figure_div(conf, "confusion")
    else:
        names = list(per)
        z = [[per[n]["tp"], per[n]["fn"], per[n]["fp"], per[n]["tn"]] for n in names]
        conf = go.Figure(go.Heatmap(z=[[r[0] / max(1, r[0] + r[1]), r[1] / max(1, r[0] + r[1]),
                                        r[2] / max(1, r[2] + r[3]), r[3] / max(1, r[2] + r[3])] for r in z],
                                    x=["TP", "FN", "FP", "TN"], y=names, text=z, texttemplate="%{text}",
                                    colorscale="Blues", showscale=False))
        conf.update_layout(title="per-label confusion counts at the threshold in use (colour: row rate)",
                           yaxis_autorange="reversed", height=max(300, 28 * len(names) + 120), margin={"t": 50})
        figs["confusion"] = figure_div(conf, "confusion")
    return render("eval.html.j2", m=metrics, figs=figs, plotly_src=write_plotly_asset(out_dir))


# ----------------------------------------------------------------------------- choosing the rows

def select_data(csv_path, label_set, mapping: str | None = None, split: str | None = None,
                where: Sequence[str] = (), group_split: str | None = None, seed: int = 0):
    """Load a labelled CSV and keep a subset: `split` (the CSV's split column), `where` filters
    ("column=value[,value...]", all must hold) and `group_split` "FRACTION:SIDE" (SIDE train|val: one
    side of the patient split `vlm.data.patient_split` with `seed`). Returns (data, description)."""
    from .data import DataError, load_labelled_csv, load_mapping

    data = load_labelled_csv(csv_path, label_set, load_mapping(mapping), split=split)
    desc = [f"split={split}"] if split else []
    for cond in where or ():
        if "=" not in cond:
            raise DataError(f"--where {cond!r}: expected COLUMN=VALUE[,VALUE...]")
        col, vals = cond.split("=", 1)
        allowed = set(v.strip() for v in vals.split(","))
        if data.rows and col not in data.rows[0]:
            raise DataError(f"--where {cond!r}: no column {col!r} in {data.csv_path} "
                            f"(columns: {', '.join(data.rows[0])})")
        keep = [i for i, r in enumerate(data.rows) if (r.get(col) or "").strip() in allowed]
        if not keep:
            raise DataError(f"--where {cond!r}: no rows left")
        data = data.subset(keep)
        desc.append(f"{col} in {sorted(allowed)}")
    if group_split:
        try:
            frac_s, side = group_split.split(":")
            frac = float(frac_s)
            assert 0 < frac < 1 and side in ("train", "val")
        except (ValueError, AssertionError):
            raise DataError(f"--group-split {group_split!r}: expected FRACTION:SIDE, e.g. 0.5:train or 0.5:val")
        train, val = data.split(frac, seed)
        data = train if side == "train" else val
        if len(data) == 0:
            raise DataError(f"--group-split {group_split}: no rows on that side")
        desc.append(f"patient-grouped split {group_split} (seed {seed})")
    return data, "; ".join(desc) or "all rows"
