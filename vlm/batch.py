"""`vlm-xray batch`: score many images, write one report per image and a browsable index.

    DIR/index.html                 sortable, filterable table + batch charts (offline)
    DIR/assets/plotly.min.js       plotly.js, once per folder
    DIR/reports/<id>.html|.json    per-image report and its JSON (the JSON is the "done" marker)
    DIR/findings.csv|.json         one row per image x label
    DIR/errors.csv                 inputs that failed (image, error)

Images are scored in chunks; each report is written (atomically) as soon as its chunk is done,
so a killed run loses at most one chunk. Re-running the same command resumes: an image whose
JSON exists and matches the model, label set, variants, styles and threshold is loaded back
instead of being scored again.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from markupsafe import Markup

from .html import atomic_write_text, figure_div, render, write_plotly_asset
from .images import find_images, safe_id
from .report import assess, model_info, render_report, safe_json
from .results import FINDINGS_CSV_COLUMNS, ImageFailure, ImageResult, findings_rows, to_csv

REPORTS = "reports"
SIGNATURE_KEYS = ("model", "model_fingerprint", "label_set", "variants", "prompt_styles", "threshold", "adapter",
                  "calibration")


@dataclass
class BatchSummary:
    out_dir: Path
    total: int = 0
    scored: int = 0
    resumed: int = 0
    rerendered: int = 0
    failed: list[ImageFailure] = field(default_factory=list)
    results: list[ImageResult] = field(default_factory=list)

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"

    def __str__(self) -> str:
        return (f"{self.total} inputs: {self.scored} scored, {self.resumed} already done (resumed), "
                f"{len(self.failed)} failed -> {self.index}")


# ----------------------------------------------------------------------------- inputs

def read_csv_list(path: Path, views: dict[str, str] | None = None) -> list[Path]:
    """Image paths from a CSV with a `filename` column, relative to the CSV's folder.

    If the CSV has a `view` column (PA, AP, ...), it is collected into `views` (path -> view)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "filename" not in reader.fieldnames:
            raise ValueError(f"{path}: a CSV input list needs a 'filename' column "
                             f"(found: {', '.join(reader.fieldnames or []) or 'no header'})")
        out = []
        for row in reader:
            name = (row.get("filename") or "").strip()
            if not name:
                continue
            p = path.parent / name
            out.append(p)
            if views is not None and (row.get("view") or "").strip():
                views[str(p)] = row["view"].strip()[:20]
        return out


def collect_inputs(inputs: Iterable[str | Path], views: dict[str, str] | None = None) -> list[Path]:
    """Files, folders, globs and CSV lists -> de-duplicated image paths in input order."""
    expanded: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            expanded += [str(q) for q in read_csv_list(p, views)]
        else:
            expanded.append(str(item))
    return find_images(expanded)


