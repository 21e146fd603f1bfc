"""`vlm-xray serve`: the HTTP API and the web page, in one offline process.

    from vlm.serve import ServeConfig, create_app
    app = create_app(ServeConfig(model="vlm-xray-starter", label_sets=("chestxray14",)))

Pieces: `config` (options and the bind-address safety rule), `uploads` (streamed multipart
reading with a size count, content sniffing, decoding in a private temp dir), `batcher` (the one
model thread and its micro-batching queue), `service` (model, scorers per option set, results,
heatmaps, OOD), `errors` (every error is JSON `{"error", "detail"}`), `app` (the FastAPI factory)
and `page` (the web page and its vendored assets).
"""
from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(*args, **kwargs):
    """The FastAPI application (imports FastAPI and torch lazily; see `vlm.serve.app.create_app`)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
