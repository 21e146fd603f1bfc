"""The scoring engine and `vlm-xray analyze`: behaviour users rely on."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vlm.cli import main
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.results import ImageFailure
from vlm.scoring import Scorer
from vlm.text_cache import TextEmbeddingCache


@pytest.fixture
def scorer(openclip_dir):
    return Scorer(load_model(str(openclip_dir)), load_label_set("chestxray14"), variants="original,clahe,hflip")


def test_scores_are_probabilities_with_uncertainty(scorer, image_dir):
    res = next(scorer.score([image_dir / "grey8.png"], threshold=0.5))
    assert len(res.findings) == 14
    for f in res.findings:
        assert 0.0 <= f.probability <= 1.0 and f.uncertainty >= 0.0
        assert f.positive == (f.probability >= 0.5)
    assert set(res.per_variant) == {"original", "clahe", "hflip"}
    assert set(res.per_variant["original"]) == {"detailed", "simple"}
    # the mean is the mean of the breakdown
    vals = [res.per_variant[v][s]["Effusion"] for v in res.per_variant for s in res.per_variant[v]]
    assert res.finding("Effusion").probability == pytest.approx(np.mean(vals), abs=1e-5)
    assert res.finding("Effusion").uncertainty == pytest.approx(np.std(vals), abs=1e-5)


def test_different_images_give_different_scores(scorer, image_dir):
    a, b = scorer.score([image_dir / "grey8.png", image_dir / "grey16.png"])
    pa = [f.probability for f in a.findings]
    pb = [f.probability for f in b.findings]
    assert not np.allclose(pa, pb)


def test_bad_file_reported_and_batch_goes_on(scorer, image_dir, corrupt_file):
    out = list(scorer.score([image_dir / "grey8.png", corrupt_file, image_dir / "rgb.jpg"]))
    assert [type(o).__name__ for o in out] == ["ImageResult", "ImageFailure", "ImageResult"]
    assert isinstance(out[1], ImageFailure) and "not a recognised image" in out[1].reason


def test_multiclass_probabilities_sum_to_one(openclip_dir, image_dir):
    s = Scorer(load_model(str(openclip_dir)), load_label_set("chest4"), variants="original")
    res = next(s.score([image_dir / "grey8.png"]))
    assert sum(f.probability for f in res.findings) == pytest.approx(1.0, abs=1e-5)


def test_text_cache_means_second_run_encodes_nothing(openclip_dir, tmp_path):
    backbone = load_model(str(openclip_dir))
    ls = load_label_set("chestxray14")
    first = TextEmbeddingCache(tmp_path / "tc")
    Scorer(backbone, ls, text_cache=first)
    assert first.encoded > 0
    second = TextEmbeddingCache(tmp_path / "tc")
    s2 = Scorer(backbone, ls, text_cache=second)
    assert second.encoded == 0 and second.hits > 0
    fresh = Scorer(backbone, ls, text_cache=TextEmbeddingCache(enabled=False, directory=tmp_path / "none"))
    for st in s2.styles:
        assert torch.allclose(s2.classifier.weights[st], fresh.classifier.weights[st], atol=1e-6)


def test_batch_size_and_workers_do_not_change_results(openclip_dir, image_dir):
    b = load_model(str(openclip_dir))
    ls = load_label_set("chestxray14")
    paths = sorted(image_dir.iterdir())
    r1 = list(Scorer(b, ls, batch_size=1, num_workers=0).score(paths))
    r2 = list(Scorer(b, ls, batch_size=3, num_workers=1).score(paths))
    for a, c in zip(r1, r2):
        assert a.image == c.image
        assert np.allclose([f.probability for f in a.findings], [f.probability for f in c.findings], atol=1e-5)


def _analyze(*args):
    return CliRunner().invoke(main, ["analyze", *map(str, args)])


def test_cli_json_contract_and_threshold_flip(openclip_dir, image_dir):
    img = image_dir / "grey8.png"
    r = _analyze(img, "--model", openclip_dir, "--json", "-", "--threshold", "0.4")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for key in ("image", "model", "label_set", "threshold", "variants", "prompt_styles", "findings", "per_variant"):
        assert key in d
    assert len(d["findings"]) == 14 and d["threshold"] == 0.4
    probs = sorted(f["probability"] for f in d["findings"])
    mid = (probs[5] + probs[6]) / 2  # a threshold between two scores flips exactly the ones above it
    d2 = json.loads(_analyze(img, "--model", openclip_dir, "--json", "-", "--threshold", f"{mid:.6f}").output)
    assert sum(f["positive"] for f in d2["findings"]) == 8
    d3 = json.loads(_analyze(img, "--model", openclip_dir, "--json", "-", "--threshold", "1.0").output)
    assert not any(f["positive"] for f in d3["findings"])


def test_cli_table_and_several_images(openclip_dir, image_dir, corrupt_file, tmp_path):
    out = tmp_path / "r.json"
    r = _analyze(image_dir / "grey8.png", corrupt_file, "--model", openclip_dir, "--json", out,
                 "--variants", "original,gamma", "--prompt-style", "simple")
    assert r.exit_code == 1  # one input failed
    assert "broken.png" in r.output and "Pleural effusion" in r.output
    data = json.loads(out.read_text())
    assert isinstance(data, list) and len(data) == 1
    assert data[0]["variants"] == ["original", "gamma"] and data[0]["prompt_styles"] == ["simple"]


def test_cli_usage_errors_are_one_line(openclip_dir, image_dir):
    r = _analyze(image_dir / "grey8.png", "--model", openclip_dir, "--labels", "nope")
    assert r.exit_code == 2 and "unknown label set 'nope'" in r.output and "Traceback" not in r.output
    r = _analyze(image_dir / "grey8.png", "--model", openclip_dir, "--prompt-style", "poetic")
    assert r.exit_code == 2 and "poetic" in r.output


def test_cli_lists(openclip_dir):
    runner = CliRunner()
    assert "chestxray14" in runner.invoke(main, ["labels"]).output
    out = runner.invoke(main, ["prompts", "show", "chest4"]).output
    assert "TUBERCULOSIS" in out
    assert "clahe" in runner.invoke(main, ["variants"]).output
    assert "tiny test model" in runner.invoke(main, ["models", "show", str(openclip_dir)]).output
