"""Prompt-set experiments (`vlm-xray prompts compare`): rank prompt styles, prompt files and
preprocessing-variant sets on labelled data, per label and overall (AUC, ECE).

Every image is encoded once (all variants, through the on-disk `ImageEmbeddingCache`); each
prompt style then costs only text-encoder work (itself cached) and a matrix product. A prompt file
is a label-set YAML that may carry only prompts (and only for some labels) of an existing set; its
styles are named `<file stem>:<style>`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .evaluate import cache_line, encode_dataset, evaluate_predictions, evaluation_classes
from .fileio import atomic_write_text, read_yaml
from .labels import LabelSet, LabelSetError, PromptPair, parse_label_set
from .prompt_classifier import build_prompt_classifier

logger = logging.getLogger(__name__)


def load_prompt_file(base: LabelSet, path) -> dict[str, dict[str, PromptPair]]:
    """{'<stem>:<style>': {label: PromptPair}} from a prompt file for `base` (label names must exist)."""
    p = Path(path)
    data = read_yaml(p, what="prompt file", error=LabelSetError)
    if not isinstance(data, dict):
        raise LabelSetError(f"{p}: top level must be a mapping with keys name, prompt_styles, labels")
    data = {"name": base.name, "mode": base.mode, **data}
    other = parse_label_set(data, str(p), require_all_styles=False)
    unknown = [n for n in other.names if n not in base.names and base.resolve_name(n) is None]
    if unknown:
        raise LabelSetError(f"{p}: label(s) {', '.join(unknown)} are not in label set {base.name!r} "
                            f"({', '.join(base.names)})")
    out: dict[str, dict[str, PromptPair]] = {}
    for style in other.prompt_styles:
        table = {}
        for lab in other.labels:
            if style in lab.prompts:
                name = lab.name if lab.name in base.names else base.resolve_name(lab.name)[0]
                table[name] = lab.prompts[style]
        if table:
            if not base.multilabel and len(table) < len(base.names):
                missing = [n for n in base.names if n not in table]
                raise LabelSetError(f"{p}: style {style!r} must cover every class of multi-class set {base.name!r} "
                                    f"(missing: {', '.join(missing)})")
            out[f"{p.stem}:{style}"] = table
    if not out:
        raise LabelSetError(f"{p}: no prompts found")
    return out


def style_probabilities(backbone, label_set: LabelSet, table: dict[str, PromptPair], emb: torch.Tensor,
                        text_cache) -> np.ndarray:
    """(N, V, D) image embeddings -> (N, V, L) probabilities for one prompt style (NaN for labels the
    style has no prompts for): the scorer's own prompt classifier, built from this one table."""
    clf = build_prompt_classifier(label_set, {"style": table}, lambda texts: text_cache.embed(backbone, texts),
                                  backbone.logit_scale)
    with torch.no_grad():
        return clf.probabilities(emb)[..., 0, :].double().numpy()


