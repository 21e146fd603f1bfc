"""Structured reports for one scored image: HTML (with offline plotly charts) and Markdown.

    from vlm.report import model_info, render_report
    html = render_report(result, model_info(scorer.backbone), clinical="65M, cough", fmt="html")

The report is built from an `ImageResult` only (plus what we know about the model), so a
result loaded back from its JSON renders the same report. All text reaches the page through
autoescaped Jinja templates (`templates/report.html.j2`, `templates/report.md.j2`); chart
divs are plain plotly.js specs written as HTML-safe JSON (`vlm.html.figure_div`). No network:
plotly.js is inlined once per page unless `plotly_src` names a local copy (batch folders share
`assets/plotly.min.js`).
"""
from __future__ import annotations

import base64
import logging
import re
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from markupsafe import Markup, escape

from .fileio import FileFormatError, read_json
from .html import environment, figure_div, plotly_js, render, safe_json  # noqa: F401 (safe_json re-exported)
from .results import Finding, ImageResult

logger = logging.getLogger(__name__)

DISCLAIMER = ("Research software: automated zero-/few-shot image-text similarity scores, not a radiologist's "
              "reading. They must not be used for clinical decisions.")
SEVERITY_WORDS = {3: "high priority", 2: "moderate priority", 1: "low priority"}
# below this fraction of variant x style scores agreeing with the call, we say the variants disagree
AGREEMENT_OK = 0.75


# ----------------------------------------------------------------------------- safe text helpers

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]#|~])")


def md_escape(value) -> Markup:
    """Escape text for Markdown: HTML-escape (so raw markup never renders) and backslash-escape
    Markdown syntax characters; newlines become spaces (safe in table cells and list items)."""
    text = re.sub(r"[\r\n\t]+", " ", "" if value is None else str(value))
    text = _MD_SPECIAL.sub(r"\\\1", text)  # Markdown syntax first, then entities (no '#' inside them)
    return Markup(text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))


def md_quote(value) -> Markup:
    """Multi-line text as a Markdown blockquote, each line escaped."""
    lines = str(value or "").splitlines() or [""]
    return Markup("\n").join(Markup("> ") + md_escape(line) for line in lines)


def _register_filters() -> None:
    env = environment()
    env.filters.setdefault("md", md_escape)
    env.filters.setdefault("mdquote", md_quote)


# ----------------------------------------------------------------------------- model description

def _card_lines(card: str | None, n: int = 4) -> list[str]:
    """The first `n` meaningful lines of a model card, Markdown decoration removed."""
    out = []
    for line in (card or "").splitlines():
        line = line.strip()
        if not line or line.startswith(("|", "```", "<!--")):
            continue
        line = re.sub(r"^#+\s*|^[-*]\s+", "", line).replace("**", "").replace("`", "")
        if line:
            out.append(line[:300])
        if len(out) >= n:
            break
    return out


def _card_performance(card: str | None) -> list[str]:
    lines = []
    for line in (card or "").splitlines():
        if (re.search(r"\b(AUC|AUROC|accuracy|F1|sensitivity|specificity)\b", line, re.I)
                and re.search(r"\d\.\d\d|\d%", line) and not line.startswith("|")):
            lines.append(re.sub(r"^#+\s*|^[-*]\s+", "", line.strip()).replace("**", "").replace("`", "")[:300])
        if len(lines) >= 3:
            break
    return lines


def _load_metrics(source: str | None) -> dict | None:
    if not source:
        return None
    p = Path(str(source))
    f = p / "metrics.json" if p.is_dir() else None
    if f is None or not f.is_file():
        return None
    try:
        data = read_json(f, what="model metrics file")
    except FileFormatError as e:
        # the report still renders (without measured numbers), but says why they are missing
        logger.warning("model metrics not shown in the report: %s", e)
        return None
    if not isinstance(data, dict):
        logger.warning("model metrics not shown in the report: %s is not a JSON object", f)
        return None
    keep = {}
    if isinstance(data.get("val"), dict):
        keep["val"] = data["val"]
    if "mean_auc" in data:
        keep["mean_auc"] = data["mean_auc"]
    per = data.get("per_label") or data.get("labels")
    if not isinstance(per, dict):
        per = {k: v for k, v in data.items() if isinstance(v, dict) and "auc" in v and k != "val"}
    if per:
        keep["per_label"] = per
    for k in ("n", "n_images", "dataset", "data_csv"):
        if isinstance(data.get(k), (str, int, float)):
            keep[k] = data[k]
    return keep or None


