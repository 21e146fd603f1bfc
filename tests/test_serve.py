"""`vlm-xray serve`: the API contract (every status code), API == CLI numbers, micro-batching that
does not change numbers, privacy of DICOM headers and uploads, security defaults, and an
OpenAPI-driven fuzz run that must find no 5xx. Uses the tiny test model (fast); one test uses the
bundled starter."""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vlm.cli import main  # noqa: E402
from vlm.serve.app import create_app  # noqa: E402
from vlm.serve.config import ServeConfig, ServeConfigError, check_bind  # noqa: E402
from vlm.serve.service import ScoringService  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PHI = ("Doe^Janet", "MRN-98765", "19510203", "St Elsewhere Hospital", "ACC-55501", "Dr^Who")


# ----------------------------------------------------------------------------- inputs

def radiograph_png(seed: int = 0, size: int = 96, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.7 - 0.35 * (((xx - 0.32) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    img = img - 0.35 * (((xx - 0.68) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1) + rng.normal(0, 0.05, img.shape)
    buf = io.BytesIO()
    PILImage.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def dicom_with_identifiers() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI[0], PHI[1], PHI[2]
    ds.InstitutionName, ds.AccessionNumber, ds.ReferringPhysicianName = PHI[3], PHI[4], PHI[5]
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    px = (np.array(PILImage.open(io.BytesIO(radiograph_png(5)))).astype(np.uint16) * 16)
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = px.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def upload(client, data: bytes, name: str = "x.png", ctype: str = "image/png", **fields):
    return client.post("/v1/predict", files={"file": (name, data, ctype)},
                       data={k: str(v) for k, v in fields.items()})


def assert_error(resp, status: int, error: str | None = None) -> dict:
    assert resp.status_code == status, resp.text[:500]
    body = resp.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    if error:
        assert body["error"] == error, body
    return body


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_config(openclip_dir) -> ServeConfig:
    return ServeConfig(model=str(openclip_dir), label_sets=("chestxray14", "chest4"), max_batch=4, max_wait_ms=150,
                       max_upload_bytes=300_000, device="cpu")


@pytest.fixture(scope="module")
def service(tiny_config):
    svc = ScoringService(tiny_config)
    svc.start(background=False)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service, tiny_config):
    with TestClient(create_app(tiny_config, service=service)) as c:
        yield c


# ----------------------------------------------------------------------------- API == CLI

def _cli_json(tmp_path, monkeypatch, name: str, data: bytes, *args) -> dict:
    (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["analyze", name, "--json", "-", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("fields, cli_args", [
    ({}, []),
    ({"threshold": 0.31, "variants": "original,clahe", "prompt_styles": "simple"},
     ["--threshold", "0.31", "--variants", "original,clahe", "--prompt-style", "simple"]),
    ({"labels": "chest4"}, ["--labels", "chest4"]),
])
def test_predict_equals_analyze_json(client, openclip_dir, tmp_path, monkeypatch, fields, cli_args):
    data = radiograph_png(1)
    cli = _cli_json(tmp_path, monkeypatch, "x.png", data, "--model", str(openclip_dir), "--device", "cpu", "--ood", "off",
                    *cli_args)  # the API gives the OOD verdict on request; analyze warns by default
    resp = upload(client, data, "x.png", **fields)
    assert resp.status_code == 200, resp.text
    assert resp.json() == cli  # the whole object, every number bit for bit


def test_bundled_model_api_equals_cli(tmp_path, monkeypatch):
    config = ServeConfig(device="cpu")
    data = (REPO / "examples" / "nih_00000001_000.png").read_bytes()
    cli = _cli_json(tmp_path, monkeypatch, "nih.png", data, "--device", "cpu")
    with TestClient(create_app(config)) as c:
        c.app.state.service.wait_ready(300)
        resp = upload(c, data, "nih.png", ood="warn")
        models = c.get("/v1/models").json()["models"][0]
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body == cli  # the OOD verdict included: analyze and the API both warn by default
    verdict = body["ood"]
    assert verdict["available"] is True and isinstance(verdict["in_distribution"], bool) and verdict["reason"]
    assert models["name"] == "vlm-xray-starter" and "not a diagnostic device" in models["disclaimer"].lower()
    assert models["card"] and models["heatmap_methods"]


def test_batched_requests_equal_single_requests(client, service):
    images = [radiograph_png(10 + i) for i in range(6)]
    single = [upload(client, d, f"b{i}.png").json() for i, d in enumerate(images)]
    before = service.batcher.stats.largest_batch
    service.batcher.stats.largest_batch = 0
    with ThreadPoolExecutor(6) as pool:
        batched = list(pool.map(lambda i: upload(client, images[i], f"b{i}.png").json(), range(6)))
    assert service.batcher.stats.largest_batch > 1, "concurrent requests were not batched"
    service.batcher.stats.largest_batch = max(before, service.batcher.stats.largest_batch)
    assert batched == single


# ----------------------------------------------------------------------------- error contract

def test_size_limit_is_413(client):
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(400_000)
    assert_error(upload(client, big), 413, "too_large")


def test_content_not_header_decides_415(client):
    assert_error(upload(client, b"%PDF-1.7 not an image at all" * 20, "scan.png", "image/png"), 415,
                 "unsupported_media_type")
    assert_error(upload(client, b"hello", "note.txt", "text/plain"), 415)
    # a real PNG sent with a wrong header is accepted: bytes decide
    assert upload(client, radiograph_png(2), "blob.bin", "application/octet-stream").status_code == 200
    assert_error(client.post("/v1/predict", json={"file": "x"}), 415)


@pytest.mark.parametrize("data, words", [
    (b"\x89PNG\r\n\x1a\n" + b"this is not really a png" * 4, "not valid png"),
    (radiograph_png(3, size=16), "small"),
    (png_declaring(30000, 30000), "pixels"),
])
def test_unusable_images_are_422(client, data, words):
    body = assert_error(upload(client, data), 422, "unreadable_image")
    assert words in body["detail"].lower()
    assert "vlm-xray-serve-" not in body["detail"]  # the private temp path is never shown


@pytest.mark.parametrize("fields, words", [
    ({"threshold": "1.5"}, "threshold"), ({"threshold": "abc"}, "threshold"), ({"labels": "mura"}, "not served"),
    ({"variants": "original,sepia"}, "sepia"), ({"ood": "maybe"}, "ood"), ({"surprise": "1"}, "unknown"),
    ({"heatmaps": "perhaps"}, "heatmaps"),
])
def test_bad_options_are_422(client, fields, words):
    body = assert_error(upload(client, radiograph_png(4), **fields), 422)
    assert words in body["detail"]


def test_missing_file_is_422(client):
    assert_error(client.post("/v1/predict", data={"labels": "chestxray14"},
                             files={"other": ("a.png", radiograph_png(0), "image/png")}), 422)


def test_ood_reject_is_422_with_reason(client, service):
    from vlm.ood import OODVerdict

    class FarAway:
        def check_image(self, pixels):
            return OODVerdict(False, 9.0, 3.0, "embedding is far from this model's chest training images", "mahalanobis")

    saved = service.guards["chestxray14"]
    service.guards["chestxray14"] = FarAway()
    try:
        body = assert_error(upload(client, radiograph_png(6), ood="reject"), 422, "out_of_distribution")
        assert "far from" in body["detail"]
        warned = upload(client, radiograph_png(6), ood="warn").json()
        assert warned["ood"]["in_distribution"] is False and "far from" in warned["ood"]["reason"]
    finally:
        service.guards["chestxray14"] = saved


def test_full_queue_is_503_with_retry_after(client, service):
    saved = service.batcher.max_queue
    service.batcher.max_queue = 0
    try:
        resp = upload(client, radiograph_png(7))
    finally:
        service.batcher.max_queue = saved
    assert_error(resp, 503, "busy")
    assert int(resp.headers["Retry-After"]) >= 1


def test_batcher_refuses_beyond_its_queue_and_never_hangs():
    import asyncio
    import threading

    from vlm.serve.batcher import MicroBatcher, QueueFull

    gate = threading.Event()

    def encode(payloads):
        gate.wait(5)
        return [p * 2 for p in payloads]

    batcher = MicroBatcher(encode, max_batch=4, max_wait_s=0.01, max_queue=2)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit_encode(1))
        second = asyncio.ensure_future(batcher.submit_encode(2))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit_encode(3)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(first, second), 5)

    assert asyncio.run(scenario()) == [2, 4]
    batcher.close()


def _recording_batcher(max_wait_s: float, max_batch: int = 8):
    from vlm.serve.batcher import MicroBatcher

    sizes: list[int] = []

    def encode(payloads):
        sizes.append(len(payloads))
        return [p * 10 for p in payloads]

    return MicroBatcher(encode, max_batch=max_batch, max_wait_s=max_wait_s, max_queue=8), sizes


def test_lone_request_is_not_held_for_max_wait():
    import asyncio
    import time

    batcher, sizes = _recording_batcher(max_wait_s=3.0)  # a fixed wait would hold it 3 s

    async def one():
        with batcher.arriving() as arrival:
            return await batcher.submit_encode(4, arrival)

    t0 = time.perf_counter()
    assert asyncio.run(one()) == 40
    assert time.perf_counter() - t0 < 1.0 and sizes == [1]
    batcher.close()


@pytest.mark.parametrize("second_fails", [False, True])
def test_batch_waits_only_for_announced_requests(second_fails):
    """A request still decoding is waited for (one batch of two); one that fails its decode ends
    the wait at once, long before max_wait."""
    import asyncio
    import time

    batcher, sizes = _recording_batcher(max_wait_s=3.0)

    async def request(x: int, decode_s: float, fails: bool = False):
        with batcher.arriving() as arrival:
            await asyncio.sleep(decode_s)
            if fails:
                return None
            return await batcher.submit_encode(x, arrival)

    async def scenario():
        return await asyncio.gather(request(1, 0.0), request(2, 0.3, fails=second_fails))

    t0 = time.perf_counter()
    results = asyncio.run(scenario())
    took = time.perf_counter() - t0
    batcher.close()
    assert took < 2.0, f"waited {took:.2f} s: the batcher ignored who was on the way"
    if second_fails:
        assert results == [10, None] and sizes == [1]
    else:
        assert results == [10, 20] and sizes == [2]


def test_warm_up_leaves_stats_for_requests_only(service):
    """The start-up warm-up (a full batch through the pipeline, on the model thread) is not counted
    as served work; what /readyz reports is requests."""
    fresh = ScoringService(service.config)
    fresh.start(background=False)
    try:
        assert fresh.batcher.stats.to_dict()["images"] == 0 and fresh.batcher.stats.calls == 0
    finally:
        fresh.close()


def test_not_ready_is_503(tiny_config):
    svc = ScoringService(tiny_config)  # never started
    c = TestClient(create_app(tiny_config, service=svc))
    assert c.get("/healthz").json() == {"status": "ok"}
    resp = c.get("/readyz")
    assert_error(resp, 503, "not_ready")
    assert resp.headers["Retry-After"]
    assert_error(upload(c, radiograph_png(0)), 503, "not_ready")
    svc.close()


def test_unknown_routes_and_methods_are_json(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed")
    assert_error(client.post("/v1/report/from-result", json={"image": 3}), 422, "invalid_request")


# ----------------------------------------------------------------------------- privacy

def test_dicom_identifiers_never_reach_responses_or_logs(client, service, caplog):
    data = dicom_with_identifiers()
    with caplog.at_level(logging.DEBUG):
        resp = upload(client, data, "study.dcm", "application/dicom", heatmaps="true", threshold=0.0, ood="warn")
        report = client.post("/v1/report", files={"file": ("study.dcm", data, "application/dicom")})
    assert resp.status_code == 200, resp.text
    assert resp.json()["view"] == "PA"
    text = resp.text + report.text + caplog.text
    for value in PHI:
        assert value not in text and value.replace("^", " ") not in text
    assert list(service.uploads.root.iterdir()) == []  # uploads are deleted once decoded
    assert oct(service.uploads.root.stat().st_mode & 0o777) == "0o700"


# ----------------------------------------------------------------------------- features

def test_heatmaps_are_png_overlays_per_positive_finding(client):
    body = upload(client, radiograph_png(8), threshold=0.0, heatmaps="true").json()
    positives = [f["label"] for f in body["findings"] if f["positive"]]
    assert sorted(h["label"] for h in body["heatmaps"]) == sorted(positives)
    for h in body["heatmaps"][:3]:
        png = PILImage.open(io.BytesIO(base64.b64decode(h["png_base64"])))
        assert png.format == "PNG" and png.size == (96, 96)
    base = PILImage.open(io.BytesIO(base64.b64decode(body["heatmap_base_png_base64"])))
    assert base.size == (96, 96)
    none = upload(client, radiograph_png(8), threshold=1.0, heatmaps="true").json()
    assert none["heatmaps"] == []


def test_reports_labels_models_metrics_docs(client):
    report = client.post("/v1/report", files={"file": ("r.png", radiograph_png(9), "image/png")},
                         data={"clinical": "<script>alert(1)</script> 65M cough"})
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "Content-Security-Policy" in report.text and "<script>alert(1)" not in report.text
    with_maps = client.post("/v1/report", files={"file": ("r.png", radiograph_png(9), "image/png")},
                            data={"threshold": "0", "heatmaps": "true"})
    assert with_maps.status_code == 200 and "data:image/png;base64," in with_maps.text
    result = upload(client, radiograph_png(9), "r.png", ood="off").json()  # (a random tiny model: no verdict)
    again = client.post("/v1/report/from-result", json=result)
    assert again.status_code == 200 and "r.png" in again.text and "ood-warning" not in again.text
    flagged = client.post("/v1/report/from-result",
                          json={**result, "ood": {"in_distribution": False, "reason": "looks like a photograph"}})
    assert flagged.status_code == 200 and "ood-warning" in flagged.text and "looks like a photograph" in flagged.text
    labels = client.get("/v1/labels").json()
    assert labels["default"] == "chestxray14" and len(labels["label_sets"][0]["labels"]) == 14
    card = client.get("/v1/models").json()["models"][0]
    assert card["label_sets"] == ["chestxray14", "chest4"] and "disclaimer" in card
    metrics = client.get("/metrics").text
    assert "http_requests_total" in metrics and "vlm_model_queue_depth" in metrics
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]


def test_page_has_csp_disclaimer_and_card_and_no_external_urls(client):
    page = client.get("/")
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "Not a diagnostic device" in page.text and "Model card" in page.text
    for asset in ("/static/app.js", "/static/app.css", "/static/plotly.min.js"):
        assert client.get(asset).status_code == 200
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/app.css").text):
        assert "http://" not in text and "https://" not in text


# ----------------------------------------------------------------------------- security defaults

def test_public_bind_needs_api_key_or_insecure():
    with pytest.raises(ServeConfigError, match="api-key"):
        check_bind(ServeConfig(host="0.0.0.0"))
    check_bind(ServeConfig(host="0.0.0.0", api_key="k"))
    check_bind(ServeConfig(host="0.0.0.0", insecure=True))
    check_bind(ServeConfig(host="::1"))
    res = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"], env={"VLM_XRAY_API_KEY": ""})
    assert res.exit_code == 2 and "--insecure" in res.output


def test_api_key_is_required_when_configured(tiny_config, service):
    config = ServeConfig(**{**tiny_config.__dict__, "api_key": "s3cret"})
    c = TestClient(create_app(config, service=service))
    assert_error(c.get("/v1/labels"), 401, "unauthorized")
    assert_error(c.get("/v1/labels", headers={"X-API-Key": "wrong"}), 401)
    assert_error(c.get("/metrics"), 401)
    assert c.get("/v1/labels", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200


def test_cors_is_off_unless_configured(client, tiny_config, service):
    origin = {"Origin": "http://evil.example"}
    assert "access-control-allow-origin" not in client.get("/v1/labels", headers=origin).headers
    config = ServeConfig(**{**tiny_config.__dict__, "cors_origins": ("http://lab.example",)})
    c = TestClient(create_app(config, service=service))
    allowed = c.get("/v1/labels", headers={"Origin": "http://lab.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://lab.example"
    assert "access-control-allow-origin" not in c.get("/v1/labels", headers=origin).headers


# ----------------------------------------------------------------------------- fuzzing

def test_openapi_fuzz_finds_no_server_errors(service, tiny_config):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error

    app = create_app(tiny_config, service=service)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    for op in schema.get_all_operations():
        operation = op.ok()

        @settings(max_examples=10, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case):
            resp = case.call()
            if resp.status_code >= 500:
                failures.append(f"{case.method} {case.path}: {resp.status_code} {resp.text[:200]}")
            case.validate_response(resp, checks=[not_a_server_error])
            ctype = resp.headers.get("content-type") or [""]
            if resp.status_code >= 400 and str(ctype[0] if isinstance(ctype, list) else ctype).startswith("application/json"):
                assert set(json.loads(resp.content)) == {"error", "detail"}

        given(operation.as_strategy())(run)()
    assert not failures, failures
