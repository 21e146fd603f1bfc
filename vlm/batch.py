"""`vlm-xray batch`: score many images, write one report per image and a browsable index.

    DIR/index.html                 sortable, filterable table + batch charts (offline)
    DIR/assets/plotly.min.js       plotly.js, once per folder
    DIR/reports/<id>.html|.json    per-image report and its JSON (the JSON is the "done" marker; with
                                   html_reports=False only the JSON)
    DIR/findings.csv|.json         one row per image x label
    DIR/errors.csv                 every input entry not scored (image, error): unreadable files, and
                                   folder entries that are not images (broken links, folders named
                                   like images, non-image content...)
    DIR/batch.json                 the settings the folder was made with

Inputs are found by content (`vlm.images.discover`): folders recursively (recursive=False: only
their top level), links to folders only with follow_symlinks; plainly-not-image files (.txt, .csv,
.json...) are counted in the summary, not listed.

Never lose or mix output: every file is written atomically; images are scored in chunks and each
report is written as soon as its chunk is done, so a killed run loses at most one chunk, and
re-running the same command resumes (an image whose JSON exists and matches the settings is loaded
back, not scored again) to the same findings.csv, byte for byte. A folder made with other settings is
re-done image by image; when the run completes, reports of images no longer in the batch are
removed, so the folder shows one batch. overwrite=True replaces the folder as a whole first (only a
batch folder: anything else is refused). An output folder that cannot be written - permission,
disk full - stops the batch at once with one `BatchOutputError` line (exit code 2); finished
reports are kept.

Memory does not grow with the list (beyond the input paths): a finished image's result is dropped
once its report is written; what the index, findings and charts need is spooled as one compact record
per image to a temporary file in the output folder and streamed back, in input order, at the end.
`BatchSummary.results` reads the results back from the reports.

Exit codes (`BatchSummary.exit_code`, for the CLI): 0 every input scored, 1 some input failed or was
listed in errors.csv; usage, model and output-folder errors are exceptions (exit code 2).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import textwrap
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from markupsafe import Markup

from .data import read_csv_table
from .fileio import atomic_path, atomic_write_json, atomic_write_text
from .html import environment, figure_div, write_plotly_asset
from .images import Discovery, discover, printable_path, safe_id
from .report import chart_layout, assess, model_info, render_report, safe_json
from .results import FINDINGS_CSV_COLUMNS, ImageFailure, ImageResult, findings_rows, to_csv

logger = logging.getLogger(__name__)

REPORTS = "reports"
MANIFEST = "batch.json"
SIGNATURE_KEYS = ("model", "model_fingerprint", "label_set", "variants", "prompt_styles", "threshold", "adapter",
                  "calibration", "input_options", "ood_mode", "heatmap_setting")


class BatchOutputError(ValueError):
    """The output folder cannot be written (permission, disk full, not a batch folder): one line, exit 2."""


@dataclass
class BatchSummary:
    """What a batch did. Results are not kept in memory (a batch may be 100k images): `iter_results()`
    / `results` read them back from the reports on disk, in input order."""

    out_dir: Path
    total: int = 0
    scored: int = 0
    resumed: int = 0
    rerendered: int = 0
    failed: list[ImageFailure] = field(default_factory=list)
    warned: int = 0  # scored images with input warnings (view, body part, frames)
    not_images: int = 0  # plainly-not-image files met in folders (counted, not listed)
    duplicates: int = 0  # paths naming a file already in the batch (scored once)
    folders_not_scanned: int = 0  # sub-folders left out by recursive=False
    done_names: list[str] = field(default_factory=list)  # report base names of the scored images, input order

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"

    def iter_results(self):
        """The scored images' results, in input order, read back from reports/<name>.json one at a time."""
        for name in self.done_names:
            d = json.loads((self.out_dir / REPORTS / f"{name}.json").read_text(encoding="utf-8"))
            yield ImageResult.from_dict(d)

    @property
    def results(self) -> list[ImageResult]:
        """All results as a list (read from disk; for big batches prefer `iter_results`)."""
        return list(self.iter_results())

    @property
    def exit_code(self) -> int:
        """0: every input scored; 1: some input failed or was listed in errors.csv."""
        return 1 if self.failed else 0

    def __str__(self) -> str:
        text = (f"{self.total} inputs: {self.scored} scored, {self.resumed} already done (resumed), "
                f"{len(self.failed)} failed")
        text += " (see errors.csv)" if self.failed else ""
        extras = [(self.warned, "with input warnings (view, body part, frames)"),
                  (self.not_images, "non-image files ignored"), (self.duplicates, "duplicate paths scored once"),
                  (self.folders_not_scanned, "sub-folders not scanned (not recursive)")]
        text += "".join(f"; {n} {what}" for n, what in extras if n)
        return f"{text} -> {self.index}"