def model_info(backbone) -> dict:
    """What a report says about the model: name, layout, source, card excerpt, measured metrics."""
    return {
        "name": getattr(backbone, "name", "") or "",
        "layout": getattr(backbone, "layout", "") or "",
        "source": getattr(backbone, "source", "") or "",
        "fingerprint": getattr(backbone, "fingerprint", "") or "",
        "card_lines": _card_lines(getattr(backbone, "card", None)),
        "card_performance": _card_performance(getattr(backbone, "card", None)),
        "metrics": _load_metrics(getattr(backbone, "source", None)),
    }


def _performance(model: dict, label_set: str) -> dict:
    """Measured performance for this label set: summary lines + per-label AUC (may be empty)."""
    m = model.get("metrics") or {}
    lines, per_label = [], {}
    val = (m.get("val") or {}).get(label_set) if isinstance(m.get("val"), dict) else None
    if isinstance(val, dict):
        if isinstance(val.get("mean_auc"), (int, float)):
            lines.append(f"Validation mean AUC {val['mean_auc']:.3f} on {label_set}"
                         + (f" (n={val['n']} images)" if isinstance(val.get("n"), int) else "")
                         + " (from the model folder's metrics.json).")
        if isinstance(val.get("auc"), dict):
            per_label = {k: float(v) for k, v in val["auc"].items() if isinstance(v, (int, float))}
    elif isinstance(m.get("mean_auc"), (int, float)):
        lines.append(f"Mean AUC {m['mean_auc']:.3f} (from the model folder's metrics.json).")
        for k, v in (m.get("per_label") or {}).items():
            auc = v.get("auc") if isinstance(v, dict) else v
            if isinstance(auc, (int, float)):
                per_label[k] = float(auc)
    if not lines:
        lines = [f"Model card: {line}" for line in model.get("card_performance") or []]
    return {"lines": lines, "per_label": per_label}


# ----------------------------------------------------------------------------- confidence

def finding_scores(result: ImageResult, label: str) -> list[float]:
    """The variant x style probabilities behind one finding's mean."""
    return [float(styles[s][label]) for v, styles in result.per_variant.items() for s in styles
            if label in styles[s]]


def assess(result: ImageResult) -> dict:
    """Per-finding agreement across variants x styles and an overall plain-words statement."""
    rows = []
    for f in result.findings:
        scores = finding_scores(result, f.label)
        n = len(scores)
        same = sum((p >= f.threshold) == f.positive for p in scores)
        agreement = same / n if n else 1.0
        margin = abs(f.probability - f.threshold)
        if n <= 1:
            level = "single score"
        elif agreement < AGREEMENT_OK:
            level = "variants disagree"
        elif margin < max(f.uncertainty, 0.02):
            level = "borderline"
        elif agreement < 1.0:
            level = "mostly consistent"
        else:
            level = "consistent"
        rows.append({"finding": f, "n": n, "agreement": agreement, "margin": margin, "level": level})
    n_scores = max((r["n"] for r in rows), default=0)
    disagree = [r for r in rows if r["level"] == "variants disagree"]
    borderline = [r for r in rows if r["level"] == "borderline"]
    names = lambda rs: ", ".join((r["finding"].display or r["finding"].label) for r in rs)  # noqa: E731
    if n_scores <= 1:
        statement = ("Only one preprocessing variant and one prompt style were used, so agreement between "
                     "variants cannot be assessed; use several variants for an uncertainty estimate.")
        reliability = "unknown"
    elif disagree:
        worst = min(r["agreement"] for r in disagree)
        statement = (f"Less reliable: the preprocessing variants and prompt styles disagree on {names(disagree)} "
                     f"(as few as {worst:.0%} of the {n_scores} scores agree with the call). Small changes in "
                     "contrast, flipping or wording change the answer for these findings; treat them as "
                     "uncertain and review the image directly.")
        reliability = "low"
    elif borderline:
        statement = (f"Mostly stable, but {names(borderline)} lie within one standard deviation of the threshold; "
                     "these calls could flip with a slightly different threshold or preprocessing.")
        reliability = "moderate"
    else:
        statement = (f"Stable: for every finding at least {AGREEMENT_OK:.0%} of the {n_scores} variant x style scores "
                     "fall on the same side of the threshold as the mean. Stability is not accuracy: a consistent "
                     "score can still be wrong.")
        reliability = "high"
    return {"rows": rows, "by_label": {r["finding"].label: r for r in rows}, "n_scores": n_scores,
            "statement": statement, "reliability": reliability,
            "min_agreement": min((r["agreement"] for r in rows), default=1.0)}


