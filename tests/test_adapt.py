"""Few-shot adaptation (vlm.adapt): LoRA target detection on several backbone families, exact
zero-shot at zero steps, training, adapter-folder round trips, base-model checks, baselines.

Generated data and tiny random models only (conftest); fast on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from vlm.adapt import LoraSettings, detect_targets, find_candidates, finetune, load_adapter, verify_targets
from vlm.adapt.lora import encode_tensors, head_loss, load_pixels, _tensors
from vlm.data import load_labelled_csv
from vlm.labels import load_label_set
from vlm.models import ModelLoadError, load_model
from vlm.scoring import Scorer

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


def _class_image(k: int, seed: int, size: int = 64) -> np.ndarray:
    """Class k: a bright square in quadrant k, plus noise (linearly separable by design)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(60, 12, (size, size))
    h = size // 2
    y, x = divmod(k, 2)
    img[y * h + 4 : y * h + h - 4, x * h + 4 : x * h + h - 4] += 150
    return np.clip(img, 0, 255).astype(np.uint8)


def _class_csv(d: Path, per_class: int, source=None) -> Path:
    """labels.csv + images of the separable classes; `source(name, i)` adds a source column."""
    d.mkdir()
    rows = ["filename,labels,patient" + (",source" if source else "")]
    for k, name in enumerate(CLASSES):
        for i in range(per_class):
            f = f"{name.lower()}_{i}.png"
            PILImage.fromarray(_class_image(k, 100 * k + i)).save(d / f)
            rows.append(f"{f},{name},p{k}_{i}" + (f",{source(name, i)}" if source else ""))
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d / "labels.csv"


@pytest.fixture
def synth_csv(tmp_path) -> Path:
    return _class_csv(tmp_path / "synth", 6)


@pytest.fixture
def base(openclip_dir):
    return load_model(str(openclip_dir))


FAST = dict(epochs=3, batch_size=8, patience=3)


# ----------------------------------------------------------------------------- target detection

def test_targets_open_clip_native_multihead_attention(base):
    cands = find_candidates(base.module, "image")
    assert cands and all(kind.startswith("MultiheadAttention") for _, kind in cands)
    assert all(n.startswith("visual.") for n, _ in cands)
    det = detect_targets(base, ("image", "text"))
    assert det["targets"]["image"] == [n for n, _ in cands]
    assert det["targets"]["text"] and all(n.startswith("transformer.") for n in det["targets"]["text"])
    assert not det["skipped"]


def test_targets_hf_clip_separate_q_v(hf_clip_dir):
    b = load_model(str(hf_clip_dir))
    det = detect_targets(b, ("image", "text"))
    img = det["targets"]["image"]
    assert img and {n.rsplit(".", 1)[-1] for n in img} == {"q_proj", "v_proj"}
    assert all("vision_model" in n for n in img)
    assert all("text_model" in n for n in det["targets"]["text"])


def test_attention_pool_weights_read_directly_are_skipped():
    """open_clip's ModifiedResNet AttentionPool2d reads q/k/v weights directly: LoRA would be a no-op."""
    from vlm.models import Backbone, build_open_clip

    torch.manual_seed(0)
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
    model = build_open_clip(cfg).eval()
    b = Backbone("rn-tiny", model, lambda t: torch.zeros(len(t), 77, dtype=torch.long), 32, fingerprint="x")
    names = [n for n, _ in find_candidates(model, "image")]
    assert any("attnpool.q_proj" in n for n in names)
    good, bad = verify_targets(b, names, "image")
    assert not good and any("attnpool" in n for n in bad)
    from vlm.adapt import LoraTargetError

    with pytest.raises(LoraTargetError, match="linear-probe"):
        detect_targets(b, ("image",))