# ----------------------------------------------------------------------------- inputs

def read_csv_list(path: Path, views: dict[str, str] | None = None) -> list[Path]:
    """Image paths from a CSV with a `filename` column, relative to the CSV's folder.

    If the CSV has a `view` column (PA, AP, ...), it is collected into `views` (path -> view)."""
    out = []
    for row in read_csv_table(path, required=("filename",)):
        name = (row.get("filename") or "").strip()
        if not name:
            continue
        p = Path(path).parent / name
        out.append(p)
        if views is not None and (row.get("view") or "").strip():
            views[str(p)] = row["view"].strip()[:20]
    return out


def gather_inputs(inputs: Iterable[str | Path], views: dict[str, str] | None = None, recursive: bool = True,
                  follow_symlinks: bool = False) -> Discovery:
    """Files, folders, globs and CSV lists -> `Discovery` (images in input order, skipped entries, counts)."""
    expanded: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            expanded += [str(q) for q in read_csv_list(p, views)]
        else:
            expanded.append(str(item))
    return discover(expanded, recursive=recursive, follow_symlinks=follow_symlinks)


def collect_inputs(inputs: Iterable[str | Path], views: dict[str, str] | None = None, recursive: bool = True,
                   follow_symlinks: bool = False) -> list[Path]:
    """Files, folders, globs and CSV lists -> de-duplicated image paths in input order."""
    return gather_inputs(inputs, views, recursive, follow_symlinks).images


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

def input_options(scorer) -> dict | None:
    """The load options that change results (None when all are defaults): part of the resume signature."""
    opts = getattr(scorer, "load_options", None)
    if opts is None:
        return None
    chosen = {"window": list(opts.window) if opts.window else None, "include_phi": bool(opts.include_phi),
              "multiframe": opts.multiframe}
    return None if chosen == {"window": None, "include_phi": False, "multiframe": "first"} else chosen


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
        "input_options": input_options(scorer),
        "ood_mode": getattr(scorer, "ood_mode", "off"),
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
                 plotly_src: str, html: bool = True) -> None:
    """HTML first, then the JSON (the JSON marks the image as done for resuming). html=False: the JSON
    only, and a page left by an earlier run is removed (it could show other clinical text)."""
    page = reports_dir / f"{name}.html"
    if html:
        atomic_write_text(page, render_report(result, model, clinical=clinical, fmt="html", plotly_src=plotly_src,
                                              json_href=f"{name}.json", index_href="../index.html"))
    else:
        page.unlink(missing_ok=True)
    # compact: indented JSON goes through json's pure-Python encoder (~1.5 ms a report, the biggest
    # share of the writer's work); `python -m json.tool` pretty-prints it
    atomic_write_text(reports_dir / f"{name}.json", safe_json(result.to_dict(), indent=None) + "\n")


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
        "input_warnings": list(result.input_warnings),
    }


