"""Shared HTML plumbing: one Jinja environment (autoescape on), offline plotly.

Reports must open in a browser with no network: plotly.js is either inlined once per page
or written once per output folder as `assets/plotly.min.js` and referenced relatively.
Never a CDN.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2
from markupsafe import escape

from .fileio import atomic_write_text  # noqa: F401 (re-exported: `from vlm.html import atomic_write_text`)

PLOTLY_ASSET = "assets/plotly.min.js"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("vlm.templates"))),
        # autoescape every template, .html.j2 and .md.j2 alike: file names and clinical text
        # are user input and must never become markup.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda x, digits=1: f"{100 * float(x):.{digits}f}%"
    env.filters["num"] = lambda x, digits=3: "n/a" if x is None else f"{float(x):.{digits}f}"
    env.filters["tojson_attr"] = lambda x: json.dumps(x)
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def write_plotly_asset(out_dir: str | Path) -> str:
    """Write plotly.js once into `out_dir/assets/` (if absent); return the relative src."""
    target = Path(out_dir) / PLOTLY_ASSET
    if not target.is_file():
        atomic_write_text(target, plotly_js())
    return PLOTLY_ASSET


def safe_json(obj, indent: int | None = 2) -> str:
    """JSON that is also safe to inline in HTML: <, > and & are written as \\u escapes.

    These characters only ever occur inside JSON strings, so the result parses to the same data."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _finite(obj):
    """Chart data with NaN/inf as null (a gap in the chart), so one bad number never breaks a page."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


CHART_CONFIG = {"displaylogo": False, "responsive": True}


def figure_div(figure, div_id: str) -> str:
    """A chart as a <div> + script, without plotly.js itself (the page includes it once).

    `figure` is a plain spec {"data": [traces], "layout": {...}}, as plotly.js takes it, or a plotly
    `Figure`. Per-image report charts are plain specs: building plotly figure objects cost ~20 ms per
    image, more than the image encoder. The chart's toolbar keeps 'download as PNG' (offline)."""
    spec = figure if isinstance(figure, dict) else json.loads(figure.to_json())
    layout = spec.get("layout", {})
    config = {**CHART_CONFIG, "toImageButtonOptions": {"format": "png", "filename": div_id}}
    parts = (div_id, spec.get("data", []), layout, config)
    try:
        args = ", ".join(safe_json(x, indent=None) for x in parts)
    except ValueError:  # NaN/inf somewhere: only then pay for the walk that nulls them
        args = ", ".join(safe_json(_finite(x), indent=None) for x in parts)
    height = f"{int(layout['height'])}px" if "height" in layout else "100%"
    return (f'<div id="{escape(div_id)}" class="plotly-graph-div" style="height:{height}; width:100%;"></div>'
            f'<script type="text/javascript">if (document.getElementById({safe_json(div_id)})) '
            f'{{ Plotly.newPlot({args}); }}</script>')
