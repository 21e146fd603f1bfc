"""The web page at `/` and its vendored assets (no CDN: plotly.js is the copy the reports inline).

The page is one autoescaped Jinja template (`templates/serve/index.html.j2`) plus `app.js` and
`app.css` next to it, all served by this process under a strict Content-Security-Policy: scripts
and connections only to this origin, images from data: URIs (heatmaps), no frames, no forms posted
elsewhere.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from .errors import ApiError

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
            "font-src 'self' data:; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}


@lru_cache(maxsize=4)
def _asset(name: str) -> bytes:
    if name == "plotly.min.js":
        from ..html import plotly_js

        return plotly_js().encode("utf-8")
    return (resources.files("vlm.templates") / "serve" / name).read_bytes()


def page_context(service) -> dict:
    from ..report import DISCLAIMER, model_info

    c = service.config
    ready = service.ready.is_set()
    info = model_info(service.backbone) if ready else None
    if info:  # card excerpt lines that are sentences, not stray headings or names
        info["card_lines"] = [line for line in info["card_lines"] if len(line.split()) >= 4]
    return {"ready": ready, "load_error": service.load_error, "model": info,
            "label_sets": list(service.label_sets) if ready else list(c.label_sets),
            "calibration": getattr(service.base.calibration, "source", None) if ready else None,
            "variants": list(service.base.variants) if ready else [],
            "disclaimer": DISCLAIMER, "max_upload_mb": c.max_upload_bytes / 2**20, "api_key_required": bool(c.api_key)}


def add_page_routes(app: FastAPI, service) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        from ..html import render

        html = render("serve/index.html.j2", **page_context(service))
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in ASSETS and name != "plotly.min.js":
            raise ApiError(404, "not_found", f"no asset {name[:60]!r}")
        media = ASSETS.get(name, "text/javascript; charset=utf-8")
        return Response(_asset(name), media_type=media,
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
