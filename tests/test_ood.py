"""OOD guard: embedding statistics fitted on training patients with a threshold from held-out
patients, modality prompts as data, verdicts, stale statistics refused, the bundled starter's
shipped statistics on real images."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

from conftest import _radiograph, needs_shared_data
from vlm import ood
from vlm.data import group_key, in_validation


def _gaussian(n, d=8, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(shift, 1.0, (n, d))


def test_threshold_is_a_held_out_percentile_and_far_points_are_flagged():
    fit = _gaussian(400)
    held = {"a": _gaussian(150, seed=1), "b": _gaussian(150, seed=2)}
    stats = ood.fit_domain("toy", ["chestxray14"], fit, held, percentile=95)
    pooled = np.concatenate(list(held.values()))
    assert stats.threshold == pytest.approx(np.percentile(stats.distance(pooled), 95))
    assert stats.info["n_fit"] == 400 and stats.info["n_threshold"] == 300
    guard = ood.OODGuard("chestxray14", stats)
    far = guard.check(_gaussian(1, shift=6.0, seed=3)[0])
    near = guard.check(np.zeros(8))
    assert not far.in_distribution and far.score > far.threshold and "far from" in far.reason
    assert near.in_distribution and near.score < near.threshold
    d = far.to_dict()
    assert set(d) >= {"in_distribution", "score", "threshold", "reason", "method"} and d["method"] == "mahalanobis"
    assert ood.OODVerdict.from_dict(json.loads(json.dumps(d))).in_distribution is False


def test_check_uses_the_original_variant_row():
    stats = ood.fit_domain("toy", ["x"], _gaussian(200), {"s": _gaussian(100, seed=1)})
    guard = ood.OODGuard("x", stats)
    rows = np.stack([_gaussian(1, shift=8.0, seed=4)[0], np.zeros(8)])
    assert guard.check(rows, variants=["clahe", "original"]).in_distribution
    assert not guard.check(rows[::-1], variants=["clahe", "original"]).in_distribution
    assert "median over variants" in guard.check(rows, variants=["clahe", "hflip"]).reason


def test_too_little_data_is_an_error():
    with pytest.raises(ood.OODError, match="too few"):
        ood.fit_domain("toy", ["x"], _gaussian(5), {"s": _gaussian(100)})
    with pytest.raises(ood.OODError, match="held-out"):
        ood.fit_domain("toy", ["x"], _gaussian(100), {"s": _gaussian(5)})


def _dataset(root, n=120):
    """A labels.csv with patients (several images each) and generated radiographs."""
    root.mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filename", "labels", "patient", "source"])
        w.writeheader()
        for i in range(n):
            name = f"img{i:03d}.png"
            PILImage.fromarray(_radiograph(i, size=48, blob=i % 2 == 0)).save(root / name)
            w.writerow({"filename": name, "labels": "No Finding", "patient": str(i // 2), "source": "toy"})
    return root


def test_fit_from_csv_splits_by_patient_and_round_trips(tmp_path, openclip_dir):
    from vlm.labels import load_label_set
    from vlm.models import load_model

    data = _dataset(tmp_path / "toyset")
    backbone = load_model(str(openclip_dir))
    parts = ood.split_csv(data / "labels.csv", val_fraction=0.3, seed=0)
    rows = list(csv.DictReader(open(data / "labels.csv")))
    held = {str(data / r["filename"]) for r in rows if in_validation(group_key(data / "labels.csv", r), 0.3, 0)}
    assert set(parts["held_out"]["toy"]) == held and not held & set(parts["fit"]["toy"])
    out = tmp_path / "model"
    fitted = ood.fit_ood_stats(backbone, {"chest": {"label_sets": ["chestxray14"], "data": [str(data)]}}, out,
                               val_fraction=0.3)
    assert [d.name for d in fitted] == ["chest", "chest" + ood.FEATURE_SUFFIX]
    assert fitted[0].info["n_fit"] == len(rows) - len(held) and fitted[0].info["n_threshold"] == len(held)
    assert fitted[1].info["space"] == "features" and fitted[1].mean.shape[0] > fitted[0].mean.shape[0] // 2
    meta, domains = ood.load_stats(out / ood.STATS_FILE)
    assert meta["fingerprint"] == backbone.fingerprint
    assert np.allclose(domains["chest"].mean, fitted[0].mean, atol=1e-5)
    guard = ood.OODGuard.for_model(backbone, load_label_set("chestxray14"), stats_file=out / ood.STATS_FILE)
    assert guard.method == "mahalanobis+stage-features"
    assert guard.describe()["threshold"] == pytest.approx(fitted[0].threshold)
    assert guard.describe()["feature_threshold"] == pytest.approx(fitted[1].threshold)
    verdict = guard.check_image(data / "img000.png")
    assert verdict.details["signals"] == ["embedding", "stage-features"] and verdict.threshold == fitted[0].threshold
    # a label set whose domain has no statistics falls to its modality prompts, and says so
    skin = ood.OODGuard.for_model(backbone, load_label_set("skin12"), stats_file=out / ood.STATS_FILE)
    assert skin.method == "modality-prompts"


def test_stale_statistics_are_refused(tmp_path, openclip_dir):
    from vlm.labels import load_label_set
    from vlm.models import load_model

    backbone = load_model(str(openclip_dir))
    stats = ood.fit_domain("chest", ["chestxray14"], _gaussian(100, d=32), {"s": _gaussian(50, d=32)})
    ood.save_stats(tmp_path / ood.STATS_FILE, [stats], fingerprint="someothermodel")
    with pytest.raises(ood.OODError, match="python -m vlm.ood fit"):
        ood.OODGuard.for_model(backbone, load_label_set("chestxray14"), stats_file=tmp_path / ood.STATS_FILE)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ood.OODError, match="bad.safetensors"):
        ood.load_stats(tmp_path / "bad.safetensors")


def test_modality_prompts_are_validated_data(tmp_path, monkeypatch):
    for f in sorted((ood._modality_dirs()[-1]).glob("*.yaml")):
        ood.parse_modality_prompts(yaml.safe_load(f.read_text()), str(f))  # every shipped file is valid
    bad = {"label_sets": ["chestxray14"], "expected": {"x-ray": ["a chest X-ray"]}, "others": {"photo": []}}
    with pytest.raises(ood.OODError, match=r"others\.photo"):
        ood.parse_modality_prompts(bad, "my.yaml")
    user = tmp_path / "modality"
    user.mkdir()
    (user / "mine.yaml").write_text(yaml.safe_dump({"label_sets": ["myset"], "expected": {"a": ["an a"]},
                                                    "others": {"b": ["a b"]}}))
    monkeypatch.setenv("VLM_XRAY_PROMPTS", str(tmp_path))
    assert ood.modality_prompts_for("myset").source.endswith("mine.yaml")
    assert ood.modality_prompts_for("chestxray14").source.endswith("chest.yaml")


def test_no_signal_is_unavailable_not_silently_in_distribution(openclip_dir, monkeypatch):
    from vlm.labels import load_label_set
    from vlm.models import load_model

    ls = load_label_set("chestxray14")
    monkeypatch.setattr(ood, "modality_prompts_for", lambda name: None)
    with pytest.raises(ood.OODUnavailable, match="--ood off"):
        ood.OODGuard.for_model(load_model(str(openclip_dir)), ls)


def test_prompt_only_guard_gives_a_verdict(openclip_dir):
    from vlm.labels import load_label_set
    from vlm.models import load_model

    backbone = load_model(str(openclip_dir))
    guard = ood.OODGuard.for_model(backbone, load_label_set("chest4"))
    emb = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    verdict = guard.check(emb / np.linalg.norm(emb, axis=1, keepdims=True), ["original", "clahe"])
    assert verdict.method == "modality-prompts" and 0 <= verdict.details["expected_modality_share"] <= 1
    assert verdict.details["most_likely_modality"] in guard.modality.names


@pytest.mark.shared_data
def test_bundled_starter_flags_other_modalities_and_passes_chest_xrays():
    from PIL import ImageDraw
    from skimage import data as skdata

    from vlm.labels import load_label_set
    from vlm.models import load_model
    from vlm.transforms import model_tensors

    nih = needs_shared_data("nih14")
    skin = needs_shared_data("skin")
    backbone = load_model("vlm-xray-starter")
    chest_guard = ood.OODGuard.for_model(backbone, load_label_set("chestxray14"))
    skin_guard = ood.OODGuard.for_model(backbone, load_label_set("skin12"))
    assert chest_guard.method == "mahalanobis+stage-features" and chest_guard.stats.name == "chest"
    held_chest = ood.split_csv(nih / "labels.csv")["held_out"]["nih14"][:20]
    held_skin = ood.split_csv(skin / "labels.csv")["held_out"]["ham10000"][:20]
    chest = ood.embed_paths(backbone, held_chest, with_features=True)[:2]
    skin_x = ood.embed_paths(backbone, held_skin, with_features=True)[:2]
    passed = lambda guard, x: np.mean([v.in_distribution for v in guard.check_batch(*x)])  # noqa: E731
    assert passed(chest_guard, chest) >= 0.9 and passed(skin_guard, skin_x) >= 0.9
    assert passed(chest_guard, skin_x) <= 0.1 and passed(skin_guard, chest) <= 0.1
    page = PILImage.new("L", (400, 500), 235)
    for y in range(20, 480, 22):
        ImageDraw.Draw(page).text((20, y), "invoice total amount date signature page", fill=20)
    grey = lambda a: np.repeat(a[:, :, None], 3, 2)  # noqa: E731
    others = [skdata.astronaut(), skdata.coffee(), grey(skdata.camera()), grey(skdata.moon()), grey(np.array(page))]
    x = ood.encode_with_features(backbone, model_tensors(others, backbone.image_size, backbone.mean, backbone.std))
    verdicts = chest_guard.check_batch(*x)
    assert not any(v.in_distribution for v in verdicts), [v.reason for v in verdicts]
    assert verdicts[0].details["signals"] == ["embedding", "stage-features"]
    # check_image runs the whole guard on the image itself; check() without features says what it skipped
    full = chest_guard.check_image(held_chest[0])
    assert full.in_distribution and full.details["signals"] == ["embedding", "stage-features"]
    assert "skipped" in chest_guard.check(chest[0][0]).details
