"""The one-of-each modules: atomic writes, named-error reads, metrics, resize+crop, prompt classifier."""
from __future__ import annotations

import json
import os
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlm.fileio import (
    FileFormatError,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_yaml,
)
from vlm.labels import load_label_set
from vlm.metrics import (
    auc_metrics,
    binary_metrics,
    choose_threshold,
    confident_gain,
    expected_calibration_error,
    label_aucs,
    roc_auc,
)
from vlm.prompt_classifier import build_prompt_classifier, ensemble
from vlm.transforms import crop_geometry, model_transform, resize_center_crop


def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ----------------------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    f = tmp_path / "sub" / "out.txt"
    atomic_write_text(f, "first")
    atomic_write_text(f, "second")
    assert f.read_text() == "second"
    assert f.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode
    atomic_write_bytes(f, b"\x00\x01")
    assert f.read_bytes() == b"\x00\x01"
    assert _leftovers(f.parent, {"out.txt"}) == []


def test_error_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    f = tmp_path / "metrics.json"
    atomic_write_json(f, {"auc": 0.7})
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text('{"auc": 0.')  # half a file ...
            raise RuntimeError("disk full")  # ... then the writer fails
    assert json.loads(f.read_text()) == {"auc": 0.7}
    with pytest.raises(TypeError):
        atomic_write_json(f, {"bad": object()})  # not serialisable: nothing written at all
    assert json.loads(f.read_text()) == {"auc": 0.7}
    assert _leftovers(tmp_path, {"metrics.json"}) == []


def test_atomic_path_keeps_suffix_for_numpy(tmp_path):
    f = tmp_path / "emb.npz"
    with atomic_path(f) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".npz")
        np.savez(tmp, a=np.arange(3))
    with np.load(f) as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert _leftovers(tmp_path, {"emb.npz"}) == []


def test_atomic_path_gives_normal_permissions_to_a_writer_that_replaces_the_file(tmp_path):
    from safetensors.numpy import save_file

    f = tmp_path / "w.safetensors"
    with atomic_path(f) as tmp:
        save_file({"a": np.arange(3)}, str(tmp))  # safetensors writes a new 0600 file in its place
    assert f.stat().st_mode & 0o777 == 0o666 & ~_umask_now()


def _umask_now() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_dir_replaces_folder_as_a_whole_or_not_at_all(tmp_path):
    d = tmp_path / "adapter"
    with atomic_dir(d) as tmp:
        (tmp / "old_only.txt").write_text("stale")
        (tmp / "weights").write_text("v1")
    with atomic_dir(d) as tmp:
        (tmp / "weights").write_text("v2")
    assert sorted(p.name for p in d.iterdir()) == ["weights"] and (d / "weights").read_text() == "v2"
    with pytest.raises(ValueError):
        with atomic_dir(d) as tmp:
            (tmp / "weights").write_text("v3, half")
            raise ValueError("training crashed")
    assert (d / "weights").read_text() == "v2"
    assert _leftovers(tmp_path, {"adapter"}) == []


# ----------------------------------------------------------------------------- named-error reads

def test_read_errors_name_the_file_and_problem(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileFormatError, match=r"nope\.yaml: label mapping not found"):
        read_yaml(missing, what="label mapping")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(FileFormatError, match=r"bad\.yaml: not valid YAML"):
        read_yaml(bad)
    badj = tmp_path / "bad.json"
    badj.write_text("{\"a\": 1,}")
    with pytest.raises(FileFormatError, match=r"bad\.json: not valid JSON"):
        read_json(badj)
    assert issubclass(FileFormatError, ValueError)
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert read_json(good) == {"a": [1, 2]}


# ----------------------------------------------------------------------------- metrics

def test_auc_matches_hand_computed_pairs():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered correctly
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)  # a tie counts 1/2
    assert roc_auc(np.array([1, 1]), np.array([0.2, 0.3])) is None  # no negatives: undefined