def test_nonzero_lora_update_changes_output(base):
    from peft import inject_adapter_in_model

    from vlm.adapt.lora import _lora_config

    names = detect_targets(base)["targets"]["image"]
    import copy

    m = copy.deepcopy(base.module)
    inject_adapter_in_model(_lora_config(names, 4, 8, 0.0), m)
    x = torch.randn(2, 3, base.image_size, base.image_size)
    with torch.no_grad():
        before = m.encode_image(x)
        assert torch.allclose(before, base.module.encode_image(x), atol=1e-5)  # B = 0: a no-op
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
        assert (m.encode_image(x) - before).abs().max() > 1e-4


# ----------------------------------------------------------------------------- LoRA

@pytest.mark.parametrize("labels", ["chest4", "chestxray14"])
def test_zero_steps_is_zero_shot_exactly(base, synth_csv, tmp_path, image_dir, labels):
    ls = load_label_set(labels)
    if labels == "chest4":
        data = load_labelled_csv(synth_csv, ls)
    else:  # a multi-label set: relabel the synthetic images with chestxray14 names
        csv = synth_csv.parent / "ml.csv"
        names = ["Atelectasis", "Cardiomegaly", "Effusion", "No Finding"]
        lines = synth_csv.read_text().splitlines()
        out = [lines[0]] + [f"{ln.split(',')[0]},{names[i // 6]},{ln.split(',')[2]}" for i, ln in enumerate(lines[1:])]
        csv.write_text("\n".join(out) + "\n")
        data = load_labelled_csv(csv, ls)
    ad = finetune(base, ls, data, shots=2, settings=LoraSettings(max_steps=0, **FAST), out_dir=tmp_path / "a0",
                  progress=False)
    assert ad.info["steps"] == 0
    imgs = sorted(str(p) for p in image_dir.iterdir())
    zs = Scorer(base, ls, variants="original,clahe")
    b2, head, ls2 = load_adapter(tmp_path / "a0", load_model(str(base.source)), ls)
    assert b2.fingerprint != base.fingerprint and b2.fingerprint.startswith(base.fingerprint)
    ada = Scorer(b2, ls2, variants="original,clahe", head=head)
    assert ada.styles == zs.styles
    for r0, r1 in zip(zs.score(imgs), ada.score(imgs)):
        assert [f.probability for f in r0.findings] == [f.probability for f in r1.findings]
        assert r0.per_variant == r1.per_variant


def test_lora_training_lowers_loss(base, synth_csv):
    ls = load_label_set("chest4")
    data = load_labelled_csv(synth_csv, ls)
    px, _ = load_pixels(data.paths)
    x = _tensors(base, px)
    y = torch.from_numpy(data.targets).float()
    ad = finetune(base, ls, data, shots=None, settings=LoraSettings(epochs=6, batch_size=8, lr=1e-2, augment=False),
                  progress=False)
    from vlm.adapt.heads import PromptHead
    from vlm.scoring import text_classifier

    zs_head = PromptHead.from_classifier(text_classifier(base, ls))
    with torch.no_grad():
        before = float(head_loss(zs_head, encode_tensors(base.module, x), y))
        after = float(head_loss(ad.head, encode_tensors(ad.backbone.module, x), y))
    assert after < before * 0.8, (before, after)
    assert ad.info["trainable_params"] < ad.info["total_params"] / 5
    assert ad.info["history"][-1]["loss"] < ad.info["history"][0]["loss"]