def output_names(paths: list[Path]) -> dict[str, str]:
    """Input path -> report base name: `safe_id` (no separators or markup), unique within the batch."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for p in paths:
        base = name = safe_id(p)
        k = 2
        while name.lower() in used:  # case-insensitive file systems too
            name = f"{base}-{k}"
            k += 1
        used.add(name.lower())
        names[str(p)] = name
    return names


# ----------------------------------------------------------------------------- resume

def signature(scorer, threshold) -> dict:
    return {
        "model": scorer.backbone.name,
        "model_fingerprint": scorer.backbone.fingerprint,
        "label_set": scorer.label_set.name,
        "variants": list(scorer.variants),
        "prompt_styles": list(scorer.styles),
        "threshold": float(threshold) if isinstance(threshold, (int, float)) else None,
        "adapter": scorer.adapter_name,
        "calibration": getattr(scorer.calibration, "source", None),
    }


def _load_done(json_path: Path, image: str, sig: dict) -> ImageResult | None:
    """The finished result for `image` if its JSON exists, parses and matches `sig`."""
    if not json_path.is_file():
        return None
    try:
        d = json.loads(json_path.read_text(encoding="utf-8"))
        if d.get("image") != image:
            return None
        if any(d.get(k) != v for k, v in sig.items()):
            return None
        return ImageResult.from_dict(d)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or old schema: score again


# ----------------------------------------------------------------------------- writing

def _csv_cell(v):
    """Neutralise spreadsheet formulas in text cells (=, +, -, @ at the start)."""
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def _safe_csv(rows: list[dict], columns: list[str]) -> str:
    return to_csv([{k: _csv_cell(v) for k, v in r.items()} for r in rows], columns)


def write_report(result: ImageResult, reports_dir: Path, name: str, model: dict, clinical: str | None,
                 plotly_src: str) -> None:
    """HTML first, then the JSON (the JSON marks the image as done for resuming)."""
    html = render_report(result, model, clinical=clinical, fmt="html", plotly_src=plotly_src,
                         json_href=f"{name}.json", index_href="../index.html")
    atomic_write_text(reports_dir / f"{name}.html", html)
    atomic_write_text(reports_dir / f"{name}.json", safe_json(result.to_dict()) + "\n")


def write_errors(out_dir: Path, failures: list[ImageFailure]) -> None:
    atomic_write_text(out_dir / "errors.csv", _safe_csv([f.to_dict() for f in failures], ["image", "error"]))


def _row(result: ImageResult, name: str) -> dict:
    conf = assess(result)
    pos = result.positives
    top = max(result.findings, key=lambda f: f.probability) if result.findings else None
    return {
        "name": name,
        "image": result.image,
        "image_name": Path(result.image).name,
        "view": result.view or "",
        "positives": [f.display or f.label for f in pos],
        "positive_labels": [f.label for f in pos],
        "n_positive": len(pos),
        "top": (top.display or top.label) if top else "",
        "top_p": top.probability if top else 0.0,
        "max_unc": max((f.uncertainty for f in result.findings), default=0.0),
        "agreement": conf["min_agreement"],
        "reliability": conf["reliability"],
    }


def batch_charts(results: list[ImageResult]) -> dict[str, Markup]:
    import plotly.graph_objects as go

    if not results:
        return {}
    first = results[0].findings
    labels = [f.label for f in first]
    names = {f.label: f.display or f.label for f in first}
    n = len(results)
    counts = {lab: 0 for lab in labels}
    probs: dict[str, list[float]] = {lab: [] for lab in labels}
    for r in results:
        for f in r.findings:
            if f.label in probs:
                probs[f.label].append(f.probability)
                counts[f.label] += bool(f.positive)
    order = sorted(labels, key=lambda lab: counts[lab])
    prev = go.Figure(go.Bar(
        x=[counts[lab] / n for lab in order], y=[names[lab] for lab in order], orientation="h",
        text=[f"{counts[lab]} ({counts[lab] / n:.0%})" for lab in order], textposition="auto",
        marker_color="#b42318", hovertemplate="%{y}: %{x:.1%}<extra></extra>",
    ))
    prev.update_layout(title=f"Finding prevalence: share of the {n} images called positive", template="none",
                       xaxis={"range": [0, 1], "tickformat": ".0%"}, yaxis={"automargin": True}, height=140 + 26 * len(labels),
                       margin={"l": 10, "r": 20, "t": 60, "b": 40})
    dist = go.Figure()
    for lab in sorted(labels, key=lambda lab: -sum(probs[lab]) / max(1, len(probs[lab]))):
        dist.add_trace(go.Box(x=probs[lab], name=names[lab], orientation="h", boxpoints="outliers",
                              marker_color="#475467", hovertemplate="%{x:.3f}<extra></extra>"))
    thresholds = {r.threshold for r in results}
    if len(thresholds) == 1 and None not in thresholds:
        dist.add_vline(x=thresholds.pop(), line_dash="dash", line_color="#1d2939", annotation_text="threshold")
    dist.update_layout(title="Distribution of probabilities per finding across images", template="none",
                       xaxis={"range": [0, 1], "title": "probability"}, showlegend=False,
                       height=140 + 26 * len(labels), margin={"l": 10, "r": 20, "t": 60, "b": 40},
                       yaxis={"autorange": "reversed", "automargin": True})
    return {"prevalence": Markup(figure_div(prev, "batch-prevalence")),
            "distribution": Markup(figure_div(dist, "batch-distribution"))}


def write_index(out_dir: Path, results: list[ImageResult], names: dict[str, str], failures: list[ImageFailure],
                sig: dict, model: dict, clinical: str | None, plotly_src: str) -> None:
    rows = [_row(r, names.get(r.image, r.image_id)) for r in results]
    labels = [(f.label, f.display or f.label) for f in results[0].findings] if results else []
    html = render(
        "batch_index.html.j2", rows=rows, failures=[f.to_dict() for f in failures], labels=labels, sig=sig,
        model=model, clinical=(clinical or "").strip() or None, charts=batch_charts(results), plotly_src=plotly_src,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), n_total=len(results) + len(failures),
    )
    atomic_write_text(out_dir / "index.html", html)


# ----------------------------------------------------------------------------- the batch

def run_batch(scorer, inputs: Iterable[str | Path], out_dir: str | Path, threshold: float | None = None,
              clinical: str | None = None, progress: bool = True, chunk_size: int = 32) -> BatchSummary:
    """Score `inputs` (files, folders, globs, CSV lists) and write the batch folder; resumable.

    threshold None: the calibration's per-label thresholds when the scorer has a calibration, else 0.5.
    """
    out_dir = Path(out_dir)
    views: dict[str, str] = {}
    paths = collect_inputs(inputs, views)
    if not paths:
        raise ValueError(f"no images found in: {' '.join(map(str, inputs))}")
    if threshold is None:
        threshold = None if getattr(scorer, "calibration", None) is not None else 0.5
    reports_dir = out_dir / REPORTS
    reports_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(".*.tmp"), *reports_dir.glob(".*.tmp")]:
        stale.unlink(missing_ok=True)  # temp files of a run that was killed mid-write
    asset = write_plotly_asset(out_dir)
    plotly_src = f"../{asset}"
    sig = signature(scorer, threshold)
    model = model_info(scorer.backbone)
    clinical = (clinical or "").strip() or None
    names = output_names(paths)
    summary = BatchSummary(out_dir=out_dir, total=len(paths))
    done: dict[str, ImageResult] = {}
    todo: list[Path] = []
    for p in paths:
        name = names[str(p)]
        r = _load_done(reports_dir / f"{name}.json", str(p), sig)
        if r is None:
            todo.append(p)
            continue
        if r.extra.get("clinical") != clinical or not (reports_dir / f"{name}.html").is_file():
            r.extra["clinical"] = clinical  # new clinical text or a missing page: re-render, no re-scoring
            write_report(r, reports_dir, name, model, clinical, plotly_src)
            summary.rerendered += 1
        done[str(p)] = r
        summary.resumed += 1

    failures: dict[str, ImageFailure] = {}
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), initial=summary.resumed, desc="batch", unit="img", file=sys.stderr,
                   mininterval=0.5)
    for start in range(0, len(todo), max(1, chunk_size)):
        chunk = todo[start : start + chunk_size]
        for out in scorer.score(chunk, threshold):
            key = str(out.image)
            if isinstance(out, ImageFailure):
                failures[key] = out
            else:
                try:
                    if out.view is None and key in views:
                        out.view = views[key]  # the input list's view column, when the image has none
                    out.extra.update({k: sig[k] for k in ("model_fingerprint",)})
                    out.extra["clinical"] = clinical
                    write_report(out, reports_dir, names[key], model, clinical, plotly_src)
                    done[key] = out
                    summary.scored += 1
                except Exception as e:  # noqa: BLE001 - one bad report must not stop the batch
                    failures[key] = ImageFailure(key, f"report failed: {type(e).__name__}: {e}")
            if bar is not None:
                bar.update(1)
        if failures:
            write_errors(out_dir, [failures[str(p)] for p in paths if str(p) in failures])
    if bar is not None:
        bar.close()

    results = [done[str(p)] for p in paths if str(p) in done]
    summary.failed = [failures[str(p)] for p in paths if str(p) in failures]
    summary.results = results
    rows = findings_rows(results)
    atomic_write_text(out_dir / "findings.csv", _safe_csv(rows, FINDINGS_CSV_COLUMNS))
    atomic_write_text(out_dir / "findings.json", safe_json(rows) + "\n")
    write_errors(out_dir, summary.failed)
    write_index(out_dir, results, names, summary.failed, sig, model, clinical, f"{asset}")
    return summary