class _ChartData:
    """Per-label probabilities and positive counts over the batch: what the index charts need, as flat
    float arrays (8 bytes per image x label), not results."""

    def __init__(self) -> None:
        self.labels: list[tuple[str, str]] = []  # (label, display), the label set's order
        self.probs: dict[str, array] = {}
        self.counts: dict[str, int] = {}
        self.thresholds: set = set()
        self.n = 0

    def add(self, chart: dict) -> None:
        if not self.labels:
            self.labels = [tuple(x) for x in chart["labels"]]
            self.probs = {lab: array("d") for lab, _ in self.labels}
            self.counts = {lab: 0 for lab, _ in self.labels}
        for lab, p, pos in zip(chart["label_names"], chart["p"], chart["pos"]):
            if lab in self.probs:
                self.probs[lab].append(p)
                self.counts[lab] += bool(pos)
        self.thresholds.add(chart["threshold"])
        self.n += 1


def _chart_record(result: ImageResult) -> dict:
    return {"labels": [(f.label, f.display or f.label) for f in result.findings],
            "label_names": [f.label for f in result.findings], "p": [f.probability for f in result.findings],
            "pos": [bool(f.positive) for f in result.findings], "threshold": result.threshold}


def batch_charts(data: _ChartData) -> dict[str, Markup]:
    """The index page's charts as plain plotly.js specs: prevalence bars and per-finding distributions."""
    if not data.n:
        return {}
    labels = [lab for lab, _ in data.labels]
    names = dict(data.labels)
    n, counts, probs = data.n, data.counts, data.probs
    height = 140 + 26 * len(labels)
    order = sorted(labels, key=lambda lab: counts[lab])
    prev = {"data": [{"type": "bar", "x": [counts[lab] / n for lab in order], "y": [names[lab] for lab in order],
                      "orientation": "h", "text": [f"{counts[lab]} ({counts[lab] / n:.0%})" for lab in order],
                      "textposition": "auto", "marker": {"color": "#b42318"},
                      "hovertemplate": "%{y}: %{x:.1%}<extra></extra>"}],
            "layout": chart_layout(f"Finding prevalence: share of the {n} images called positive", height,
                                   xaxis={"range": [0, 1], "tickformat": ".0%"}, yaxis={"automargin": True})}
    boxes = [{"type": "box", "x": list(probs[lab]), "name": names[lab], "orientation": "h", "boxpoints": "outliers",
              "marker": {"color": "#475467"}, "hovertemplate": "%{x:.3f}<extra></extra>"}
             for lab in sorted(labels, key=lambda lab: -sum(probs[lab]) / max(1, len(probs[lab])))]
    thresholds = set(data.thresholds)
    common = thresholds.pop() if len(thresholds) == 1 and None not in thresholds else None
    dist = {"data": boxes,
            "layout": chart_layout("Distribution of probabilities per finding across images", height, "x", common,
                                   xaxis={"range": [0, 1], "title": {"text": "probability"}},
                                   yaxis={"autorange": "reversed", "automargin": True})}
    return {"prevalence": Markup(figure_div(prev, "batch-prevalence")),
            "distribution": Markup(figure_div(dist, "batch-distribution"))}


def collected_record(result: ImageResult, name: str) -> bytes:
    """What the batch keeps of one image until the end: its index row, its chart values, and its rows of
    findings.csv / findings.json already as their text (serialising them is most of the end's work)."""
    rows = findings_rows([result])
    record = {"row": _row(result, name), "chart": _chart_record(result),
              "csv": _safe_csv(rows, FINDINGS_CSV_COLUMNS).split("\r\n", 1)[1],
              "json": _indented_json_rows(rows)}
    return json.dumps(record, ensure_ascii=False, allow_nan=True).encode("utf-8")


def _indented_json_rows(rows: list[dict]) -> str:
    """The rows as they sit in findings.json (`safe_json(row)` indented by two spaces, comma-joined),
    through json's C encoder: indent= takes its pure-Python one, 3x slower on these flat rows."""
    if any(isinstance(v, (dict, list, tuple)) for row in rows for v in row.values()):
        return ",\n".join(textwrap.indent(safe_json(row), "  ") for row in rows)  # nested: the general form
    flat = [json.dumps(row, ensure_ascii=False, allow_nan=False, default=str, separators=(",\n    ", ": "))
            for row in rows]
    text = ",\n".join("  {\n    " + t[1:-1] + "\n  }" if len(t) > 2 else "  {}" for t in flat)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


