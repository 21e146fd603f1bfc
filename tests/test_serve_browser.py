"""End to end in a real headless Chromium: the page served by `vlm-xray serve` on a free loopback
port, driven by Playwright. Upload an image, 14 findings render, the threshold slider changes calls
with no new /v1/predict request, each tab opens, the downloaded JSON equals the API's answer.

Skips (with the reason) only when /usr/bin/chromium or the playwright package is absent;
`.ci/run` installs Debian's chromium first. `playwright install` is never needed."""
from __future__ import annotations

import csv
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih14-lowres"

if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is absent (install Debian's chromium: apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
uvicorn = pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(tmp_path: Path) -> Path:
    """A shared chest radiograph when ../shared/data is there, else a generated chest-like image."""
    shared = sorted(SHARED_IMAGES.glob("*.jpg"))[:1] if SHARED_IMAGES.is_dir() else []
    if shared:
        return shared[0]
    yy, xx = np.mgrid[0:128, 0:128] / 128
    img = 0.7 - 0.35 * (((xx - 0.32) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    img = img - 0.35 * (((xx - 0.68) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    path = tmp_path / "generated_chest.png"
    PILImage.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def server(openclip_dir):
    from vlm.serve.app import create_app
    from vlm.serve.config import ServeConfig
    from vlm.serve.service import ScoringService

    config = ServeConfig(model=str(openclip_dir), port=_free_port(), device="cpu", max_wait_ms=1)
    service = ScoringService(config)
    service.start(background=False)
    app = create_app(config, service=service)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}"
    srv.should_exit = True
    thread.join(10)
    service.close()


def test_page_end_to_end(server, tmp_path):
    image = _image(tmp_path)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        errors, requests, external = [], [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: (requests.append(r.url), None if r.url.startswith(server) or
                                      r.url.startswith(("data:", "blob:")) else external.append(r.url)))
        page.goto(server + "/")
        assert "Not a diagnostic device" in page.inner_text(".disclaimer")
        assert "Model card" in page.inner_text(".model-card")

        with page.expect_response(lambda r: r.url.endswith("/v1/predict")) as answer:
            page.set_input_files("#file-input", str(image))
            page.click("#analyze")
        predicted = answer.value.json()
        assert answer.value.status == 200
        page.wait_for_selector("tr.finding-row")
        assert page.locator("tr.finding-row").count() == 14

        def calls() -> list[str]:
            return page.locator("tr.finding-row .call").all_inner_texts()

        n_predict = sum(u.endswith("/v1/predict") for u in requests)
        page.locator("#threshold").fill("0")
        low = calls()
        page.locator("#threshold").fill("1")
        high = calls()
        assert low == ["POSITIVE"] * 14 and high == ["negative"] * 14
        assert sum(u.endswith("/v1/predict") for u in requests) == n_predict  # re-classified in the browser
        assert page.inner_text("#threshold-value") == "1.00"

        page.click("#tab-vis")
        assert page.is_visible("#panel-vis") and not page.is_visible("#panel-report")
        page.wait_for_selector("#chart-probabilities .main-svg")
        page.click("#tab-report")
        assert page.is_visible("#panel-report")
        page.click("#tab-download")
        assert page.is_visible("#panel-download")

        with page.expect_download() as dl:
            page.click("#dl-json")
        downloaded = json.loads(Path(dl.value.path()).read_text())
        core = {k: v for k, v in predicted.items() if k not in ("charts", "heatmaps", "heatmap_base_png_base64")}
        assert downloaded == core
        with page.expect_download() as dl:
            page.click("#dl-csv")
        rows = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
        assert len(rows) == 14 and {r["positive"] for r in rows} == {"false"}  # the slider's threshold (1.0)
        assert [float(r["probability"]) for r in rows] == [f["probability"] for f in predicted["findings"]]
        with page.expect_download() as dl:
            page.click("#dl-html")
        assert "AI-assisted findings" in Path(dl.value.path()).read_text()

        # a rejected file gives a clear error banner, not a broken page
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"not an image at all" * 10)
        page.set_input_files("#file-input", str(bad))
        page.click("#analyze")
        page.wait_for_selector(".banner.error")
        assert "Not a supported image" in page.inner_text(".banner.error")
        browser.close()
    assert not external, f"the page requested other origins: {external}"
    unexpected = [e for e in errors if "status of 415" not in e]  # the rejected file's answer is expected
    assert not unexpected, unexpected