# ----------------------------------------------------------------------------- charts

def _name(f: Finding) -> str:
    return f.display or f.label


def _threshold_line(axis: str, value: float, text: str) -> tuple[dict, dict]:
    """A dashed threshold line across the plot (plotly's add_vline/add_hline, as plain layout items)."""
    other = "y" if axis == "x" else "x"
    shape = {"type": "line", "xref": axis if axis == "x" else "x domain", "yref": axis if axis == "y" else "y domain",
             f"{axis}0": value, f"{axis}1": value, f"{other}0": 0, f"{other}1": 1,
             "line": {"dash": "dash", "color": "#1d2939"}}
    note = {"text": text, "showarrow": False, axis: value, other: 1, "xref": shape["xref"], "yref": shape["yref"],
            "yanchor": "bottom", "xanchor": "right" if axis == "y" else "center"}
    return shape, note


def chart_layout(title: str, height: int, threshold_axis: str | None = None, threshold: float | None = None,
                 label: str = "threshold", **extra) -> dict:
    layout = {"title": {"text": title}, "height": height, "showlegend": False,
              "margin": {"l": 10, "r": 20, "t": 60, "b": 40}, **extra}
    if threshold_axis and threshold is not None:
        shape, note = _threshold_line(threshold_axis, threshold, f"{label} {threshold:.2f}")
        layout.update(shapes=[shape], annotations=[note])
    return layout


def probability_figure(result: ImageResult) -> dict:
    """Horizontal bars of each finding's probability (±1 SD error bars) with its threshold tick."""
    fs = sorted(result.findings, key=lambda f: f.probability)
    names = [_name(f) for f in fs]
    bars = {"type": "bar", "x": [f.probability for f in fs], "y": names, "orientation": "h", "name": "probability",
            "marker": {"color": ["#b42318" if f.positive else "#98a2b3" for f in fs]},
            "error_x": {"type": "data", "array": [f.uncertainty for f in fs], "visible": True, "color": "#344054"},
            "hovertemplate": "%{y}: %{x:.3f}<extra></extra>"}
    ticks = {"type": "scatter", "x": [f.threshold for f in fs], "y": names, "mode": "markers", "name": "threshold",
             "marker": {"symbol": "line-ns-open", "size": 18, "color": "#1d2939", "line": {"width": 2}},
             "hovertemplate": "threshold %{x:.2f}<extra></extra>"}
    layout = chart_layout("Probability per finding (error bars: ±1 SD across variants × prompt styles)",
                          140 + 26 * len(fs), "x", result.threshold,
                          xaxis={"range": [0, 1], "title": {"text": "probability"}}, yaxis={"automargin": True})
    return {"data": [bars, ticks], "layout": layout}


