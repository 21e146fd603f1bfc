"""The FastAPI application: routes, API-key check, CORS, metrics, and the request pipeline.

    app = create_app(ServeConfig(...))          # loads the model in the background at start-up
    app = create_app(config, service=svc)       # tests: a service already started

Routes: POST /v1/predict, POST /v1/report, GET /v1/labels, GET /v1/models, GET /healthz,
GET /readyz, GET /metrics (Prometheus), /docs and /openapi.json, the page at / (see `page`).
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .batcher import QueueFull
from .config import API_KEY_HEADER, ServeConfig, check_bind
from .errors import ApiError, install_handlers
from .service import OOD_MODES, ScoringService, parse_options
from .uploads import ACCEPTED, read_upload_form

logger = logging.getLogger(__name__)

_FORM_FIELDS = {
    "file": {"type": "string", "format": "binary", "description": f"The image: {ACCEPTED}. Identified by content."},
    "labels": {"type": "string", "description": "Label set (one of GET /v1/labels). Default: the server's first."},
    "threshold": {"type": "number", "minimum": 0, "maximum": 1,
                  "description": "Probability at or above which a finding is positive. Default: the calibration's "
                                 "per-label thresholds, else 0.5 (as `vlm-xray analyze`)."},
    "prompt_styles": {"type": "string", "description": "Comma-separated prompt styles. Default: all of the label set."},
    "variants": {"type": "string", "description": "Comma-separated preprocessing variants. Default: as analyze."},
    "heatmaps": {"type": "boolean", "description": "Add a base64 PNG overlay per positive finding."},
    "heatmap_alpha": {"type": "number", "minimum": 0, "maximum": 1, "description": "Overlay opacity (0.45)."},
    "ood": {"type": "string", "enum": list(OOD_MODES),
            "description": "Out-of-distribution guard: off (default), warn (verdict in `ood`, as analyze's default), reject (422)."},
    "charts": {"type": "boolean", "description": "Add the report's plotly figures (JSON) under `charts`."},
}
_ERROR_SCHEMA = {"type": "object", "required": ["error", "detail"],
                 "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}


def _upload_body(extra: dict | None = None) -> dict:
    props = {**_FORM_FIELDS, **(extra or {})}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"], "properties": props}}}}}


def _errors(*codes: int) -> dict:
    words = {401: "missing or wrong API key", 413: "upload over the size limit", 415: "not a supported image",
             422: "undecodable, too small, bomb-sized, OOD-rejected image or a bad option",
             503: "model not ready or queue full (see Retry-After)"}
    return {c: {"description": words[c], "content": {"application/json": {"schema": _ERROR_SCHEMA}}} for c in codes}


def _api_key_check(config: ServeConfig):
    async def check(request: Request) -> None:
        if not config.api_key:
            return
        sent = request.headers.get(API_KEY_HEADER) or ""
        auth = request.headers.get("authorization", "")
        if not sent and auth.lower().startswith("bearer "):
            sent = auth[7:]
        if not hmac.compare_digest(sent.encode(), config.api_key.encode()):
            raise ApiError(401, "unauthorized", f"send the server's API key in the {API_KEY_HEADER} header")
    return check


def _require_ready(service: ScoringService) -> None:
    if service.load_error:
        raise ApiError(503, "model_failed", f"the model failed to load: {service.load_error}")
    if not service.ready.is_set():
        raise ApiError(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "5"})


async def _score_upload(service: ScoringService, request: Request) -> tuple[dict, object, dict]:
    """multipart request -> (result dict, ImageResult, form fields): the whole predict pipeline."""
    _require_ready(service)
    t0 = time.perf_counter()
    form = await read_upload_form(request, service.config.max_upload_bytes)
    opts = parse_options(form.fields, next(iter(service.label_sets)))
    scorer = await service.scorer_for(opts)
    try:
        with service.batcher.arriving() as arrival:  # the model thread may wait for it while it decodes
            kind, image, tensors = await service.off_loop(service.decode, form.file, scorer)
            embeddings = await service.batcher.submit_encode(tensors, arrival)
    except QueueFull as e:
        raise ApiError(503, "busy", f"{service.batcher.pending} requests are waiting for the model; retry later",
                       {"Retry-After": str(e.retry_after_s)}) from None
    result = await service.off_loop(service.result, scorer, image, embeddings, form.filename, opts.threshold)
    out = result.to_dict()
    if opts.ood != "off":
        try:  # on the model thread: the full check encodes the image once more, with stage-feature hooks
            out["ood"] = await service.batcher.submit_call(lambda: service.ood_verdict(scorer.label_set.name, image))
        except QueueFull as e:
            raise ApiError(503, "busy", "the model queue is full; retry later",
                           {"Retry-After": str(e.retry_after_s)}) from None
        if opts.ood == "reject" and out["ood"]["in_distribution"] is not True:
            raise ApiError(422, "out_of_distribution", out["ood"]["reason"])
    if opts.heatmaps:
        try:
            out.update(await service.batcher.submit_call(
                lambda: service.heatmaps(scorer, image, result, opts.heatmap_alpha)))
        except QueueFull as e:
            raise ApiError(503, "busy", "the model queue is full; retry later",
                           {"Retry-After": str(e.retry_after_s)}) from None
    if form.fields.get("charts", "").strip().lower() in ("1", "true", "yes", "on"):
        out["charts"] = await run_in_threadpool(_charts, result)
    logger.info("scored a %s upload (%d bytes, %dx%d) in %.0f ms", kind, len(form.file), *image.size,
                1000 * (time.perf_counter() - t0))
    return out, result, form.fields


def _charts(result) -> dict:
    from ..report import chart_specs

    return chart_specs(result)


def _model_card(service: ScoringService) -> dict:
    from ..explain import methods_for
    from ..report import model_info

    info = model_info(service.backbone)
    guards = {n: (g.describe() if not isinstance(g, str) else {"available": False, "reason": g})
              for n, g in service.guards.items()}
    try:
        methods = methods_for(service.backbone)
    except Exception as e:  # noqa: BLE001 - an unknown tower: heatmaps unavailable, said so
        methods = [f"unavailable: {e}"]
    return {"name": info["name"], "layout": info["layout"], "fingerprint": info["fingerprint"],
            "card": getattr(service.backbone, "card", None) or "", "card_summary": info["card_lines"],
            "performance": info["card_performance"], "adapter": service.base.adapter_name,
            "calibration": getattr(service.base.calibration, "source", None), "variants": service.base.variants,
            "heatmap_methods": methods, "ood": guards, "label_sets": list(service.label_sets),
            "disclaimer": "Research software, not a diagnostic device: never use its output for patient care."}


def _label_sets(service: ScoringService) -> dict:
    sets = []
    for name, ls in service.label_sets.items():
        sets.append({"name": name, "display_name": ls.display_name, "description": ls.description,
                     "multilabel": ls.multilabel, "prompt_styles": ls.styles(None),
                     "labels": [{"name": lab.name, "display": lab.display, "category": lab.category,
                                 "severity": lab.severity, "description": lab.description} for lab in ls.labels]})
    return {"default": next(iter(service.label_sets), None), "label_sets": sets}


def _attach_extras(result, out: dict) -> None:
    """The OOD verdict and heatmap overlays of a request, in the fields the HTML report shows them from."""
    if (out.get("ood") or {}).get("available"):
        result.ood = {k: v for k, v in out["ood"].items() if k != "available"}
    result.heatmaps = [{**{k: v for k, v in h.items() if k != "png_base64"},
                        "data_uri": "data:image/png;base64," + h["png_base64"]} for h in out.get("heatmaps", [])]


class OODIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    in_distribution: bool | None = None
    reason: str = Field("", max_length=2000)


class FindingIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    label: str = Field(max_length=200)
    probability: float = Field(ge=0, le=1)
    uncertainty: float = Field(ge=0, le=1)
    positive: bool
    threshold: float = Field(ge=0, le=1)
    display: str = Field("", max_length=200)
    category: str = Field("", max_length=200)
    severity: int = Field(1, ge=0, le=10)


class ResultIn(BaseModel):
    """The `/v1/predict` (= `analyze --json`) object, as the page sends it back for its report."""
    model_config = ConfigDict(extra="ignore")
    image: str = Field(max_length=500)
    image_id: str = Field(max_length=200)
    model: str = Field(max_length=500)
    label_set: str = Field(max_length=200)
    threshold: float | None = Field(None, ge=0, le=1)
    variants: list[str] = Field(max_length=32)
    prompt_styles: list[str] = Field(max_length=32)
    findings: list[FindingIn] = Field(min_length=1, max_length=500)
    per_variant: dict[str, dict[str, dict[str, float]]]
    view: str | None = Field(None, max_length=20)
    size: list[int] | None = Field(None, max_length=2)
    input_warnings: list[str] = Field(default_factory=list, max_length=50)
    adapter: str | None = Field(None, max_length=500)
    calibration: str | None = Field(None, max_length=500)
    clinical: str | None = Field(None, max_length=2000)
    ood: OODIn | None = None


def _check_consistent(body: ResultIn) -> None:
    """The report reads per_variant[variant][style][label] for every finding: all must be there."""
    labels = [f.label for f in body.findings]
    problems = []
    if len(set(labels)) != len(labels):
        problems.append("finding labels repeat")
    if list(body.per_variant) != body.variants:
        problems.append("per_variant keys differ from variants")
    for variant, styles in body.per_variant.items():
        if list(styles) != body.prompt_styles:
            problems.append(f"per_variant[{variant[:40]!r}] keys differ from prompt_styles")
        elif any(set(probs) != set(labels) for probs in styles.values()):
            problems.append(f"per_variant[{variant[:40]!r}] labels differ from the findings")
    if not body.variants or not body.prompt_styles:
        problems.append("variants and prompt_styles must not be empty")
    if problems:
        raise ApiError(422, "invalid_request", "inconsistent result object: " + "; ".join(problems[:3]))


def _render_result(service: ScoringService, body: ResultIn) -> str:
    from ..report import model_info, render_report
    from ..results import ImageResult

    data = body.model_dump()
    clinical = data.pop("clinical", None)
    _check_consistent(body)
    try:
        result = ImageResult.from_dict(data)
        return render_report(result, model_info(service.backbone), clinical)
    except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError, jinja2.UndefinedError) as e:
        # per_variant, findings and variants that contradict each other: the client's object, not our fault
        raise ApiError(422, "invalid_request", f"inconsistent result object ({type(e).__name__}: {e})"[:300]) from None


def create_app(config: ServeConfig | None = None, service: ScoringService | None = None) -> FastAPI:
    config = config or ServeConfig()
    check_bind(config)
    owned = service is None  # a service passed in belongs to the caller, who starts and closes it
    service = service or ScoringService(config)

    @asynccontextmanager
    async def lifespan(_app):
        if owned:
            service.start(background=True)
        yield
        if owned:
            service.close()

    app = FastAPI(title="vlm-xray", version="0.1.0", lifespan=lifespan,
                  description="Zero-shot chest X-ray (and other) findings from CLIP-style models. Research "
                              "software, NOT a diagnostic device. POST an image to /v1/predict.")
    app.state.service = service
    install_handlers(app)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=[API_KEY_HEADER, "Content-Type"])
    guarded = [Depends(_api_key_check(config))]
    _instrument(app, service, guarded)
    _api_routes(app, service, guarded)
    from .page import add_page_routes

    add_page_routes(app, service)
    return app


def _instrument(app: FastAPI, service: ScoringService, guarded: list) -> None:
    from prometheus_client import CollectorRegistry, Gauge
    from prometheus_fastapi_instrumentator import Instrumentator

    registry = CollectorRegistry()  # one per app, so several apps (tests) never collide
    queue = Gauge("vlm_model_queue_depth", "requests waiting for the model thread", registry=registry)
    queue.set_function(lambda: service.batcher.pending if service.batcher else 0)
    mean = Gauge("vlm_mean_batch_size", "mean images per encoder call since start", registry=registry)
    mean.set_function(lambda: (service.batcher.stats.to_dict()["mean_batch"] or 0) if service.batcher else 0)
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app).expose(
        app, endpoint="/metrics", include_in_schema=True, dependencies=guarded)


def _api_routes(app: FastAPI, service: ScoringService, guarded: list) -> None:
    @app.post("/v1/predict", dependencies=guarded, openapi_extra=_upload_body(),
              responses=_errors(401, 413, 415, 422, 503), summary="Score one image (the analyze --json object)")
    async def predict(request: Request):
        out, _result, _fields = await _score_upload(service, request)
        # serialised off the event loop: with heatmaps the body is megabytes and /healthz must stay fast
        body = await service.off_loop(json.dumps, out, ensure_ascii=False)
        return Response(body, media_type="application/json")

    @app.post("/v1/report", dependencies=guarded, response_class=HTMLResponse,
              openapi_extra=_upload_body({"clinical": {"type": "string", "description": "Clinical information."}}),
              responses=_errors(401, 413, 415, 422, 503), summary="Score one image; the HTML report (analyze --html)")
    async def report(request: Request):
        from ..report import model_info, render_report

        out, result, fields = await _score_upload(service, request)
        _attach_extras(result, out)
        clinical = (fields.get("clinical") or "").strip()[:2000] or None
        html = await run_in_threadpool(render_report, result, model_info(service.backbone), clinical)
        return HTMLResponse(html, headers={"Content-Disposition": f'inline; filename="{result.image_id}.html"'})

    @app.post("/v1/report/from-result", dependencies=guarded, response_class=HTMLResponse,
              responses=_errors(401, 422, 503), summary="The HTML report of a result object (e.g. from /v1/predict)")
    async def report_from_result(body: ResultIn):
        _require_ready(service)
        return HTMLResponse(await run_in_threadpool(_render_result, service, body))

    @app.get("/v1/labels", dependencies=guarded, summary="Served label sets and their labels")
    async def labels():
        _require_ready(service)
        return _label_sets(service)

    @app.get("/v1/models", dependencies=guarded, summary="The served model and its card")
    async def models():
        _require_ready(service)
        return {"models": [_model_card(service)]}

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: model loaded, label-set text embeddings warmed",
             responses=_errors(503))
    async def readyz():
        _require_ready(service)
        stats = service.batcher.stats.to_dict() if service.batcher else {}
        return {"status": "ready", "model": service.backbone.name, "label_sets": list(service.label_sets),
                "queue": service.batcher.pending, "batches": stats}
