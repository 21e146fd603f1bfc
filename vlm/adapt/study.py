"""Few-shot study: held-out macro AUC vs shots per class, per method, over seeds.

Protocol (written into the outputs):
- held-out set: `eval_data`, or when it is absent / the same file, a patient-grouped split of
  `data` (`vlm.data.patient_split`, `eval_fraction` of patients); the training pool never shares
  a patient or file with it;
- per (method, K, seed): K shots per class from the pool (`sample_shots`, seed; with
  `source_matched_shots` plus same-source negatives, `guard.source_matched_sample`), plus a validation
  sample of max(K, val_shots) per class from the rest of the pool (other patients), topped up so that
  each label's positive sources hold as many same-source negatives (`source_matched_sample`), used for
  LoRA early stopping (epoch 0 = zero-shot competes), the baselines' hyper-parameters and the
  per-label never-worse guard (`vlm.adapt.guard`: labels that do not clearly beat zero-shot on it
  are served by their zero-shot score);
- zero-shot (the base model's prompt ensembles) is the 0-shot point of every curve;
- scoring: head outputs averaged over `variants` x styles, exactly as `Scorer` does.

Writes results.csv (one row per run), summary.csv / summary.md (mean +- sd over seeds),
study.json and index.html (plotly, offline).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..data import LabelledData, patient_split, sample_shots
from ..fileio import read_json
from ..images import ImageLoadError, load_image
from ..labels import LabelSet
from ..models import Backbone
from ..prompt_classifier import text_classifier
from ..scoring import ImageEmbeddingCache
from ..transforms import variant_tensors
from . import LORA_METHODS, METHODS
from .core import exclude_groups
from . import guard
from .guard import source_matched_sample
from .heads import PromptHead
from .lora import LoraSettings, encode_tensors, train_lora
from ..metrics import auc_metrics

logger = logging.getLogger(__name__)


@contextmanager
def _quiet_runs():
    """Per-run training chatter (vlm.adapt.lora / baselines at INFO) stays out of the study log."""
    log = logging.getLogger("vlm.adapt")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def _stratified_cap(data: LabelledData, n: int, seed: int = 0) -> LabelledData:
    if n is None or len(data) <= n:
        return data
    rng = np.random.default_rng(seed)
    key = data.targets.argmax(1) if not data.label_set.multilabel else np.zeros(len(data), int)
    keep = []
    for c in np.unique(key):
        idx = np.where(key == c)[0]
        take = max(1, int(round(n * len(idx) / len(data))))
        keep += rng.choice(idx, size=min(take, len(idx)), replace=False).tolist()
    return data.subset(sorted(keep))


def _load_tensors(backbone: Backbone, data: LabelledData, variants: list[str]) -> tuple[torch.Tensor, list[int]]:
    xs, keep = [], []
    for i, p in enumerate(data.paths):
        try:
            xs.append(variant_tensors(load_image(p), variants, backbone.image_size, backbone.mean, backbone.std))
            keep.append(i)
        except ImageLoadError:
            continue
    return torch.stack(xs), keep


def _probs(head, emb: torch.Tensor) -> np.ndarray:
    """emb (N, V, D) -> (N, L): head outputs averaged over variants x styles."""
    with torch.no_grad():
        return head(emb).mean((1, 2)).cpu().numpy()


def run_study(
    backbone: Backbone,
    label_set: LabelSet,
    data: LabelledData,
    eval_data: LabelledData | None = None,
    *,
    shots=(1, 4, 16),
    methods=METHODS,
    seeds: int = 3,
    out_dir: str | Path = "fewshot-study",
    eval_fraction: float = 0.3,
    max_eval: int | None = None,
    variants=("original",),
    val_shots: int = 8,
    settings: LoraSettings | None = None,
    styles=None,
    command: str = "",
    progress: bool = False,
    holdout: str = "split",
    source_matched_shots: bool = False,
) -> dict:
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = list(variants)
    pool, held, split = _holdout(backbone, data, eval_data, eval_fraction, holdout)
    held = _stratified_cap(held, max_eval)
    logger.info(f"training pool {len(pool)} images; held-out {len(held)} images ({split})")
    cache = ImageEmbeddingCache()
    settings = settings or LoraSettings()
    clf = text_classifier(backbone, label_set, styles)
    zs_head = PromptHead.from_classifier(clf).to(backbone.device)

    t0 = time.time()
    ev_x, ev_keep = _load_tensors(backbone, held, variants)
    ev_t = held.targets[ev_keep]
    n_ev, v = ev_x.shape[:2]
    base_emb = encode_tensors(backbone.module, ev_x.flatten(0, 1)).view(n_ev, v, -1)
    logger.info(f"encoded {n_ev} held-out images x {v} variant(s) in {time.time() - t0:.1f} s")

    rows = []
    ev_sources = [held.column("source")[i] for i in ev_keep]

    def metrics_of(probs) -> dict:
        return _row(auc_metrics(ev_t, probs, label_set)) | _within_row(ev_t, probs, label_set, ev_sources)

    zs = metrics_of(_probs(zs_head, base_emb))
    rows.append({"method": "zero-shot", "shots": 0, "seed": "", **zs, "seconds": 0.0, "n_train": 0})
    logger.info(f"zero-shot: macro AUC {zs['macro_auc']:.4f}")
    for k in shots:
        for seed in range(seeds):
            shots_of = source_matched_sample if source_matched_shots else sample_shots
            train = pool.subset(shots_of(pool, k, seed))
            rest = exclude_groups(pool, train)
            # every label's positive sources bring same-source negatives, so selection can score within source
            val = rest.subset(source_matched_sample(rest, max(k, val_shots), seed + 1000))
            feats = {}  # frozen features of this (K, seed) sample, shared by the training-free baselines
            for method in methods:
                t1 = time.time()
                with _quiet_runs():
                    probs, extra = _run_method(method, backbone, label_set, train, val, settings, seed, styles,
                                               cache, feats, ev_x, ev_t, base_emb, progress)
                m = metrics_of(probs)
                secs = time.time() - t1
                rows.append({"method": method, "shots": k, "seed": seed, **m, "seconds": round(secs, 1),
                             "n_train": len(train), "n_val": len(val), **{f"hp_{a}": b for a, b in extra.items()}})
                logger.info(f"{method:<12} K={k:<3} seed {seed}: macro AUC {m['macro_auc']:.4f} "
                    f"({m['macro_auc'] - zs['macro_auc']:+.4f} vs zero-shot), {secs:.1f} s "
                    + " ".join(f"{a}={b}" for a, b in extra.items()))
    summary = summarise(rows, label_set)
    meta = {"model": backbone.name, "model_fingerprint": backbone.fingerprint, "label_set": label_set.name,
            "data": str(data.csv_path), "held_out": split, "n_held_out": int(n_ev), "n_pool": len(pool),
            "variants": variants, "shots": list(shots), "methods": list(methods), "seeds": seeds,
            "val_shots": val_shots, "validation": "source-matched (vlm.adapt.guard.source_matched_sample)",
            "shots_sampling": "source-matched" if source_matched_shots else "k per class",
            "label_guard": {"min_gain": guard.MIN_GAIN, "quantile": guard.QUANTILE, "n_boot": guard.N_BOOT},
            "lora_settings": settings.to_dict(), "command": command,
            "seconds": round(time.time() - t_start, 1)}
    write_outputs(out, rows, summary, meta, label_set)
    logger.info(f"wrote {out / 'summary.md'}, {out / 'results.csv'}, {out / 'index.html'}")
    return {"rows": rows, "summary": summary, "meta": meta}


def _holdout(backbone, data: LabelledData, eval_data, eval_fraction: float, holdout: str):
    """(training pool, held-out set, description) of a study; the pool never shares a patient with it."""
    if holdout == "pretrain-val":
        return pretrain_val_split(backbone, data)
    if eval_data is None:
        tr_idx, ev_idx = patient_split(data.groups, eval_fraction, seed=0)
        return (data.subset(tr_idx), data.subset(ev_idx),
                f"patient-grouped split of {data.csv_path} ({eval_fraction:.0%} of patients held out, seed 0)")
    return (exclude_groups(data, eval_data), eval_data,
            f"{eval_data.csv_path} (training pool: {data.csv_path} minus any shared patient/file)")


def _run_method(method, backbone, label_set, train, val, settings, seed, styles, cache, feats: dict, ev_x, ev_t,
                base_emb, progress) -> tuple[dict, dict]:
    """Train one method on (train, val) and score the held-out images: (probabilities, hyper-parameters)."""
    from .baselines import frozen_features, train_linear_probe, train_tip_adapter

    n_ev, v = ev_x.shape[:2]
    if method in LORA_METHODS:
        st = LoraSettings(**{**settings.to_dict(), "seed": seed, **LORA_METHODS[method]})
        res = train_lora(backbone, label_set, train, val, st, styles, progress=progress)
        emb = base_emb if res.backbone is backbone else \
            encode_tensors(res.backbone.module, ev_x.flatten(0, 1)).view(n_ev, v, -1)
        return (_probs(res.head, emb),
                {"best_epoch": res.info["best_epoch"], "steps": res.info["steps"],
                 "wise_alpha": (res.info.get("wise_ft") or {}).get("alpha"),
                 "lora_update": res.info["label_guard"].get("lora_update"), **_guard_columns(res.info)})
    if not feats:
        feats.update(train=frozen_features(backbone, train, cache), val=frozen_features(backbone, val, cache))
    fn = train_linear_probe if method == "linear-probe" else train_tip_adapter
    head, info = fn(backbone, label_set, train, styles, seed, cache, features=feats["train"], val=val,
                    val_features=feats["val"])
    return (_probs(head.to(backbone.device), base_emb),
            {**{k: info[k] for k in ("lambda", "alpha", "beta") if k in info}, **_guard_columns(info)})


def _guard_columns(info: dict) -> dict:
    """The labels the per-label guard served by zero-shot, for results.csv."""
    guard = info.get("label_guard") or {}
    if not guard.get("applied"):
        return {"zero_shot_labels": "all" if "zero-shot already" in guard.get("why", "") else ""}
    return {"zero_shot_labels": "+".join(n for n, k in guard["keep_zero_shot"].items() if k)}


def pretrain_val_split(backbone: Backbone, data: LabelledData) -> tuple[LabelledData, LabelledData, str]:
    """(pool, held-out, description) where held-out = the rows the base model held out for validation
    when `vlm-xray pretrain` trained it (same seeded hash of `<csv folder>/<patient or filename>`),
    i.e. images it never trained on; read from the model folder's metrics.json."""
    f = Path(backbone.source) / "metrics.json"
    if not f.is_file():
        raise ValueError(f"--holdout pretrain-val needs the base model's metrics.json (from vlm-xray pretrain); "
                         f"{f} not found")
    cfg = read_json(f, what="model metrics file").get("config", {})
    seed, frac = int(cfg.get("seed", 0)), float(cfg.get("val_fraction", 0.15))
    pool, held = patient_split(data.groups, frac, seed)  # groups are "<csv folder>/<patient>", as in pretraining
    if not len(held):
        raise ValueError(f"no rows of {data.csv_path} are in {backbone.name}'s pre-training validation split")
    return data.subset(pool), data.subset(held), (
        f"{backbone.name}'s pre-training validation split of {data.csv_path} (seed {seed}, {frac:.0%} of patients; "
        f"images the model never trained on)")