def variant_heatmap(result: ImageResult) -> dict:
    """Finding x variant grid of probabilities (mean over prompt styles)."""
    variants = list(result.per_variant)
    z = []
    for f in result.findings:
        row = []
        for v in variants:
            vals = [float(p[f.label]) for p in result.per_variant[v].values() if f.label in p]
            row.append(sum(vals) / len(vals) if vals else None)
        z.append(row)
    heat = {"type": "heatmap", "z": z, "x": variants, "y": [_name(f) for f in result.findings], "zmin": 0, "zmax": 1,
            "colorscale": "Blues", "texttemplate": "%{z:.2f}", "hovertemplate": "%{y} / %{x}: %{z:.3f}<extra></extra>",
            "colorbar": {"title": {"text": "prob."}}}
    layout = chart_layout("Probability by preprocessing variant (mean over prompt styles)",
                          140 + 26 * len(result.findings),
                          yaxis={"autorange": "reversed", "automargin": True}, xaxis={"automargin": True})
    return {"data": [heat], "layout": layout}


def top_findings_figure(result: ImageResult, k: int = 5) -> dict:
    """Box + points of the variant x style scores behind the top findings."""
    top = (result.positives or sorted(result.findings, key=lambda f: -f.probability))[:k]
    boxes = [{"type": "box", "y": finding_scores(result, f.label), "name": _name(f), "boxpoints": "all", "jitter": 0.4,
              "pointpos": 0, "marker": {"color": "#b42318" if f.positive else "#475467"},
              "hovertemplate": "%{y:.3f}<extra></extra>"} for f in top]
    title = (("Positive findings" if result.positives else "Highest-scoring findings")
             + ": spread of the variant × style scores")
    layout = chart_layout(title, 360, "y", result.threshold, xaxis={"automargin": True},
                          yaxis={"range": [0, 1], "title": {"text": "probability"}, "automargin": True})
    return {"data": boxes, "layout": layout}


def chart_specs(result: ImageResult) -> dict[str, dict]:
    """The report's charts as plotly.js specs {data, layout}: probability bars, variant heatmap, top findings
    (the HTML report draws them; the API returns them under `charts`)."""
    return {"probabilities": probability_figure(result), "variants": variant_heatmap(result),
            "top": top_findings_figure(result)}


def chart_divs(result: ImageResult, prefix: str = "chart") -> dict[str, Markup]:
    """`chart_specs` as plotly divs (no plotly.js) for the report."""
    return {name: Markup(figure_div(spec, f"{prefix}-{name}")) for name, spec in chart_specs(result).items()}


# ----------------------------------------------------------------------------- context + render

@lru_cache(maxsize=16)
def _label_set_info(name: str) -> tuple[str, dict]:
    try:
        from .labels import load_label_set

        ls = load_label_set(name)
        return ls.display_name, dict(ls.prompt_styles)
    except Exception:  # noqa: BLE001 - descriptions are optional; the label set may be an ad-hoc file
        return name, {}


def _variant_docs() -> dict:
    try:
        from .variants import list_variants

        return list_variants()
    except Exception:  # noqa: BLE001
        return {}


def report_context(result: ImageResult, model: dict | None = None, clinical: str | None = None,
                   json_href: str | None = None, index_href: str | None = None,
                   generated: datetime | None = None) -> dict:
    """Everything the report templates show, as plain data (no markup)."""
    model = model or {"name": result.model, "layout": "", "source": "", "fingerprint": "", "card_lines": [],
                      "card_performance": [], "metrics": None}
    conf = assess(result)
    perf = _performance(model, result.label_set)
    groups: dict[str, list] = {}
    for f in result.findings:
        groups.setdefault(f.category or "Other", []).append(conf["by_label"][f.label])
    ls_display, style_docs = _label_set_info(result.label_set)
    vdocs = _variant_docs()
    generated = generated or datetime.now(timezone.utc)
    per_label_thresholds = result.threshold is None
    return {
        "title": f"AI-assisted findings — {Path(result.image).name}",
        "disclaimer": DISCLAIMER,
        "image": result.image,
        "image_name": Path(result.image).name,
        "image_id": result.image_id,
        "model": model,
        "model_name": result.model,
        "label_set": result.label_set,
        "label_set_display": ls_display,
        "date": generated.strftime("%Y-%m-%d %H:%M UTC"),
        "threshold": result.threshold,
        "per_label_thresholds": per_label_thresholds,
        "view": result.view,
        "size": list(result.size) if result.size else None,
        "variants": [{"name": v, "doc": vdocs.get(v, "")} for v in result.variants],
        "styles": [{"name": s, "doc": style_docs.get(s, "")} for s in result.prompt_styles],
        "clinical": (clinical or "").strip() or None,
        "groups": [{"category": c, "rows": rows} for c, rows in groups.items()],
        "impression": [{"finding": f, "priority": SEVERITY_WORDS.get(f.severity, f"severity {f.severity}"),
                        "confidence": conf["by_label"][f.label]} for f in result.positives],
        "confidence": conf,
        "performance": perf,
        "adapter": result.adapter,
        "calibration": result.calibration,
        "json_href": json_href,
        "index_href": index_href,
        "ood": result.ood,
        "heatmaps": _report_heatmaps(result),
    }