def compare_prompts(backbone, label_set: LabelSet, data, styles: list[str] | None = None,
                    prompt_files: list | None = None, variants: list[str] | None = None,
                    image_cache=None, text_cache=None, batch_size: int = 16, progress: bool = False,
                    ) -> dict:
    """Rank candidates on `data`: each style alone (all variants), the ensemble of all styles
    with each single variant and with the full variant set. Returns a JSON-serialisable dict."""
    from .text_cache import TextEmbeddingCache
    from .variants import resolve_variants

    t0 = time.perf_counter()
    text_cache = text_cache or TextEmbeddingCache()
    variants = resolve_variants(variants)
    tables: dict[str, dict[str, PromptPair]] = {}
    for s in label_set.styles(styles or None):
        tables[s] = {lab.name: lab.prompts[s] for lab in label_set.labels}
    for f in prompt_files or []:
        for name, table in load_prompt_file(label_set, f).items():
            tables[name] = table
    t_img = time.perf_counter()
    emb, ok, failures = encode_dataset(backbone, data.paths, variants, image_cache, batch_size, progress=progress)
    t_img = time.perf_counter() - t_img
    if len(ok) == 0:
        raise ValueError(f"{data.csv_path}: none of the {len(data)} images could be read")
    sub = data.subset(ok)
    line = cache_line(image_cache)
    logger.info(line)
    t_txt = time.perf_counter()
    enc_before = text_cache.encoded
    per_style = {name: style_probabilities(backbone, label_set, table, emb, text_cache)
                 for name, table in tables.items()}  # each (N, V, L)
    t_txt = time.perf_counter() - t_txt
    style_names = list(per_style)
    candidates = [(s, [s], list(range(len(variants)))) for s in style_names]
    if len(style_names) > 1:
        candidates.append(("all styles", style_names, list(range(len(variants)))))
    if len(variants) > 1:
        ens = "all styles" if len(style_names) > 1 else style_names[0]
        for vi, v in enumerate(variants):
            candidates.append((f"{ens} @ {v}", style_names, [vi]))
    rows = []
    for name, st, vidx in candidates:
        stack = np.stack([per_style[s][:, vidx, :] for s in st], axis=1)  # (N, S, v, L)
        with np.errstate(invalid="ignore"), _quiet():
            probs = np.nanmean(stack.reshape(len(stack), -1, stack.shape[-1]), axis=1)
        covered = ~np.isnan(probs).all(0)
        if label_set.multilabel:
            m = evaluate_predictions(sub.targets[:, covered], probs[:, covered],
                                     [n for n, c in zip(label_set.names, covered) if c], 0.5, n_boot=0)
        else:
            m = evaluate_predictions(sub.targets, probs, label_set, 0.5, n_boot=0)
        per_label = {n: {"auc": e["auc"], "ece": e["ece"]} for n, e in m["per_label"].items()}
        rows.append({"candidate": name, "styles": st, "variants": [variants[i] for i in vidx],
                     "mean_auc": m["mean_auc"], "mean_ece": m["mean_ece"],
                     "labels_covered": len(per_label), "per_label": per_label})
    # candidates covering every label first (a partial prompt file's mean is over fewer labels), then AUC
    rows.sort(key=lambda r: (-r["labels_covered"], -(r["mean_auc"] if r["mean_auc"] is not None else -1),
                             r["mean_ece"] or 0))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    # per-label best single style (all variants)
    single = [r for r in rows if len(r["styles"]) == 1 and len(r["variants"]) == len(variants)]
    best = {}
    eval_names = [c for c, _ in evaluation_classes(label_set, sub.targets)]
    for n in eval_names:
        scored = [(r["per_label"].get(n, {}).get("auc"), r["styles"][0]) for r in single]
        scored = [(a, s) for a, s in scored if a is not None]
        if scored:
            a, s = max(scored, key=lambda x: x[0])
            best[n] = {"style": s, "auc": a}
    return {
        "data": str(data.csv_path), "label_set": label_set.name, "mode": label_set.mode,
        "model": backbone.name, "model_fingerprint": backbone.fingerprint,
        "n_images": int(len(ok)), "failed": [f.to_dict() for f in failures],
        "variants": list(variants), "styles": style_names, "labels": eval_names,
        "ranking": rows, "best_per_label": best, "best_overall": rows[0]["candidate"] if rows else None,
        "image_encoder_passes": None if image_cache is None else image_cache.misses,
        "image_cache_hits": None if image_cache is None else image_cache.hits,
        "cache_line": line,
        "texts_encoded": text_cache.encoded - enc_before,
        "seconds": {"images": round(t_img, 3), "text_and_scoring": round(t_txt, 3),
                    "total": round(time.perf_counter() - t0, 3)},
        "_tables": tables,
    }


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def format_table(result: dict, max_label_cols: int = 16) -> str:
    """One table: candidates ranked by mean AUC, with mean ECE and per-label AUC."""
    rows = result["ranking"]
    labels = result["labels"][:max_label_cols]
    w = max([len("candidate")] + [len(r["candidate"]) for r in rows])
    short = [lab[:7] for lab in labels]

    def f(x):
        return "   n/a" if x is None else f"{x:6.3f}"

    n_lab = len(result["labels"])
    head = f"{'#':>2}  {'candidate':<{w}}  {'labels':>6}  {'meanAUC':>7}  {'meanECE':>7}  " + "  ".join(f"{s:>7}" for s in short)
    out = [head, "-" * len(head)]
    for r in rows:
        cov = f"{r['labels_covered']}/{n_lab}"
        out.append(f"{r['rank']:>2}  {r['candidate']:<{w}}  {cov:>6}  {f(r['mean_auc']):>7}  {f(r['mean_ece']):>7}  "
                   + "  ".join(f"{f(r['per_label'].get(lab, {}).get('auc')):>7}" for lab in labels))
    if result["best_per_label"]:
        out.append("best style per label (AUC): " + "; ".join(
            f"{n}: {b['style']} ({b['auc']:.3f})" for n, b in result["best_per_label"].items()))
    return "\n".join(out)