def test_auc_equals_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_ece_and_binary_metrics_hand_computed():
    # bins: 0.05 -> bin 0 (|0 - 0.05|), 0.95 -> bin 9 (|1 - 0.95|), 0.65 and 0.6 -> bin 6 (|1 - 1.25|)
    y, p = np.array([0, 1, 1, 0]), np.array([0.05, 0.95, 0.65, 0.6])
    assert expected_calibration_error(y, p) == pytest.approx((0.05 + 0.05 + 0.25) / 4)
    assert expected_calibration_error(np.array([]), np.array([])) is None
    m = binary_metrics(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]), 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 1)
    assert m["sensitivity"] == m["specificity"] == m["precision"] == m["f1"] == pytest.approx(0.5)
    assert binary_metrics(np.array([1]), np.array([0.5]), 0.5)["tp"] == 1  # positive when p >= threshold


def test_choose_threshold_separates_and_hits_target_sensitivity():
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    t = choose_threshold(y, p, "youden")
    assert t["threshold"] == pytest.approx(0.5) and t["sensitivity"] == 1.0 and t["specificity"] == 1.0
    t = choose_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.3, 0.5, 0.9]), "target_sensitivity",
                         target_sensitivity=1.0)
    assert t["sensitivity"] == 1.0 and 0.1 < t["threshold"] <= 0.3
    assert choose_threshold(np.array([1, 1]), np.array([0.2, 0.3]))["threshold"] == 0.5  # undefined: default


def test_label_aucs_groups_and_auc_metrics_merge():
    ls = SimpleNamespace(names=["a", "b", "c"], multilabel=False, groups={"ab": ("a", "b")})
    # rows 0-1 are class a, 2 is b, 3-4 are c; one row (5) is group-labelled (a and b)
    t = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 1, 0]])
    p = np.array([[.6, .1, .3], [.5, .2, .3], [.2, .5, .3], [.1, .1, .8], [.3, .3, .4], [.4, .4, .2]])
    aucs = label_aucs(t, p, ls)
    # "c": positives 0.8, 0.4 vs negatives 0.3, 0.3, 0.3, 0.2 -> all 8 pairs correct
    assert aucs["c"] == pytest.approx(1.0)
    # group "ab": positive rows 0,1,2,5 scored a+b = .7,.7,.7,.8 vs rows 3,4 at .2,.6 -> all correct
    assert aucs["ab (group)"] == pytest.approx(1.0)
    m = auc_metrics(t, p, ls)  # a and b occur together in row 5: evaluated as one class "ab"
    assert set(m["per_label"]) == {"ab", "c"} and m["macro_auc"] == pytest.approx(1.0) and m["n"] == 6


def test_confident_gain_needs_a_gain_that_survives_resampling():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (60, 2))
    good = y + rng.normal(0, 0.3, y.shape)
    noise = rng.random(y.shape)
    gain, lower = confident_gain(y, good, noise, None, n_boot=100)
    assert gain > 0.2 and lower > 0
    gain, lower = confident_gain(y, noise, noise, None, n_boot=50)
    assert gain == 0 and lower == 0


# ----------------------------------------------------------------------------- resize + crop

