"""The CLI exposes what the library does: the OOD guard (warn/reject/off), heatmaps in reports and
JSON, `vlm-xray explain`, and the input options."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image as PILImage, ImageDraw

from vlm.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nih_00000001_000.png"


def _document(path: Path) -> Path:
    """A rendered text page: the kind of upload the chest label set must not score silently."""
    img = PILImage.new("L", (320, 400), 255)
    draw = ImageDraw.Draw(img)
    for i in range(24):
        draw.text((12, 10 + 16 * i), f"Line {i}: patient letter, lorem ipsum dolor sit amet {i * 7}", fill=0)
    img.save(path)
    return path


def _run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [*map(str, args), "--device", "cpu"])
    return r.exit_code, r.output


def _json(*args):
    r = CliRunner().invoke(main, [*map(str, args), "--json", "-", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_ood_warn_reject_off_on_the_bundled_model(tmp_path):
    doc = _document(tmp_path / "letter.png")
    results = _json("analyze", doc, EXAMPLE, "--variants", "original")
    verdicts = {Path(r["image"]).name: r["ood"] for r in results}
    assert verdicts["letter.png"]["in_distribution"] is False and verdicts["letter.png"]["reason"]
    assert verdicts[EXAMPLE.name]["in_distribution"] is True
    code, out = _run("analyze", doc, EXAMPLE, "--variants", "original", "--ood", "reject")
    assert code == 1 and "letter.png" in out and "out of distribution" in out
    assert "WARNING" not in out  # the chest X-ray passed and was scored
    assert "ood" not in _json("analyze", doc, "--variants", "original", "--ood", "off")


def test_analyze_heatmaps_in_json_and_html(tmp_path):
    html = tmp_path / "out" / "report.html"
    code, out = _run("analyze", EXAMPLE, "--threshold", "0.2", "--variants", "original", "--heatmaps",
                     "--html", html, "--json", tmp_path / "out" / "r.json")
    assert code == 0, out
    d = json.loads((tmp_path / "out" / "r.json").read_text())
    positives = {f["label"] for f in d["findings"] if f["positive"]}
    assert positives and {h["label"] for h in d["heatmaps"]} == positives
    for h in d["heatmaps"]:
        assert Path(h["files"]["png"]).is_file() and "data_uri" not in h
    page = html.read_text()
    assert "regions that raised" in page.lower() and page.count("data:image/png;base64,") >= len(positives)


def test_explain_writes_overlays_that_differ_by_label(tmp_path):
    code, out = _run("explain", EXAMPLE, "--label", "Cardiomegaly", "--label", "Effusion", "--out", tmp_path, "--npy")
    assert code == 0, out
    maps = {p.name.split(".")[1]: np.load(p) for p in tmp_path.glob("*.npy")}
    assert set(maps) == {"Cardiomegaly", "Effusion"} and len(list(tmp_path.glob("*.png"))) == 2
    assert not np.allclose(maps["Cardiomegaly"], maps["Effusion"])
    code, out = _run("explain", EXAMPLE, "--label", "NotALabel", "--out", tmp_path)
    assert code == 2 and "NotALabel" in out


def test_max_pixels_refuses_a_large_image_and_the_batch_goes_on(tmp_path):
    PILImage.fromarray(np.full((400, 400), 128, np.uint8)).save(tmp_path / "big.png")  # 160,000 px
    code, out = _run("analyze", tmp_path / "big.png", EXAMPLE, "--max-pixels", "150000", "--variants", "original",
                     "--ood", "off")  # the example is 384 x 384 = 147,456 px
    assert code == 1 and "big.png: image is 400x400" in out and "--max-pixels" in out
    assert f"{EXAMPLE.name}  (model vlm-xray-starter" in out  # the good image was scored


def test_the_console_entry_point_keeps_exit_codes_and_output_with_its_fast_exit(tmp_path):
    """`vlm-xray` (vlm.cli:run) skips the interpreter teardown: exit codes (0 / 1 some inputs failed /
    2 usage), piped stdout and files written must all be as with a normal exit."""
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "vlm.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    ok = cli("labels")
    assert ok.returncode == 0 and "chestxray14" in ok.stdout
    out = tmp_path / "r.json"
    scored = cli("analyze", EXAMPLE, tmp_path / "missing.png", "--json", out, "--device", "cpu")
    assert scored.returncode == 1 and "file not found" in scored.stderr
    assert json.loads(out.read_text())[0]["findings"]  # written and complete before the fast exit
    usage = cli("analyze")
    assert usage.returncode == 2 and "Missing argument" in usage.stderr