def _row(m: dict) -> dict:
    return {"macro_auc": m["macro_auc"], **{f"auc:{k}": v for k, v in m["per_label"].items()}}


def _within_row(targets, probs, label_set, sources) -> dict:
    """Within-source macro AUC and per (label, source) AUCs, where the held-out rows name sources."""
    from ..within_source import within_source

    if not any(sources):
        return {}
    r = within_source(targets, probs, label_set, sources, n_boot=0)
    out = {"within_macro_auc": (r["macro"].get("within") or {}).get("auc")}
    for name, e in r["labels"].items():
        out.update({f"within:{name}@{w['source']}": w["auc"] for w in e["within"]})
    return out


def summarise(rows: list[dict], label_set: LabelSet) -> list[dict]:
    """Mean and sd over seeds per (method, shots); zero-shot is repeated as every method's 0 point."""
    cols = [c for c in rows[0] if c in ("macro_auc", "within_macro_auc") or c.startswith(("auc:", "within:"))]
    out = []
    keys = list(dict.fromkeys((r["method"], r["shots"]) for r in rows))
    for method, k in keys:
        rs = [r for r in rows if r["method"] == method and r["shots"] == k]
        entry = {"method": method, "shots": k, "runs": len(rs)}
        for c in cols:
            vals = [r[c] for r in rs if r.get(c) is not None]
            entry[c] = float(np.mean(vals)) if vals else None
            entry[c + ":sd"] = float(np.std(vals)) if len(vals) > 1 else 0.0 if vals else None
        entry["seconds"] = float(np.mean([r["seconds"] for r in rs]))
        out.append(entry)
    return out