class _Collected:
    """What the batch keeps of each finished image until the end, without keeping results in memory:
    one compact JSON record per image (`collected_record`: its index row, chart values and findings text) spooled to a
    temporary file in the output folder; memory holds only each record's offset. At the end the
    index, findings.csv/json and the charts are streamed from it in input order, so peak memory does
    not grow with the list (besides the paths themselves)."""

    def __init__(self, out_dir: Path):
        fd, name = tempfile.mkstemp(dir=out_dir, prefix=".collected-", suffix=".tmp")
        self.path = Path(name)
        self._file = os.fdopen(fd, "w+b")
        self._at: dict[str, tuple[int, int]] = {}
        self.warned = 0

    def add(self, key: str, result: ImageResult, name: str) -> None:
        self.add_record(key, collected_record(result, name), bool(result.input_warnings))

    def add_record(self, key: str, data: bytes, warned: bool) -> None:
        """A record made by `collected_record` (in the report writer, beside the encoder)."""
        self._file.seek(0, os.SEEK_END)
        self._at[key] = (self._file.tell(), len(data))
        self._file.write(data)
        self.warned += warned

    def __contains__(self, key: str) -> bool:
        return key in self._at

    def records(self, keys: list[str], part: str):
        """`part` ("row", "findings" or "chart") of each collected key, in the order given."""
        self._file.flush()
        for key in keys:
            at, size = self._at[key]
            self._file.seek(at)
            yield json.loads(self._file.read(size).decode("utf-8"))[part]

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class _Rows:
    """The index rows as a sized iterable (the template takes len() and iterates once): read on demand."""

    def __init__(self, collected: _Collected, keys: list[str]):
        self.collected, self.keys = collected, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        return self.collected.records(self.keys, "row")


def write_findings(out_dir: Path, collected: _Collected, keys: list[str]) -> None:
    """findings.csv and findings.json (one row per image x label, input order), streamed, each atomically;
    the bytes equal `_safe_csv(rows, ...)` and `safe_json(rows) + "\n"` of the whole list."""
    with atomic_path(out_dir / "findings.csv") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(to_csv([], FINDINGS_CSV_COLUMNS))  # the header
        f.writelines(collected.records(keys, "csv"))
    with atomic_path(out_dir / "findings.json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        first = True
        for chunk in collected.records(keys, "json"):
            if chunk:  # an image without findings has none
                f.write(("[\n" if first else ",\n") + chunk)
                first = False
        f.write("[]\n" if first else "\n]\n")


def write_index(out_dir: Path, collected: _Collected, keys: list[str], failures: list[ImageFailure], sig: dict,
                model: dict, clinical: str | None, plotly_src: str, html_reports: bool = True) -> None:
    """index.html, rendered straight to its (atomic) file from the collected rows."""
    charts = _ChartData()
    for chart in collected.records(keys, "chart"):
        charts.add(chart)
    template = environment().get_template("batch_index.html.j2")
    parts = template.generate(
        rows=_Rows(collected, keys), failures=[f.to_dict() for f in failures], labels=charts.labels, sig=sig,
        model=model, clinical=(clinical or "").strip() or None, charts=batch_charts(charts), plotly_src=plotly_src,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), n_total=len(keys) + len(failures),
        html_reports=html_reports,
    )
    with atomic_path(out_dir / "index.html") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(parts)


# ----------------------------------------------------------------------------- the output folder

def _is_batch_folder(out_dir: Path) -> bool:
    return any((out_dir / m).exists() for m in (MANIFEST, "index.html", "findings.csv", REPORTS))


