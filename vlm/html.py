"""Shared HTML plumbing: one Jinja environment (autoescape on), offline plotly.

Reports must open in a browser with no network: plotly.js is either inlined once per page
or written once per output folder as `assets/plotly.min.js` and referenced relatively.
Never a CDN.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2

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


def figure_div(fig, div_id: str) -> str:
    """A plotly figure as a <div> + script, without plotly.js itself (the page includes it once).

    The chart's own toolbar keeps 'download as PNG' (works offline in the browser)."""
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True,
                               "toImageButtonOptions": {"format": "png", "filename": div_id}})