def test_lora_is_reproducible_and_round_trips(base, synth_csv, tmp_path, image_dir):
    ls = load_label_set("chest4")
    data = load_labelled_csv(synth_csv, ls)
    kw = dict(shots=3, seed=5, settings=LoraSettings(**FAST), progress=False)
    a = finetune(base, ls, data, out_dir=tmp_path / "a", **kw)
    b = finetune(base, ls, data, out_dir=tmp_path / "b", **kw)
    ja, jb = (json.loads((tmp_path / d / "adapter.json").read_text()) for d in "ab")
    assert ja["adapter_hash"] == jb["adapter_hash"]  # seeded: same weights
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    imgs = sorted(str(p) for p in image_dir.iterdir())
    # in memory vs reloaded from the folder: identical probabilities
    mem = Scorer(a.backbone, ls, variants="original", head=a.head)
    b2, head, ls2 = load_adapter(tmp_path / "a", load_model(str(base.source)), ls)
    disk = Scorer(b2, ls2, variants="original", head=head)
    p_mem = [[f.probability for f in r.findings] for r in mem.score(imgs)]
    p_disk = [[f.probability for f in r.findings] for r in disk.score(imgs)]
    assert p_mem == p_disk
    zs = [[f.probability for f in r.findings] for r in Scorer(base, ls, variants="original").score(imgs)]
    assert p_disk != zs  # training changed something
    card = (tmp_path / "a" / "README.md").read_text()
    assert "trainable parameters" in card and "visual.transformer.resblocks.0.attn" in card
    assert "not a diagnostic device" in card.lower() or "not a medical device" in card.lower()


def test_mismatched_base_model_is_refused(base, synth_csv, tmp_path, hf_clip_dir):
    ls = load_label_set("chest4")
    data = load_labelled_csv(synth_csv, ls)
    finetune(base, ls, data, method="tip-adapter", shots=2, out_dir=tmp_path / "tip", progress=False)
    other = load_model(str(hf_clip_dir))
    with pytest.raises(ModelLoadError) as e:
        load_adapter(tmp_path / "tip", other, ls)
    assert base.fingerprint in str(e.value) and other.fingerprint in str(e.value)
    with pytest.raises(ValueError, match="not an adapter folder"):
        load_adapter(tmp_path, base, ls)


# ----------------------------------------------------------------------------- baselines

@pytest.mark.parametrize("method", ["linear-probe", "tip-adapter"])
def test_baselines_round_trip(method, base, synth_csv, tmp_path, image_dir):
    ls = load_label_set("chest4")
    data = load_labelled_csv(synth_csv, ls)
    ad = finetune(base, ls, data, method=method, shots=4, out_dir=tmp_path / method, eval_data=data,
                  progress=False)
    assert not (tmp_path / method / "adapter_model.safetensors").exists()
    meta = json.loads((tmp_path / method / "adapter.json").read_text())
    assert meta["method"] == method and meta["base_model"]["fingerprint"] == base.fingerprint
    imgs = sorted(str(p) for p in image_dir.iterdir())
    b2, head, ls2 = load_adapter(tmp_path / method, load_model(str(base.source)), ls)
    assert b2.fingerprint == base.fingerprint  # frozen image tower: embedding caches are shared
    p_mem = [[f.probability for f in r.findings] for r in Scorer(base, ls, variants="original", head=ad.head).score(imgs)]
    p_disk = [[f.probability for f in r.findings] for r in Scorer(b2, ls2, variants="original", head=head).score(imgs)]
    assert p_mem == p_disk
    assert all(abs(sum(p) - 1) < 1e-5 for p in p_disk)  # multiclass: a distribution


def test_tip_adapter_alpha_zero_is_zero_shot(base, synth_csv):
    from vlm.adapt.heads import PromptHead, TipAdapterHead
    from vlm.scoring import text_classifier

    ls = load_label_set("chest4")
    clf = text_classifier(base, ls)
    zs = PromptHead.from_classifier(clf)
    emb = torch.nn.functional.normalize(torch.randn(5, zs.weight.shape[-1]), dim=-1)
    tip = TipAdapterHead(zs.weight, zs.scale, False, clf.styles, emb[:3], torch.eye(4)[:3], 0.0, 5.0)
    assert torch.equal(tip(emb), clf.probabilities(emb))


# ----------------------------------------------------------------------------- CLI