def _fmt(x, sd=None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if not sd else f"{x:.3f} ± {sd:.3f}"


def markdown_table(summary: list[dict]) -> str:
    cols = [c for c in summary[0] if c.startswith(("auc:", "within:")) and not c.endswith(":sd")]
    within = "within_macro_auc" in summary[0]
    names = [c[4:] if c.startswith("auc:") else c[7:] + " (within)" for c in cols]
    head = ("| method | shots | runs | macro AUC | " + ("within-source macro AUC | " if within else "")
            + " | ".join(names) + " | s/run |")
    lines = [head, "|" + "---|" * (5 + within + len(cols))]
    for e in summary:
        cells = [e["method"], str(e["shots"]), str(e["runs"]), _fmt(e["macro_auc"], e["macro_auc:sd"])]
        cells += [_fmt(e["within_macro_auc"], e["within_macro_auc:sd"])] if within else []
        cells += [_fmt(e[c]) for c in cols]
        cells.append(f"{e['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return buf.getvalue()


def write_outputs(out: Path, rows, summary, meta, label_set) -> None:
    from ..fileio import atomic_write_text
    from ..html import figure_div, render, write_plotly_asset

    atomic_write_text(out / "results.csv", _csv(rows))
    atomic_write_text(out / "summary.csv", _csv(summary))
    md = markdown_table(summary)
    atomic_write_text(out / "summary.md", f"# Few-shot study: {meta['model']} on {meta['label_set']}\n\n"
                      f"Held-out: {meta['held_out']}, {meta['n_held_out']} images; metric: macro ROC AUC "
                      f"(mean ± sd over {meta['seeds']} seeds).\n\n{md}")
    atomic_write_text(out / "study.json", json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2))
    import plotly.graph_objects as go

    fig = go.Figure()
    zs = next(e for e in summary if e["method"] == "zero-shot")
    for method in [m for m in meta["methods"]]:
        pts = [zs] + sorted((e for e in summary if e["method"] == method), key=lambda e: e["shots"])
        fig.add_trace(go.Scatter(
            x=[e["shots"] for e in pts], y=[e["macro_auc"] for e in pts], mode="lines+markers", name=method,
            error_y={"type": "data", "array": [e["macro_auc:sd"] or 0 for e in pts], "visible": True}))
    fig.add_hline(y=zs["macro_auc"], line_dash="dot", annotation_text="zero-shot")
    fig.update_layout(xaxis={"title": "shots per class (0 = zero-shot)", "type": "category"},
                      yaxis={"title": "held-out macro AUC"}, template="plotly_white", height=480,
                      margin={"l": 60, "r": 20, "t": 30, "b": 50})
    html = render("fewshot.html.j2", meta=meta, summary=summary, plot=figure_div(fig, "fewshot-auc"),
                  plotly_src=write_plotly_asset(out), table_md=md,
                  labels=[c[4:] for c in summary[0] if c.startswith("auc:") and not c.endswith(":sd")])
    atomic_write_text(out / "index.html", html)