def _report_heatmaps(result: ImageResult) -> list[dict]:
    """Heatmaps that carry an inline PNG (`data_uri`, from vlm.explain.Heatmap.data_uri), with display names."""
    names = {f.label: f.display or f.label for f in result.findings}
    return [{**h, "display": names.get(h["label"], h["label"]), "empty": bool(h.get("empty"))}
            for h in result.heatmaps if str(h.get("data_uri", "")).startswith("data:image/png;base64,")]


def render_report(result: ImageResult, model: dict | None = None, clinical: str | None = None, fmt: str = "html",
                  plotly_src: str | None = None, json_href: str | None = None, index_href: str | None = None,
                  generated: datetime | None = None) -> str:
    """Render one image's structured report.

    fmt "html": a self-contained page; plotly.js is inlined unless `plotly_src` gives a relative
    path to a local copy (see `vlm.html.write_plotly_asset`). The JSON findings are linked
    (`json_href`) or, when no href is given, embedded as a data: download link.
    fmt "md": the same report as Markdown (no charts).
    `model` is `model_info(backbone)`; without it only the model's name is known.
    """
    if fmt not in ("html", "md"):
        raise ValueError(f"unknown report format {fmt!r}; use 'html' or 'md'")
    _register_filters()
    ctx = report_context(result, model, clinical, json_href, index_href, generated)
    if fmt == "md":
        return render("report.md.j2", **ctx)
    payload = result.to_dict()
    if ctx["clinical"] is not None:
        payload.setdefault("clinical", ctx["clinical"])
    json_data_uri = None
    if json_href is None:
        json_data_uri = "data:application/json;base64," + base64.b64encode(safe_json(payload).encode()).decode()
    return render("report.html.j2", **ctx, charts=chart_divs(result), plotly_src=plotly_src,
                  plotly_inline=Markup(plotly_js()) if plotly_src is None else None,
                  json_data_uri=json_data_uri, json_filename=f"{result.image_id}.json")


def write_reports(results: list[ImageResult], backbone, html_out: str | Path | None = None,
                  md_out: str | Path | None = None, clinical: str | None = None, single: bool = True) -> list[Path]:
    """`analyze --html/--markdown`: one image -> the given files (plotly.js inlined); several
    images -> the given folders, one `<image id>.html|.md` each (plotly.js once in `assets/`)."""
    from .fileio import atomic_write_text
    from .html import write_plotly_asset

    model = model_info(backbone)
    written: list[Path] = []
    if single and len(results) == 1:
        r = results[0]
        if html_out:
            atomic_write_text(html_out, render_report(r, model, clinical, fmt="html"))
            written.append(Path(html_out))
        if md_out:
            atomic_write_text(md_out, render_report(r, model, clinical, fmt="md"))
            written.append(Path(md_out))
        return written
    if html_out:
        src = write_plotly_asset(html_out)
        for r in results:
            target = Path(html_out) / f"{r.image_id}.html"
            atomic_write_text(target, render_report(r, model, clinical, fmt="html", plotly_src=src))
            written.append(target)
    if md_out:
        for r in results:
            target = Path(md_out) / f"{r.image_id}.md"
            atomic_write_text(target, render_report(r, model, clinical, fmt="md"))
            written.append(target)
    return written
