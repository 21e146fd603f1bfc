"""`vlm-xray serve`: the HTTP API and web page (FastAPI + uvicorn), offline, loopback by default."""
from __future__ import annotations

import click

from .common import UserError, device_option, model_option


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --api-key (or $VLM_XRAY_API_KEY) or --insecure.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@model_option
@click.option("--labels", "-l", "label_sets", multiple=True, metavar="NAME|YAML",
              help="Label set(s) to serve (repeatable; the first is the default). Default: chestxray14.")
@click.option("--adapter", default=None, metavar="DIR", type=click.Path(), help="Few-shot adapter folder.")
@click.option("--calibration", default="auto", show_default=True, metavar="auto|none|JSON",
              help="As for analyze: the model's shipped calibration, none, or a `vlm-xray calibrate` file.")
@device_option
@click.option("--api-key", default=None, metavar="KEY",
              help="Require this key in the X-API-Key header of /v1/* and /metrics (default: $VLM_XRAY_API_KEY).")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without an API key.")
@click.option("--max-upload-mb", default=50.0, show_default=True, type=click.FloatRange(0.001),
              help="Uploads larger than this are refused (413) while streaming.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="Images per encoder call when requests arrive together (1: no micro-batching).")
@click.option("--max-wait-ms", default=10.0, show_default=True, type=click.FloatRange(0),
              help="How long the first request of a batch waits for others.")
@click.option("--max-queue", default=32, show_default=True, type=click.IntRange(1),
              help="Requests waiting for the model; more get 503 with Retry-After.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Allow browser calls from this origin (repeatable). Default: CORS off.")
def serve_cmd(host, port, model, label_sets, adapter, calibration, device, api_key, insecure, max_upload_mb,
              max_batch, max_wait_ms, max_queue, cors_origins):
    """Serve the API (POST /v1/predict, /v1/report, GET /v1/labels, /v1/models, /healthz, /readyz,
    /metrics, /docs) and the web page at http://HOST:PORT/.

    The model loads once at start-up; /readyz answers 200 once the label sets' text embeddings are
    warm. Uploads are decoded in memory / a private temp folder and deleted; nothing is stored.
    Research software, NOT a diagnostic device.
    """
    import uvicorn

    from ..serve.app import create_app
    from ..serve.config import ServeConfig, ServeConfigError, api_key_from

    config = ServeConfig(host=host, port=port, model=model, label_sets=tuple(label_sets) or ("chestxray14",),
                         adapter=adapter, calibration=calibration, device=device, api_key=api_key_from(api_key),
                         insecure=insecure, max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_batch=max_batch,
                         max_wait_ms=max_wait_ms, max_queue=max_queue, cors_origins=tuple(cors_origins))
    try:
        app = create_app(config)
    except ServeConfigError as e:
        raise UserError(str(e)) from e
    click.echo(f"vlm-xray serve: http://{host}:{port}/ (model loading; /readyz turns 200 when ready)", err=True)
    # uvicorn's access log has method, path and status only: never a file name or header value
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
