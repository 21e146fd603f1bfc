"""Structured reports (vlm.report): sections, impression order, confidence, escaping, analyze --html."""
import base64
import json
import re
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from vlm.cli import main
from vlm.report import assess, md_escape, model_info, render_report, safe_json
from vlm.results import Finding, ImageResult

HOSTILE = "<script>alert(1)</script>"


def make_result(threshold=0.5, hostile=False, adapter=None, calibration=None, positives=True):
    """Four findings in three categories; per-variant scores whose mean/agreement we know."""
    t = 0.5 if threshold is None else threshold
    spec = [  # label, display, category, severity, scores over 2 variants x 2 styles
        ("Effusion", "Pleural effusion", "Pleura", 2, [0.80, 0.82, 0.78, 0.80]),
        ("Mass", "Lung mass", "Lung masses & nodules", 3, [0.90, 0.20, 0.85, 0.25]),  # disagree
        ("Nodule", "Lung nodule", "Lung masses & nodules", 3, [0.60, 0.62, 0.58, 0.60]),
        ("Hernia", "Hiatal hernia", "Diaphragm & abdomen", 1, [0.95, 0.93, 0.97, 0.95]),
        ("Edema", "Pulmonary edema", "Airspace", 2, [0.10, 0.12, 0.08, 0.10]),
    ]
    if not positives:
        spec = [(a, b, c, d, [0.1, 0.1, 0.1, 0.1]) for a, b, c, d, _ in spec]
    per_variant = {v: {s: {} for s in ("detailed", "simple")} for v in ("original", "clahe")}
    findings = []
    for i, (label, display, cat, sev, scores) in enumerate(spec):
        for (v, s), p in zip([(v, s) for v in ("original", "clahe") for s in ("detailed", "simple")], scores):
            per_variant[v][s][label] = p
        mean = sum(scores) / 4
        std = (sum((x - mean) ** 2 for x in scores) / 4) ** 0.5
        thr = t if threshold is not None else 0.3 + 0.05 * i
        if hostile and label == "Edema":
            display = HOSTILE + " | *edema* [x](javascript:alert(2))"
        findings.append(Finding(label, mean, std, mean >= thr, thr, display, cat, sev))
    image = f"/data/{HOSTILE}.png" if hostile else "/data/patient_cxr.png"
    return ImageResult(image=image, image_id="patient_cxr-0123abcd", model="tiny-model", label_set="chestxray14",
                       threshold=threshold, variants=["original", "clahe"], prompt_styles=["detailed", "simple"],
                       findings=findings, per_variant=per_variant, view="PA", size=(96, 96), adapter=adapter,
                       calibration=calibration)


def section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def md_section(md: str, title: str) -> str:
    m = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", md, re.S | re.M)
    assert m, f"section {title} missing"
    return m.group(1)


@pytest.fixture(scope="module")
def html():
    return render_report(make_result(), clinical="Cough for 3 weeks.", fmt="html", plotly_src="assets/plotly.min.js")


def test_html_has_all_sections_and_banner(html):
    for sid in ("header", "technique", "clinical", "findings", "impression", "confidence", "limitations"):
        assert f'id="{sid}"' in html
    assert "NOT A DIAGNOSTIC DEVICE" in html
    head = html[: html.index('<section id="technique">')]
    for text in ("patient_cxr.png", "tiny-model", "chestxray14", "0.50", "UTC"):
        assert text in head
    tech = section(html, "technique")
    assert "PA" in tech and "original" in tech and "clahe" in tech and "detailed" in tech and "simple" in tech
    assert "Cough for 3 weeks." in section(html, "clinical")
    # three plotly charts, plotly.js referenced locally once, nothing from a CDN
    assert html.count('class="plotly-graph-div"') == 3
    assert html.count('<script src="assets/plotly.min.js"></script>') == 1
    assert not re.search(r"<script[^>]+src=[\"']https?:", html)


def test_findings_grouped_by_category_in_label_order(html):
    f = section(html, "findings")
    cats = re.findall(r"<h3>(.*?)</h3>", f)
    assert cats == ["Pleura", "Lung masses &amp; nodules", "Diaphragm &amp; abdomen", "Airspace"]
    masses = f.split("<h3>")[2]
    assert "Lung mass" in masses and "Lung nodule" in masses and "Pleural effusion" not in masses


def test_impression_in_priority_order_html_and_md(html):
    imp = section(html, "impression")
    items = re.findall(r"<li><strong>(.*?)</strong>", imp)
    # severity 3 (mass 0.55, nodule 0.60 -> nodule first), then 2 (effusion), then 1 (hernia); edema negative
    assert items == ["Lung nodule", "Lung mass", "Pleural effusion", "Hiatal hernia"]
    md = render_report(make_result(), fmt="md")
    lines = [ln for ln in md_section(md, "Impression").splitlines() if re.match(r"\d+\. ", ln)]
    assert [re.search(r"\*\*(.*?)\*\*", ln).group(1) for ln in lines] == items
    assert "high priority" in lines[0] and "low priority" in lines[-1]


def test_no_finding_above_threshold():
    r = make_result(positives=False)
    assert "No finding above threshold" in section(render_report(r, plotly_src="x.js"), "impression")
    assert "No finding above threshold" in md_section(render_report(r, fmt="md"), "Impression")