def best_prompt_yaml(label_set: LabelSet, result: dict) -> str:
    """A complete label-set YAML (accepted by `prompts validate`) whose single style `best` holds,
    per label, the prompts of the style with the highest AUC (labels without an AUC keep the first style)."""
    tables = result["_tables"]
    first = result["styles"][0]
    labels = []
    chosen = {}
    for lab in label_set.labels:
        key = lab.name
        style = result["best_per_label"].get(key, {}).get("style")
        if style is None:
            # multiclass merged group classes are keyed by the group name
            for g, members in label_set.groups.items():
                if lab.name in members and g in result["best_per_label"]:
                    style = result["best_per_label"][g]["style"]
        if style is None or lab.name not in tables.get(style, {}):
            style = first if lab.name in tables[first] else next(s for s in tables if lab.name in tables[s])
        chosen[lab.name] = style
        pair = tables[style][lab.name]
        entry = {"name": lab.name, "display": lab.display, "description": lab.description, "category": lab.category,
                 "severity": lab.severity, "aliases": list(lab.aliases),
                 "prompts": {"best": {"positive": list(pair.positive), "negative": list(pair.negative)}}}
        labels.append(entry)
    doc = {
        "name": label_set.name, "display_name": label_set.display_name, "description": label_set.description,
        "modality": label_set.modality, "mode": label_set.mode,
        "normal_labels": list(label_set.normal_labels),
        "prompt_styles": {"best": f"Per-label best prompt style by AUC on {result['data']} "
                                  f"(vlm-xray prompts compare, model {result['model']})"},
        "labels": labels,
    }
    if label_set.groups:
        doc["groups"] = {g: list(m) for g, m in label_set.groups.items()}
    header = "".join(f"#   {n}: {s}\n" for n, s in chosen.items())
    return ("# Written by `vlm-xray prompts compare --write-best`; style chosen per label:\n" + header
            + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=110))


def compare_html(result: dict, out_dir) -> str:
    import plotly.graph_objects as go

    from .html import figure_div, render, write_plotly_asset

    rows = result["ranking"]
    labels = result["labels"]
    z = [[r["per_label"].get(lab, {}).get("auc") for r in rows] for lab in labels]
    heat = go.Figure(go.Heatmap(z=z, x=[r["candidate"] for r in rows], y=labels, colorscale="RdBu", zmid=0.5,
                                text=[[("" if v is None else f"{v:.3f}") for v in row] for row in z],
                                texttemplate="%{text}", colorbar={"title": "AUC"}))
    heat.update_layout(height=max(320, 26 * len(labels) + 160), margin={"t": 30}, yaxis_autorange="reversed")
    bars = go.Figure()
    bars.add_trace(go.Bar(x=[r["candidate"] for r in rows], y=[r["mean_auc"] for r in rows], name="mean AUC"))
    bars.add_trace(go.Bar(x=[r["candidate"] for r in rows], y=[r["mean_ece"] for r in rows], name="mean ECE"))
    bars.update_layout(barmode="group", height=380, margin={"t": 30})
    return render("prompts_compare.html.j2", r=result, labels=labels,
                  figs={"heat": figure_div(heat, "auc_heatmap"), "bars": figure_div(bars, "overall")},
                  plotly_src=write_plotly_asset(out_dir))


def write_compare_outputs(result: dict, out_dir) -> None:
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "compare.json",
                      json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2) + "\n")
    atomic_write_text(out_dir / "index.html", compare_html(result, out_dir))