def test_resize_center_crop_shape_and_centre():
    img = np.zeros((64, 128, 3), dtype=np.uint8)
    img[:, 32:96] = 255  # the centre square is white, the sides black
    out = resize_center_crop(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out.min() == 255  # exactly the centre square survives the crop
    assert crop_geometry(64, 128, 32) == (0.5, 32, 64, 0, 16)  # scale, resized h, w, crop top, left
    tall = resize_center_crop(np.zeros((300, 100, 3), dtype=np.uint8), 48)  # enlarging on the short side
    assert tall.shape == (48, 48, 3) and tall.flags["C_CONTIGUOUS"]
    t = model_transform(img, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert t.shape == (3, 32, 32) and torch.allclose(t, torch.full_like(t, 2.0))  # (1 - 0.5) / 0.25


def test_scoring_uses_the_one_transform_and_classifier():
    import vlm.scoring as scoring
    import vlm.prompt_classifier as pc
    import vlm.transforms as transforms

    assert scoring.model_transform is transforms.model_transform
    assert scoring.TextClassifier is pc.TextClassifier and scoring.text_classifier is pc.text_classifier


# ----------------------------------------------------------------------------- prompt classifier

def _fake_embed(texts):
    rows = [torch.from_numpy(np.random.default_rng(zlib.crc32(t.encode())).normal(size=8)).float() for t in texts]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def test_prompt_classifier_ensembles_and_marks_uncovered_labels():
    ls = load_label_set("chestxray14")
    clf = build_prompt_classifier(ls, None, _fake_embed, 10.0)
    lab = ls.labels[0]
    style = clf.styles[0]
    pos = ensemble(_fake_embed(list(lab.prompts[style].positive)))
    assert torch.allclose(clf.weights[style][0, 0], pos) and torch.linalg.norm(pos) == pytest.approx(1.0)
    emb = _fake_embed(["image a", "image b"])
    probs = clf.probabilities(emb)
    assert probs.shape == (2, len(clf.styles), len(ls.names)) and torch.isfinite(probs).all()
    # a prompt table covering one label: that label is scored exactly as the full classifier scores it
    partial = build_prompt_classifier(ls, {"mine": {lab.name: lab.prompts[style]}}, _fake_embed, 10.0)
    pp = partial.probabilities(emb)[:, 0]
    assert torch.allclose(pp[:, 0], probs[:, 0, 0]) and torch.isnan(pp[:, 1:]).all()


# ----------------------------------------------------------------------------- adapter folders

def _save(out, head, ls, n_train=2):
    from vlm.adapt.io import save_adapter

    base = SimpleNamespace(name="tiny", fingerprint="f" * 16, source="tests", layout="open_clip")
    return save_adapter(out, base, ls, head, {"method": "linear-probe", "lambda": 0.1, "cv": "leave-one-out", "trainable_params": 0,
                                               "n_train_images": n_train})


def test_adapter_folder_is_written_whole_and_never_over_a_foreign_folder(tmp_path, monkeypatch):
    from vlm.adapt import io as adapter_io
    from vlm.adapt.heads import PromptHead

    ls = load_label_set("chestxray14")
    head = PromptHead(torch.randn(1, len(ls.names), 2, 8), 10.0, True, ["simple"])
    out = _save(tmp_path / "ad", head, ls)
    (out / "stale.txt").write_text("from an older run")
    _save(out, head, ls)  # replaced as a whole: nothing of the old folder survives
    assert not (out / "stale.txt").exists() and (out / "head.safetensors").is_file()
    second = (out / "adapter.json").read_text()

    def broken_card(meta):
        raise RuntimeError("template error")

    monkeypatch.setattr(adapter_io, "render_card", broken_card)
    with pytest.raises(RuntimeError):
        _save(out, head, ls, n_train=3)  # its adapter.json would differ, were it written
    assert (out / "adapter.json").read_text() == second  # the previous adapter, intact
    assert _leftovers(tmp_path, {"ad"}) == []
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="not an adapter folder"):
        _save(foreign, head, ls)
    assert (foreign / "holiday.jpg").read_bytes() == b"\xff\xd8"


def test_selection_auc_is_within_source_where_possible():
    """A score that only separates sources gets 0.5 within source; a cross-source-only label keeps one-vs-rest."""
    import numpy as np

    from vlm.metrics import selection_auc, source_stratified_auc

    y = np.array([1, 1, 0, 0, 0, 0])
    src = np.array(["a", "a", "a", "a", "b", "b"])
    source_cue = np.array([0.5, 0.5, 0.5, 0.5, 0.0, 0.0])  # separates a from b, not disease within a
    assert source_stratified_auc(y, source_cue, None) == 0.75  # ties with the same-source negatives count 1/2
    assert source_stratified_auc(y, source_cue, src) == 0.5
    only_b = np.array([0, 0, 0, 0, 1, 1])  # every positive from b, which has no negatives
    assert source_stratified_auc(only_b, 1 - source_cue, src) == 1.0
    t = np.stack([y, only_b], 1)
    p = np.stack([source_cue, 1 - source_cue], 1)
    assert selection_auc(t, p, src) == 0.75
