"""vlm.calibrate and `vlm-xray calibrate`: thresholds by hand, parameter recovery, held-out ECE,
the calibration file contract and its use by analyze."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from test_evaluate import make_labelled
from vlm.calibrate import (
    CalibrationError,
    calibrated_mean,
    choose_threshold,
    fit_platt,
    fit_temperature,
    load_calibration,
)
from vlm.cli import main
from vlm.evaluate import expected_calibration_error
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.scoring import Scorer


def test_thresholds_hand_computed():
    y = np.array([0, 0, 1, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7])
    # cuts at the scores, descending: .7 J=1/3, .6 J=2/3, .4 J=1/3, .3 J=2/3, .2 J=1/3, .1 J=0
    # -> tie: highest (0.6), stored halfway to the next lower score 0.4
    t = choose_threshold(y, p)
    assert t["threshold"] == pytest.approx(0.5) and t["method"] == "youden"
    assert t["sensitivity"] == pytest.approx(2 / 3) and t["specificity"] == 1.0
    # highest cut with sensitivity >= 0.9 is at 0.3 (all 3 positives; midpoint to 0.2), specificity 2/3
    t = choose_threshold(y, p, "target_sensitivity", 0.9)
    assert t["threshold"] == pytest.approx(0.25) and t["sensitivity"] == 1.0 and t["specificity"] == pytest.approx(2 / 3)
    assert choose_threshold(np.zeros(4), p[:4])["threshold"] == 0.5  # no positives: default
    # no cut better than chance (max J = 0 at "all positive" and "none positive"): the highest wins,
    # stored halfway between the top score 0.8 and 1
    t = choose_threshold(np.array([1, 0]), np.array([0.2, 0.8]))
    assert t["threshold"] == pytest.approx(0.9) and t["sensitivity"] == 0.0 and t["specificity"] == 1.0
    assert "nothing called positive" in t["method"]


def test_platt_recovers_known_parameters_and_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (20000, 1, 2))
    true_a, true_b = np.array([2.0, 0.5]), np.array([-1.0, 0.7])
    y = (rng.random((20000, 2)) < 1 / (1 + np.exp(-(true_a * z[:, 0] + true_b)))).astype(float)
    a, b = fit_platt(z, y)
    assert a == pytest.approx(true_a, abs=0.12) and b == pytest.approx(true_b, abs=0.12)
    logits = rng.normal(0, 3, (20000, 1, 4))
    p_true = torch.softmax(torch.as_tensor(logits[:, 0] / 2.5), -1).numpy()
    cls = np.array([rng.choice(4, p=pp) for pp in p_true])
    t = np.eye(4)[cls]
    assert fit_temperature(logits, t) == pytest.approx(2.5, rel=0.06)


def test_calibration_fitted_on_one_half_lowers_ece_on_the_other():
    rng = np.random.default_rng(3)
    n = 4000
    z = rng.normal(0, 1, (n, 4, 3)) * 6 + rng.normal(0, 0.3, (n, 4, 3))  # over-confident logits, 4 variants
    y = (rng.random((n, 3)) < 1 / (1 + np.exp(-(0.5 * z.mean(1) - 1.0)))).astype(float)
    a, b = fit_platt(z[: n // 2], y[: n // 2])
    held = slice(n // 2, None)
    before = calibrated_mean("multilabel", z[held])
    after = calibrated_mean("multilabel", z[held], a, b)
    for j in range(3):
        e0 = expected_calibration_error(y[held, j], before[:, j])
        e1 = expected_calibration_error(y[held, j], after[:, j])
        assert e1 < e0 / 2


@pytest.fixture
def calibrated(openclip_dir, tmp_path):
    csv_path = make_labelled(tmp_path / "data")
    out = tmp_path / "calib.json"
    r = CliRunner().invoke(main, ["calibrate", "--model", str(openclip_dir), "--data", str(csv_path),
                                  "--variants", "original,clahe", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return csv_path, out, r.output


def test_calibration_file_is_self_explaining(calibrated):
    csv_path, out, output = calibrated
    d = json.loads(out.read_text())
    assert d["label_set"] == "chestxray14" and d["model_fingerprint"] and d["variants"] == ["original", "clahe"]
    e = d["labels"]["Effusion"]
    for key in ("scale", "offset", "threshold", "threshold_method", "sensitivity", "specificity", "n", "n_pos", "data"):
        assert key in e
    assert e["threshold_method"] == "youden" and e["n"] == 16 and e["n_pos"] == 8 and e["data"] == str(csv_path)
    assert d["labels"]["Atelectasis"]["fitted"] is False  # no positives: identity, default threshold
    assert d["labels"]["Atelectasis"]["threshold"] == 0.5
    assert "image encoder passes: 16 (cached: 0)" in output and "Effusion" in output


def test_scorer_uses_calibration_and_its_thresholds(calibrated, openclip_dir, image_dir):
    _, out, _ = calibrated
    backbone = load_model(str(openclip_dir))
    ls = load_label_set("chestxray14")
    scorer = Scorer(backbone, ls, variants="original,clahe")
    cal = load_calibration(out, ls)
    emb = torch.randn(2, 32)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    raw = scorer.classifier.logits(emb)
    expected = torch.stack([torch.sigmoid(torch.as_tensor(cal.scale) * (lg[..., 0] - lg[..., 1])
                                          + torch.as_tensor(cal.offset)) for lg in raw.values()], -2)
    calibrated_scorer = Scorer(backbone, ls, variants="original,clahe", calibration=cal)
    assert torch.allclose(calibrated_scorer.probabilities(emb), expected, atol=1e-6)
    # analyze: no --threshold -> per-label thresholds of the calibration; --threshold overrides
    img = str(image_dir / "grey8.png")
    args = ["analyze", img, "--model", str(openclip_dir), "--variants", "original,clahe", "--json", "-"]
    r = CliRunner().invoke(main, args + ["--calibration", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["threshold"] is None and d["calibration"] == str(out)
    for f in d["findings"]:
        assert f["threshold"] == pytest.approx(cal.thresholds[f["label"]])
        assert f["positive"] == (f["probability"] >= f["threshold"])
    d = json.loads(CliRunner().invoke(main, args + ["--calibration", str(out), "--threshold", "0.3"]).output)
    assert d["threshold"] == 0.3 and all(f["threshold"] == 0.3 for f in d["findings"])
    d = json.loads(CliRunner().invoke(main, args).output)
    assert d["threshold"] == 0.5  # no calibration: 0.5 as before


def test_wrong_label_set_or_model_is_refused(calibrated, openclip_dir, image_dir, tmp_path):
    _, out, _ = calibrated
    with pytest.raises(CalibrationError, match="label set 'chestxray14'"):
        load_calibration(out, load_label_set("chest4"))
    d = json.loads(out.read_text())
    d["model_fingerprint"] = "0123456789abcdef"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    r = CliRunner().invoke(main, ["analyze", str(image_dir / "grey8.png"), "--model", str(openclip_dir),
                                  "--calibration", str(other)])
    assert r.exit_code == 2 and "fingerprint 0123456789abcdef" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["analyze", str(image_dir / "grey8.png"), "--model", str(openclip_dir),
                                  "--labels", "chest4", "--calibration", str(out)])
    assert r.exit_code == 2 and "calibration is for label set 'chestxray14'" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(CalibrationError, match="not a vlm-xray calibration file"):
        load_calibration(bad, load_label_set("chestxray14"))


def test_eval_with_calibration_and_target_sensitivity(openclip_dir, tmp_path):
    csv_path = make_labelled(tmp_path / "data")
    out = tmp_path / "c.json"
    base = ["--model", str(openclip_dir), "--data", str(csv_path), "--variants", "original"]
    r = CliRunner().invoke(main, ["calibrate", *base, "--out", str(out), "--target-sensitivity", "0.9"])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["labels"]["Effusion"]["threshold_method"] == "target sensitivity 0.9"
    assert d["labels"]["Effusion"]["sensitivity"] >= 0.9
    r = CliRunner().invoke(main, ["eval", *base, "--calibration", str(out), "--out", str(tmp_path / "e"),
                                  "--bootstrap", "0"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["calibration"] == str(out) and "calibration" in m["threshold_source"]
    assert m["per_label"]["Effusion"]["threshold"] == pytest.approx(d["labels"]["Effusion"]["threshold"])
    # same data as the fit: the sensitivity eval reports is the one the file records
    assert m["per_label"]["Effusion"]["sensitivity"] == pytest.approx(d["labels"]["Effusion"]["sensitivity"], abs=1e-3)


def test_multiclass_calibration_roundtrip(openclip_dir, tmp_path):
    csv_path = make_labelled(tmp_path / "data", labels=("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"))
    out = tmp_path / "c4.json"
    r = CliRunner().invoke(main, ["calibrate", "--model", str(openclip_dir), "--labels", "chest4", "--data",
                                  str(csv_path), "--variants", "original", "--out", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["mode"] == "multiclass" and d["temperature"] > 0
    cal = load_calibration(out, load_label_set("chest4"))
    s = Scorer(load_model(str(openclip_dir)), load_label_set("chest4"), variants="original", calibration=cal)
    p = s.probabilities(torch.nn.functional.normalize(torch.randn(3, 32), dim=-1))
    assert p.shape == (3, 2, 4) and torch.allclose(p.sum(-1), torch.ones(3, 2), atol=1e-5)


def test_calibration_shipped_in_model_folder_is_default(calibrated, openclip_dir, image_dir, tmp_path):
    import shutil

    _, out, _ = calibrated
    model = tmp_path / "model_with_calibration"
    shutil.copytree(openclip_dir, model)
    shutil.copy(out, model / "calibration-chestxray14.json")
    img = str(image_dir / "grey8.png")
    r = CliRunner().invoke(main, ["analyze", img, "--model", str(model), "--variants", "original,clahe", "--json", "-"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["calibration"].endswith("calibration-chestxray14.json") and d["threshold"] is None
    raw = json.loads(CliRunner().invoke(main, ["analyze", img, "--model", str(model), "--variants", "original,clahe",
                                               "--calibration", "none", "--json", "-"]).output)
    assert "calibration" not in raw and raw["threshold"] == 0.5
    assert [f["probability"] for f in raw["findings"]] != [f["probability"] for f in d["findings"]]