def test_cli_finetune_then_analyze_with_adapter(base, synth_csv, tmp_path, image_dir):
    from click.testing import CliRunner

    from vlm.cli import main

    out = tmp_path / "ad"
    r = CliRunner().invoke(main, ["finetune", "--model", str(base.source), "--data", str(synth_csv), "--labels",
                                  "chest4", "--shots", "2", "--epochs", "2", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "trainable parameters" in r.output and "visual.transformer.resblocks" in r.output
    # no --val-data: validation is drawn from the other patients of --data, so the never-worse guard ran
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["training"]["n_val_images"] > 0
    assert meta["info"]["label_guard"].get("why") != "no validation images", meta["info"]["label_guard"]
    r = CliRunner().invoke(main, ["analyze", str(image_dir / "grey8.png"), "--model", str(base.source), "--adapter",
                                  str(out), "--json", "-", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["label_set"] == "chest4" and res["adapter"] == str(out)
    r = CliRunner().invoke(main, ["analyze", str(image_dir / "grey8.png"), "--model", str(base.source), "--adapter",
                                  str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 2 and "adapter" in r.output


def test_layer_scale_gates_are_found_next_to_attention():
    """EdgeNeXt-style blocks scale the attention branch by a tiny `gamma_xca`: it is found by name."""
    from torch import nn

    from vlm.adapt.lora import gating_scales

    class XCA(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(8))
            self.gamma_xca = nn.Parameter(torch.full((8,), 1e-6))
            self.xca = XCA()

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())

    m = nn.Module()
    m.visual = Tower()
    assert gating_scales(m, ["visual.blocks.0.xca.qkv", "visual.blocks.1.xca.qkv"]) == [
        "visual.blocks.0.gamma_xca", "visual.blocks.1.gamma_xca"]


def test_fewshot_study_writes_table_and_plot(base, synth_csv, tmp_path):
    from vlm.adapt.study import run_study

    ls = load_label_set("chest4")
    data = load_labelled_csv(synth_csv, ls)
    res = run_study(base, ls, data, None, shots=[1], methods=["lora", "tip-adapter", "linear-probe"], seeds=1,
                    out_dir=tmp_path / "study", eval_fraction=0.4, val_shots=1,
                    settings=LoraSettings(epochs=1, batch_size=8))
    methods = [r["method"] for r in res["summary"]]
    assert methods == ["zero-shot", "lora", "tip-adapter", "linear-probe"]
    for f in ("results.csv", "summary.csv", "summary.md", "index.html", "study.json", "assets/plotly.min.js"):
        assert (tmp_path / "study" / f).is_file(), f
    html = (tmp_path / "study" / "index.html").read_text()
    assert "cdn." not in html and "assets/plotly.min.js" in html
    assert "| zero-shot | 0 |" in (tmp_path / "study" / "summary.md").read_text()


def test_fewshot_study_scores_within_source_and_head_only(base, tmp_path):
    """With a source column, the study adds within-source AUCs; head-only runs the LoRA path frozen."""
    from vlm.adapt.study import run_study

    csv_path = _class_csv(tmp_path / "sourced", 16, source=lambda name, i: (
        "kermany" if name == "PNEUMONIA" or (name == "NORMAL" and i % 2) else "covidqu"))
    ls = load_label_set("chest4")
    data = load_labelled_csv(csv_path, ls)
    res = run_study(base, ls, data, None, shots=[1], methods=["lora", "head-only"], seeds=1,
                    out_dir=tmp_path / "study", eval_fraction=0.6, val_shots=1,
                    settings=LoraSettings(epochs=1, batch_size=8))
    zs = res["rows"][0]
    assert zs["within_macro_auc"] is not None and any(k.startswith("within:COVID19@covidqu") for k in zs)
    assert [r["method"] for r in res["rows"]] == ["zero-shot", "lora", "head-only"]
    assert "within-source macro AUC" in (tmp_path / "study" / "summary.md").read_text()


def test_lora_text_tower_round_trips(base, synth_csv, tmp_path, image_dir):
    ls = load_label_set("chest4")
    data = load_labelled_csv(synth_csv, ls)
    ad = finetune(base, ls, data, shots=2, settings=LoraSettings(epochs=2, batch_size=8, lora_text=True),
                  out_dir=tmp_path / "t", progress=False)
    assert ad.info["targets"]["text"] and not ad.info["head_trained"]
    b2, head, ls2 = load_adapter(tmp_path / "t", load_model(str(base.source)), ls)
    imgs = sorted(str(p) for p in image_dir.iterdir())
    p_mem = [[f.probability for f in r.findings] for r in Scorer(ad.backbone, ls, variants="original", head=ad.head).score(imgs)]
    p_disk = [[f.probability for f in r.findings] for r in Scorer(b2, ls2, variants="original", head=head).score(imgs)]
    assert p_mem == p_disk


def test_linear_probe_at_init_is_zero_shot(base):
    from vlm.adapt.baselines import _zero_shot_linear
    from vlm.adapt.heads import LinearProbeHead, PromptHead
    from vlm.scoring import text_classifier

    for name in ("chest4", "chestxray14"):
        ls = load_label_set(name)
        clf = text_classifier(base, ls)
        zs = PromptHead.from_classifier(clf)
        w0 = _zero_shot_linear(zs)
        lp = LinearProbeHead(w0, torch.zeros(w0.shape[1:]), torch.zeros(w0.shape[1]), ls.multilabel, clf.styles)
        emb = torch.nn.functional.normalize(torch.randn(6, w0.shape[-1]), dim=-1)
        assert torch.allclose(lp(emb), clf.probabilities(emb), atol=1e-6)


def test_wise_ft_interpolates_lora_update_and_head_linearly():
    from vlm.adapt.lora import interpolate_state

    zero = ({"m.lora_A.w": torch.ones(2, 3), "m.lora_B.w": torch.zeros(3, 2), "gamma": torch.zeros(3)}, torch.zeros(4))
    trained = ({"m.lora_A.w": torch.full((2, 3), 2.0), "m.lora_B.w": torch.ones(3, 2), "gamma": torch.ones(3)},
               torch.ones(4))
    half, head = interpolate_state(zero, trained, 0.5)
    delta = half["m.lora_B.w"] @ half["m.lora_A.w"]
    assert torch.allclose(delta, 0.5 * trained[0]["m.lora_B.w"] @ trained[0]["m.lora_A.w"])  # update scaled, not squared
    assert torch.allclose(half["gamma"], torch.full((3,), 0.5)) and torch.allclose(head, torch.full((4,), 0.5))
    full, _ = interpolate_state(zero, trained, 1.0)
    assert all(torch.equal(full[k], trained[0][k]) for k in full)


def test_adaptation_that_does_not_help_on_validation_keeps_zero_shot(base, synth_csv, tmp_path):
    """Validation labels that contradict the shots: whatever training learns, the kept adapter is zero-shot."""
    import csv

    ls = load_label_set("chest4")
    data = load_labelled_csv(synth_csv, ls)
    rows = list(csv.DictReader(open(synth_csv)))
    flipped = tmp_path / "synth" / "val.csv"
    with open(flipped, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filename", "labels", "patient"])
        w.writeheader()
        for r in rows:  # same images, other patients' ids, labels rotated by one class
            w.writerow({"filename": r["filename"], "labels": CLASSES[(CLASSES.index(r["labels"]) + 1) % 4],
                        "patient": "v" + r["patient"]})
    val = load_labelled_csv(flipped, ls)
    ad = finetune(base, ls, data, shots=3, seed=1, val=val, progress=False,
                  settings=LoraSettings(epochs=4, batch_size=8, lr=1e-2, head_lr=5e-2, augment=False))
    wise = ad.info["wise_ft"]
    assert wise["alpha"] == 0.0 and ad.info["best_epoch"] == 0
    zs = Scorer(base, ls, variants="original")
    imgs = [str(p) for p in sorted((tmp_path / "synth").glob("*.png"))[:4]]
    kept = Scorer(ad.backbone, ls, variants="original", head=ad.head)
    for a, b in zip(zs.score(imgs), kept.score(imgs)):
        assert [f.probability for f in a.findings] == pytest.approx([f.probability for f in b.findings], abs=1e-6)
