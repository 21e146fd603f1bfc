"""vlm.evaluate and `vlm-xray eval`: metrics against hand-computed values, outputs, caching."""
import csv
import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

from conftest import _radiograph
from vlm.cli import main
from vlm.data import load_labelled_csv
from vlm.evaluate import (
    binary_metrics,
    bootstrap_auc,
    evaluate_predictions,
    expected_calibration_error,
    roc_auc,
    run_eval,
)
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.scoring import ImageEmbeddingCache, Scorer


def make_labelled(root, n=16, labels=("Effusion", "No Finding", "Cardiomegaly|Effusion", "No Finding")):
    """n generated radiographs with a labels.csv (two images per patient)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        PILImage.fromarray(_radiograph(100 + i, size=48, blob=i % 2 == 0)).save(root / f"img{i:02d}.png")
        rows.append({"filename": f"img{i:02d}.png", "labels": labels[i % len(labels)], "patient": f"p{i // 2}",
                     "split": "test" if i < n // 2 else "train", "source": "a" if i % 3 else "b"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"


# ----------------------------------------------------------------------------- metrics by hand

def test_auc_hand_computed_with_ties():
    # pos 0.35 beats 1 of 2 negatives, pos 0.8 beats both: 3/4
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    # pos 0.5 ties neg 0.5 (1/2) and beats 0.2 (1); pos 0.9 beats both (2): 3.5/4
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])) == pytest.approx(0.875)
    assert roc_auc(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3])) is None
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 2)  # rounding creates ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_ece_and_threshold_metrics_hand_computed():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.15, 1.0])  # 1.0 falls in the last bin
    # bins: [0,.1): |0-.05| * 1/4; [.1,.2): |.5-.15| * 2/4; [.9,1]: |1-1| * 1/4
    assert expected_calibration_error(y, p) == pytest.approx(0.05 / 4 + 0.35 / 2)
    m = binary_metrics(y, p, 0.15)  # >= threshold is positive: 0.15, 0.15, 1.0
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 0, 1)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.5
    assert m["precision"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(0.8)


def test_bootstrap_matches_explicit_resampling_and_is_fast():
    from sklearn.metrics import roc_auc_score

    from vlm.evaluate import bootstrap_weights

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (200, 3))
    s = rng.random((200, 3)) + 0.5 * y
    boot = bootstrap_auc(y, s, n_boot=50, seed=7)
    w = bootstrap_weights(200, 50, seed=7)
    for b in range(3):  # resample b == rows repeated by their multiplicity
        idx = np.repeat(np.arange(200), w[b].astype(int))
        assert boot[b, 1] == pytest.approx(roc_auc_score(y[idx, 1], s[idx, 1]), abs=1e-12)
    assert np.array_equal(boot, bootstrap_auc(y, s, n_boot=50, seed=7))  # seeded
    y = rng.integers(0, 2, (1200, 14))
    s = rng.random((1200, 14))
    t0 = time.perf_counter()
    bootstrap_auc(y, s, n_boot=1000)
    assert time.perf_counter() - t0 < 15  # vectorised (about 1-2 s on 2 cores)


def test_evaluate_predictions_structure_and_missing_positives():
    rng = np.random.default_rng(2)
    t = np.zeros((60, 3), dtype=int)
    t[:30, 0] = 1
    t[::3, 1] = 1  # label 2 never positive
    p = np.clip(0.3 * rng.random((60, 3)) + 0.6 * t, 0, 1)
    m = evaluate_predictions(t, p, ["A", "B", "C"], {"A": 0.5, "B": 0.4, "C": 0.5}, n_boot=200,
                             groups=[f"g{i // 2}" for i in range(60)])
    assert m["per_label"]["C"]["auc"] is None and m["per_label"]["C"]["auc_ci"] is None
    assert m["per_label"]["C"]["n_pos"] == 0 and m["n_labels_with_auc"] == 2
    assert m["mean_auc"] == pytest.approx((m["per_label"]["A"]["auc"] + m["per_label"]["B"]["auc"]) / 2)
    lo, hi = m["per_label"]["A"]["auc_ci"]
    assert lo <= m["per_label"]["A"]["auc"] <= hi
    assert m["per_label"]["B"]["threshold"] == 0.4
    assert m["bootstrap"]["unit"] == "patient"
    json.dumps(m)  # serialisable


def test_multiclass_group_rows_are_merged():
    ls = load_label_set("skin12")
    names = ls.names
    seb, sol = names.index("seborrheic keratosis"), names.index("solar lentigo")
    mel = names.index("melanoma")
    t = np.zeros((4, len(names)), dtype=int)
    t[0, [seb, sol]] = 1  # "benign keratosis" rows mark both members
    t[1, [seb, sol]] = 1
    t[2, mel] = 1
    t[3, mel] = 1
    p = np.full((4, len(names)), 0.01)
    p[0, seb], p[0, sol] = 0.45, 0.40  # neither member is the argmax alone ... but the merged class is
    p[0, mel] = 0.5
    p[1, sol] = 0.9
    p[2, mel] = 0.9
    p[3, seb] = 0.9
    p = p / p.sum(1, keepdims=True)
    m = evaluate_predictions(t, p, ls, 0.5, n_boot=0)
    assert "benign keratosis" in m["per_label"] and "seborrheic keratosis" not in m["per_label"]
    assert m["per_label"]["benign keratosis"]["members"] == ["seborrheic keratosis", "solar lentigo"]
    mc = m["multiclass"]
    assert mc["accuracy"] == pytest.approx(0.75)  # row 3 (melanoma) is predicted benign keratosis
    k = mc["classes"].index("benign keratosis")
    j = mc["classes"].index("melanoma")
    assert mc["confusion"][k][k] == 2 and mc["confusion"][j][k] == 1 and mc["confusion"][j][j] == 1
    assert m["per_label"]["nevus"]["auc"] is None  # no positive rows: null, not an error


# ----------------------------------------------------------------------------- end to end

def test_run_eval_writes_outputs_and_reuses_cache(openclip_dir, tmp_path):
    csv_path = make_labelled(tmp_path / "data")
    ls = load_label_set("chestxray14")
    data = load_labelled_csv(csv_path, ls)
    cache = ImageEmbeddingCache(tmp_path / "imgcache")
    scorer = Scorer(load_model(str(openclip_dir)), ls, variants="original,clahe", image_cache=cache)
    m = run_eval(scorer, data, tmp_path / "out", None, n_boot=100, progress=False)
    assert m["image_encoder_passes"] == 16 and m["image_cache_hits"] == 0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(saved["per_label"]) == 14 and "mean_auc" in saved
    assert saved["per_label"]["Effusion"]["n_pos"] == 8 and saved["per_label"]["Atelectasis"]["auc"] is None
    assert saved["per_label"]["Effusion"]["threshold"] == 0.5
    html = (tmp_path / "out" / "index.html").read_text()
    assert 'src="assets/plotly.min.js"' in html and "cdn." not in html and "roc" in html
    assert (tmp_path / "out" / "assets" / "plotly.min.js").is_file()
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert len(rows) == 16 and "Effusion" in rows[0]
    # the mean probability equals what analyze reports for the same image
    res = next(scorer.score([data.paths[0]], 0.5))
    assert float(rows[0]["Effusion"]) == pytest.approx(res.finding("Effusion").probability, abs=1e-5)
    # a second evaluation (e.g. other prompts) costs no image-encoder passes
    scorer2 = Scorer(scorer.backbone, ls, prompt_styles=["simple"], variants="original,clahe",
                     image_cache=ImageEmbeddingCache(tmp_path / "imgcache"))
    m2 = run_eval(scorer2, data, tmp_path / "out2", 0.3, n_boot=0, progress=False, html=False)
    assert m2["image_encoder_passes"] == 0 and m2["image_cache_hits"] == 16
    assert m2["per_label"]["Effusion"]["threshold"] == 0.3


def test_cli_eval_with_split_and_where(openclip_dir, tmp_path):
    csv_path = make_labelled(tmp_path / "data")
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["eval", "--model", str(openclip_dir), "--data", str(csv_path), "--out", str(out),
                                  "--variants", "original", "--split", "test", "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    assert "image encoder passes: 8 (cached: 0)" in r.output and "mean AUC" in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 8 and m["subset"] == "split=test"
    r = CliRunner().invoke(main, ["eval", "--model", str(openclip_dir), "--data", str(csv_path), "--out", str(out),
                                  "--variants", "original", "--where", "nosuchcol=1"])
    assert r.exit_code == 2 and "nosuchcol" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["eval", "--model", str(openclip_dir), "--data", str(csv_path), "--out", str(out),
                                  "--variants", "original", "--group-split", "0.5:val", "--bootstrap", "0"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["n_images"] < 16 and "patient-grouped" in m["subset"]


@pytest.mark.shared_data
def test_eval_on_shared_nih14_subset(openclip_dir, tmp_path):
    from conftest import needs_shared_data

    nih = needs_shared_data("nih14")
    r = CliRunner().invoke(main, ["eval", "--model", str(openclip_dir), "--data", str(nih / "labels.csv"),
                                  "--out", str(tmp_path / "e"), "--variants", "original", "--where",
                                  "patient=1,61,75,100,129,143,211", "--bootstrap", "20"])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "e" / "metrics.json").read_text())["per_label"]) == 14
