"""Shared HTML plumbing: one Jinja environment (autoescape on), offline plotly, atomic writes.

Reports must open in a browser with no network: plotly.js is either inlined once per page
or written once per output folder as `assets/plotly.min.js` and referenced relatively.
Never a CDN.
"""
from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2

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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder + rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal file permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
