"""`vlm-xray prompts compare`: image embeddings computed once, consistent with eval, best-prompt file."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from test_evaluate import make_labelled
from vlm.cli import main
from vlm.data import load_labelled_csv
from vlm.evaluate import score_dataset
from vlm.labels import LabelSetError, load_label_set
from vlm.models import load_model
from vlm.prompt_experiments import best_prompt_yaml, compare_prompts
from vlm.scoring import ImageEmbeddingCache, Scorer
from vlm.text_cache import TextEmbeddingCache

PARTIAL = """
prompt_styles:
  terse: one or two words
  other: alias test
labels:
  - name: Effusion
    prompts:
      terse: {positive: ["effusion", "fluid"], negative: ["no effusion"]}
  - name: Pleural Effusion
    prompts:
      other: {positive: ["x"], negative: ["y"]}
"""


@pytest.fixture
def setup(openclip_dir, tmp_path):
    csv_path = make_labelled(tmp_path / "data", n=12)
    ls = load_label_set("chestxray14")
    return load_model(str(openclip_dir)), ls, load_labelled_csv(csv_path, ls), csv_path


def test_second_style_costs_no_image_encoder_pass(setup, tmp_path):
    backbone, ls, data, _ = setup
    cache = ImageEmbeddingCache(tmp_path / "ic")
    res = compare_prompts(backbone, ls, data, ["detailed", "simple"], variants="original,clahe",
                          image_cache=cache)
    assert cache.misses == 12 and cache.hits == 0  # one pass per image for both styles and all variant sets
    names = [r["candidate"] for r in res["ranking"]]
    assert set(names) == {"detailed", "simple", "all styles", "all styles @ original", "all styles @ clahe"}
    # a later comparison with another style: no encoder pass at all
    cache2 = ImageEmbeddingCache(tmp_path / "ic")
    compare_prompts(backbone, ls, data, ["simple"], variants="original,clahe", image_cache=cache2)
    assert cache2.misses == 0 and cache2.hits == 12


def test_compare_agrees_with_eval_scoring(setup):
    backbone, ls, data, _ = setup
    res = compare_prompts(backbone, ls, data, ["detailed", "simple"], variants="original,gamma",
                          text_cache=TextEmbeddingCache())
    from vlm.evaluate import evaluate_predictions

    for style, cand in (("simple", "simple"), (None, "all styles")):
        scorer = Scorer(backbone, ls, prompt_styles=[style] if style else None, variants="original,gamma")
        probs, ok, _ = score_dataset(scorer, data)
        m = evaluate_predictions(data.targets[ok], probs, ls, n_boot=0)
        row = next(r for r in res["ranking"] if r["candidate"] == cand)
        assert row["per_label"]["Effusion"]["auc"] == pytest.approx(m["per_label"]["Effusion"]["auc"])
        assert row["per_label"]["Effusion"]["ece"] == pytest.approx(m["per_label"]["Effusion"]["ece"], abs=1e-6)


def test_partial_prompt_file_and_write_best(setup, tmp_path):
    backbone, ls, data, _ = setup
    f = tmp_path / "mine.yaml"
    f.write_text(PARTIAL)
    res = compare_prompts(backbone, ls, data, ["simple"], [f], variants="original")
    row = next(r for r in res["ranking"] if r["candidate"] == "mine:terse")
    assert row["labels_covered"] == 1 and row["per_label"]["Effusion"]["auc"] is not None
    assert res["ranking"][-1]["candidate"] == "mine:terse"  # partial candidates rank after complete ones
    assert "mine:other" in res["styles"]  # an alias ("Pleural Effusion") resolves to its label
    text = best_prompt_yaml(ls, res)
    out = tmp_path / "best.yaml"
    out.write_text(text)
    best = load_label_set(out)  # what `prompts validate` checks
    assert best.names == ls.names and list(best.prompt_styles) == ["best"]
    chosen = res["best_per_label"]["Effusion"]["style"]
    src = {"simple": ls.label("Effusion").prompts["simple"].positive}.get(chosen)
    if src is not None:
        assert best.label("Effusion").prompts["best"].positive == src


def test_prompt_file_with_unknown_label_is_refused(setup, tmp_path):
    backbone, ls, data, _ = setup
    f = tmp_path / "bad.yaml"
    f.write_text("prompt_styles: {x: y}\nlabels:\n  - name: Broken bone\n    prompts:\n"
                 "      x: {positive: [a], negative: [b]}\n")
    with pytest.raises(LabelSetError, match="Broken bone"):
        compare_prompts(backbone, ls, data, None, [f], variants="original")


def test_cli_prompts_compare(openclip_dir, tmp_path):
    csv_path = make_labelled(tmp_path / "data", n=12)
    f = tmp_path / "mine.yaml"
    f.write_text(PARTIAL)
    args = ["prompts", "compare", "--model", str(openclip_dir), "--data", str(csv_path), "--prompt-style",
            "detailed", "--prompt-style", "simple", "--prompt-file", str(f), "--variants", "original,hflip",
            "--out", str(tmp_path / "pc"), "--write-best", str(tmp_path / "best.yaml")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "image encoder passes: 12 (cached: 0)" in r.output and "meanAUC" in r.output
    assert "best style per label" in r.output
    r2 = CliRunner().invoke(main, args)
    assert "image encoder passes: 0 (cached: 12)" in r2.output
    d = json.loads((tmp_path / "pc" / "compare.json").read_text())
    assert d["best_overall"] and len(d["ranking"]) == 7
    assert "cdn." not in (tmp_path / "pc" / "index.html").read_text()
    v = CliRunner().invoke(main, ["prompts", "validate", str(tmp_path / "best.yaml")])
    assert v.exit_code == 0 and v.output.startswith("OK")


def test_multiclass_compare(openclip_dir, tmp_path):
    csv_path = make_labelled(tmp_path / "data", n=8, labels=("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"))
    r = CliRunner().invoke(main, ["prompts", "compare", "--model", str(openclip_dir), "--labels", "chest4",
                                  "--data", str(csv_path), "--variants", "original", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert d["labels"] == ["COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    assert all(0 <= r["mean_auc"] <= 1 and r["labels_covered"] == 4 for r in d["ranking"])