def _replace_out_dir(out_dir: Path) -> None:
    """overwrite=True: the old batch goes in one rename (never half of it left), then is deleted."""
    if not out_dir.is_dir():
        raise BatchOutputError(f"{out_dir} exists and is not a folder")
    if any(out_dir.iterdir()) and not _is_batch_folder(out_dir):
        raise BatchOutputError(f"{out_dir} is not a vlm-xray batch folder (no {MANIFEST}, index.html or {REPORTS}/); "
                               f"refusing to replace it - choose another output folder")
    trash = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
    os.replace(out_dir, trash)
    shutil.rmtree(trash)
    logger.info("replaced the earlier batch in %s", out_dir)


def prepare_out_dir(out_dir: Path, sig: dict, overwrite: bool = False) -> Path:
    """Create (or, with overwrite, replace) the batch folder and prove it writable; returns reports/."""
    try:
        for left in out_dir.parent.glob(f".{out_dir.name}.replaced-*"):
            shutil.rmtree(left, ignore_errors=True)  # an earlier overwrite killed while deleting
        if overwrite and out_dir.exists():
            _replace_out_dir(out_dir)
        reports_dir = out_dir / REPORTS
        reports_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*out_dir.glob(".*.tmp*"), *reports_dir.glob(".*.tmp*")]:
            stale.unlink(missing_ok=True)  # temp files of a run that was killed mid-write
        atomic_write_json(out_dir / MANIFEST, {"tool": "vlm-xray batch", "settings": sig})
    except OSError as e:
        raise BatchOutputError(f"cannot write to the output folder {out_dir}: {e.strerror or e}") from None
    return reports_dir