def test_confidence_agreement_and_plain_words(html):
    a = assess(make_result())
    assert a["by_label"]["Mass"]["agreement"] == pytest.approx(0.5)
    assert a["by_label"]["Mass"]["level"] == "variants disagree"
    assert a["by_label"]["Effusion"]["agreement"] == 1.0 and a["by_label"]["Effusion"]["level"] == "consistent"
    assert a["reliability"] == "low" and "disagree on Lung mass" in a["statement"]
    conf = section(html, "confidence")
    assert "disagree on Lung mass" in conf and "50% of 4" in conf
    # the same findings are stable when all variants agree
    calm = assess(make_result(positives=False))
    assert calm["reliability"] == "high" and "Stable" in calm["statement"]


def test_limitations_model_card_metrics_adapter_calibration(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(
        {"val": {"chestxray14": {"n": 120, "mean_auc": 0.712, "auc": {"Effusion": 0.81, "Mass": 0.66}}}}))
    bb = SimpleNamespace(name="tiny-model", layout="open_clip folder", source=str(folder), fingerprint="abc123",
                         card="# Tiny model\n\n**Research demonstrator.** Trained on public images.\n")
    info = model_info(bb)
    assert info["card_lines"][:2] == ["Tiny model", "Research demonstrator. Trained on public images."]
    r = make_result(adapter="adapters/tb-lora", calibration="calib.json")
    html = render_report(r, info, plotly_src="x.js")
    lim = section(html, "limitations")
    for text in ("NOT a diagnostic device", "open_clip folder", str(folder), "Research demonstrator",
                 "0.712", "n=120", "Pleural effusion 0.810", "adapters/tb-lora", "calib.json"):
        assert text in lim, text
    md = render_report(r, info, fmt="md")
    assert "0.712" in md and "adapters/tb-lora" in md
    # no metrics anywhere: say so
    bare = render_report(make_result(), plotly_src="x.js")
    assert "No measured performance" in section(bare, "limitations")


def test_per_label_thresholds_listed():
    r = make_result(threshold=None)
    html = render_report(r, plotly_src="x.js")
    assert "per-label thresholds" in html
    lim = section(html, "limitations")
    assert "Per-label thresholds" in lim and "0.350" in lim and "0.500" in lim
    md = render_report(r, fmt="md")
    assert "### Per-label thresholds" in md and "| Lung mass | 0.350 |" in md


def test_hostile_text_is_escaped_everywhere():
    r = make_result(hostile=True)
    clinical = '<img src=x onerror="alert(3)"> & </blockquote><script>alert(4)</script>'
    html = render_report(r, clinical=clinical, fmt="html")  # plotly inlined
    assert "<script>alert" not in html and "<img src=x" not in html and "</blockquote><script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=" in html
    assert html.count("<script>") >= 1  # our own scripts only
    md = render_report(r, clinical=clinical, fmt="md")
    assert "<script>" not in md and "<img" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "\\[x\\](javascript:alert(2))" in md and "\\| \\*edema\\*" in md  # markdown syntax neutralised
    assert md_escape("a|b\nc") == "a\\|b c"
    # the embedded JSON download decodes to the result, with markup characters \u-escaped
    uri = re.search(r'href="data:application/json;base64,([^"]+)"', html).group(1)
    raw = base64.b64decode(uri).decode()
    assert "<" not in raw and json.loads(raw)["image"] == r.image
    assert json.loads(safe_json({"x": HOSTILE}))["x"] == HOSTILE


def test_inline_plotly_once_and_json_link_forms():
    r = make_result()
    inline = render_report(r)
    assert inline.count("<script src=") == 0 and len(inline) > 1_000_000  # plotly.js inlined
    linked = render_report(r, plotly_src="../assets/plotly.min.js", json_href="x.json", index_href="../index.html")
    assert 'href="x.json"' in linked and 'href="../index.html"' in linked and "data:application/json" not in linked


def test_unknown_format():
    with pytest.raises(ValueError):
        render_report(make_result(), fmt="pdf")


def test_analyze_html_and_markdown(openclip_dir, image_dir, tmp_path):
    out, md = tmp_path / "r.html", tmp_path / "r.md"
    r = CliRunner().invoke(main, ["analyze", str(image_dir / "grey8.png"), "--model", str(openclip_dir),
                                  "--variants", "original,hflip", "--threshold", "0.4", "--html", str(out),
                                  "--markdown", str(md), "--clinical", HOSTILE])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert "grey8.png" in html and "&lt;script&gt;alert(1)" in html and "<script>alert" not in html
    assert 'id="impression"' in html and "tiny test model" in html  # model card line
    text = md.read_text()
    assert "## Impression" in text and "## Confidence assessment" in text and "<script>" not in text
    # several images need a folder
    r = CliRunner().invoke(main, ["analyze", str(image_dir), "--model", str(openclip_dir), "--variants", "original",
                                  "--html", str(tmp_path / "many.html")])
    assert r.exit_code == 2 and "folder" in r.output
    r = CliRunner().invoke(main, ["analyze", str(image_dir), "--model", str(openclip_dir), "--variants", "original",
                                  "--markdown", str(tmp_path / "mds")])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "mds").glob("*.md"))) == 4


def test_performance_stated_in_card_is_used_without_metrics(tmp_path):
    bb = SimpleNamespace(name="m", layout="open_clip folder", source=str(tmp_path), fingerprint="f",
                         card="# m\nAUC per label from prompts.\n**chestxray14** (n=50, mean AUC 0.655)\n")
    lim = section(render_report(make_result(), model_info(bb), plotly_src="x.js"), "limitations")
    assert "Model card: chestxray14 (n=50, mean AUC 0.655)" in lim and "No measured performance" not in lim