@contextmanager
def _output_errors(out_dir: Path):
    """Any OS error while writing outputs (disk full, permission, read-only) stops the batch with one line."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise BatchOutputError(f"writing to the output folder {out_dir} failed{where}: {e.strerror or e}; "
                               f"finished reports are kept and re-running the command resumes") from None


def _prune(reports_dir: Path, names: dict[str, str]) -> None:
    """Remove reports of images that are not in this batch (an earlier batch in the same folder)."""
    keep = {n.lower() for n in names.values()}
    stale = [p for p in reports_dir.iterdir() if p.suffix in (".html", ".json") and p.stem.lower() not in keep]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d reports of an earlier batch in %s", len(stale), reports_dir.parent)


# ----------------------------------------------------------------------------- the batch

@dataclass
class _Run:
    """What one run_batch call carries between its steps."""

    scorer: object
    out_dir: Path
    reports_dir: Path
    threshold: float | dict | None
    sig: dict
    model: dict
    clinical: str | None
    plotly_src: str
    names: dict[str, str]
    views: dict[str, str]
    summary: BatchSummary
    collected: _Collected  # compact records of the finished images (not their results: memory stays flat)
    html_reports: bool = True  # False: each image's JSON only (no page)
    failures: dict[str, ImageFailure] = field(default_factory=dict)


def _resume(run: _Run, paths: list[Path]) -> list[Path]:
    """Load finished results back (re-rendering pages whose clinical text changed); returns what is left."""
    todo = []
    for p in paths:
        name = run.names[str(p)]
        r = _load_done(run.reports_dir / f"{name}.json", printable_path(p), run.sig)
        if r is None:
            todo.append(p)
            continue
        page_missing = run.html_reports and not (run.reports_dir / f"{name}.html").is_file()
        if r.extra.get("clinical") != run.clinical or page_missing:
            r.extra["clinical"] = run.clinical  # new clinical text or a missing page: re-render, no re-scoring
            write_report(r, run.reports_dir, name, run.model, run.clinical, run.plotly_src, run.html_reports)
            run.summary.rerendered += 1
        run.collected.add(str(p), r, name)
        run.summary.resumed += 1
    return todo


def _prepare(run: _Run, out) -> str:
    """Name the input as text and add the batch's fields to a result; returns the input's key."""
    key = str(out.image)
    out.image = printable_path(key)  # outputs name the input as text; `key` is the path itself
    if isinstance(out, ImageFailure):
        return key
    if out.view is None and key in run.views:
        out.view = run.views[key]  # the input list's view column, when the image has none
    out.extra["model_fingerprint"] = run.sig["model_fingerprint"]
    if run.sig["input_options"] is not None:
        out.extra["input_options"] = run.sig["input_options"]
    out.extra["clinical"] = run.clinical
    out.extra.update(ood_mode=run.sig["ood_mode"], heatmap_setting=run.sig["heatmap_setting"])
    return key


def _report_task(result: ImageResult, reports_dir: Path, name: str, model: dict, clinical: str | None,
                 plotly_src: str, html: bool = True) -> tuple[str | None, bytes | None]:
    """Write one image's report and make its collected record (in the writer, possibly a child process):
    (None, record), or (why it failed, None)."""
    try:
        write_report(result, reports_dir, name, model, clinical, plotly_src, html)
    except OSError:
        raise  # the output folder is failing: stop (see _output_errors), do not blame the image
    except Exception as e:  # noqa: BLE001 - one bad report must not stop the batch; it is listed in errors.csv
        return f"report failed: {type(e).__name__}: {e}", None
    return None, collected_record(result, name)


def _finish(run: _Run, key: str, result: ImageResult | ImageFailure, written: tuple | None) -> None:
    """Record a written report (or its failure, or the input's failure) - in the writer's `done`, in order."""
    if isinstance(result, ImageFailure):
        run.failures[key] = result
        return
    error, record = written
    if error is not None:
        run.failures[key] = ImageFailure(result.image, error)
        return
    run.collected.add_record(key, record, bool(result.input_warnings))
    run.summary.scored += 1


def _add_heatmaps(run: _Run, result: ImageResult) -> None:
    """Overlays of the positive findings into reports/heatmaps/ and the report; a failure is noted, not fatal."""
    from .explain import attach_heatmaps

    method = None if run.sig["heatmap_setting"] == "auto" else run.sig["heatmap_setting"]
    try:
        attach_heatmaps(run.scorer, result, run.reports_dir / "heatmaps", method, run.scorer.load_options)
    except (ValueError, RuntimeError) as e:  # ExplainError, ImageLoadError (file changed), tower errors
        logger.warning("heatmaps for %s failed: %s", printable_path(result.image), e)
        result.input_warnings.append(f"heatmaps could not be made: {e}")


def _writer(done):
    """The report writer: a child process where fork exists (rendering then does not share this process's
    GIL with the encoder loop), else a thread. `submit(item, *task_args)`; `done(item, (error, record))`
    here (None for an item without a task)."""
    from .engines import BackgroundWriter, ProcessWriter

    if ProcessWriter.available():
        return ProcessWriter(_report_task, done)

    class _Threaded(BackgroundWriter):
        def submit(self, item, *args) -> None:
            super().submit((item, args))

    return _Threaded(lambda job: done(job[0], _report_task(*job[1]) if job[1] else None))


def _score(run: _Run, todo: list[Path], all_failures, chunk_size: int, progress: bool, engine=None) -> None:
    """One streaming pass of `engine` (default: local) over `todo`; reports are written by the background
    writer while the engine encodes, errors.csv again after every `chunk_size` written results."""
    from .engines import get_engine

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.summary.total, initial=run.summary.total - len(todo), desc="batch", unit="img",
                   file=sys.stderr, mininterval=0.5)
    written = [0]

    def done(item, report) -> None:
        _finish(run, item[0], item[1], report)
        written[0] += 1
        if run.failures and written[0] % max(1, chunk_size) == 0:
            write_errors(run.out_dir, all_failures())
        if bar is not None:
            bar.update(1)

    with _writer(done) as writer:
        for out in (engine or get_engine("local")).results(run.scorer, todo, run.threshold):
            if run.sig["heatmap_setting"] and isinstance(out, ImageResult):
                _add_heatmaps(run, out)  # here, not in the writer: it runs the model
            key = _prepare(run, out)
            if isinstance(out, ImageFailure):
                writer.submit((key, out))  # no report: recorded in its turn
                continue
            writer.submit((key, out), out, run.reports_dir, run.names[key], run.model, run.clinical, run.plotly_src,
                          run.html_reports)
    if run.failures:
        write_errors(run.out_dir, all_failures())
    if bar is not None:
        bar.close()


def run_batch(scorer, inputs: Iterable[str | Path], out_dir: str | Path, threshold: float | None = None,
              clinical: str | None = None, progress: bool = True, chunk_size: int = 32, *, overwrite: bool = False,
              recursive: bool = True, follow_symlinks: bool = False, engine=None,
              heatmaps: str | None = None, html_reports: bool = True) -> BatchSummary:
    """Score `inputs` (files, folders, globs, CSV lists) and write the batch folder; resumable.

    threshold: as `Scorer.thresholds` (None: the calibration's per-label thresholds, else 0.5).
    overwrite: replace an existing batch folder instead of resuming it. recursive / follow_symlinks: how
    folders are scanned (see `vlm.images.discover`). How images are read (DICOM window, pixel limit,
    PHI) is the scorer's `load_options`. engine: a `vlm.engines` engine (default: local). heatmaps: None,
    "auto" or a `vlm.explain` method name: overlays of each image's positive findings in its report.
    html_reports=False: each image's JSON but no HTML page (archive-scale runs: the pages cost about a
    tenth of the throughput on two cores, benchmarks/bench_gap.py, and ~24 KB an image); index.html then
    links the JSON. A later run with pages resumes and adds them without scoring again."""
    out_dir = Path(out_dir)
    views: dict[str, str] = {}
    found = gather_inputs(inputs, views, recursive, follow_symlinks)
    paths = found.images
    if not paths:
        why = "; ".join(f"{e}: {r}" for e, r in found.skipped[:3])
        raise ValueError(f"no images found in: {' '.join(map(str, inputs))}" + (f" ({why})" if why else ""))
    threshold = scorer.thresholds(threshold)
    sig = {**signature(scorer, threshold), "heatmap_setting": heatmaps}
    reports_dir = prepare_out_dir(out_dir, sig, overwrite)
    summary = BatchSummary(out_dir=out_dir, total=len(paths) + len(found.skipped), not_images=found.not_images,
                           duplicates=found.duplicates, folders_not_scanned=found.folders_not_scanned)
    skipped = [ImageFailure(printable_path(entry), reason) for entry, reason in found.skipped]
    with _output_errors(out_dir):
        asset = write_plotly_asset(out_dir)
        run = _Run(scorer, out_dir, reports_dir, threshold, sig, model_info(scorer.backbone),
                   (clinical or "").strip() or None, f"../{asset}", output_names(paths), views, summary,
                   _Collected(out_dir), html_reports)
        try:
            _run_and_write(run, paths, skipped, chunk_size, progress, engine, asset)
        finally:
            run.collected.close()
    return summary


def _run_and_write(run: _Run, paths: list[Path], skipped: list[ImageFailure], chunk_size: int, progress: bool,
                   engine, asset: str) -> None:
    """Resume, score the rest, then write findings, errors.csv and the index from the collected records."""
    position = {str(p): i for i, p in enumerate(paths)}

    def all_failures() -> list[ImageFailure]:
        return skipped + [f for _, f in sorted(run.failures.items(), key=lambda kv: position[kv[0]])]

    todo = _resume(run, paths)
    _score(run, todo, all_failures, chunk_size, progress, engine)
    summary = run.summary
    done = [str(p) for p in paths if str(p) in run.collected]
    summary.done_names = [run.names[k] for k in done]
    summary.warned = run.collected.warned
    summary.failed = all_failures()
    write_findings(run.out_dir, run.collected, done)
    write_errors(run.out_dir, summary.failed)
    write_index(run.out_dir, run.collected, done, summary.failed, run.sig, run.model, run.clinical, f"{asset}",
                run.html_reports)
    _prune(run.reports_dir, run.names)
