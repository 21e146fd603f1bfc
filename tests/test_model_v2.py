"""Starter v2: towers whose attention carries weight, stage-2 pre-training (resumable, seeded),
its training-data extras, and evaluation that cannot be fooled by the source."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import vlm.models.towers  # noqa: F401 - registers the towers with timm
from vlm.pretrain.dataset import Row
from vlm.pretrain.extras import epoch_order, lowres_augment, sampling_weights, train_only_rows
from vlm.within_source import source_probe, within_source

from conftest import _radiograph


def _lora_effect(model, target: str) -> float:
    """Relative output change when a rank-4 LoRA with non-zero B is put on `target`."""
    from peft import LoraConfig, inject_adapter_in_model

    model.eval()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=[target]), model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        out = model(x)
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("name,size", [("convvit_tiny", 160), ("convvit_tiny", 128), ("edgenext_xx_small_attn2", 128)])
def test_towers_build_by_name_at_any_size(name, size):
    import timm

    m = timm.create_model(name)
    m.reset_classifier(0, global_pool="avg")
    assert m(torch.randn(2, 3, size, size)).shape == (2, m.num_features)
    assert any(n.endswith("attn.qkv") for n, _ in m.named_modules())


def test_lora_on_new_attention_blocks_moves_output_unlike_edgenext_xca():
    import timm

    torch.manual_seed(0)
    new = _lora_effect(timm.create_model("convvit_tiny", num_classes=0), "blocks.0.attn.qkv")
    torch.manual_seed(0)
    old = _lora_effect(timm.create_model("edgenext_xx_small", num_classes=0), "stages.3.blocks.1.xca.qkv")
    assert new > 1e-2
    assert old < 1e-3  # EdgeNeXt's layer-scale (1e-6 init) silences its attention branch


def test_bundled_starter_lora_targets_carry_weight():
    from vlm.models import load_model

    visual = load_model("vlm-xray-starter").module.visual.trunk
    assert type(visual).__name__ == "ConvBodyAttn"
    torch.manual_seed(0)
    assert _lora_effect(visual, "blocks.0.attn.qkv") > 1e-2


def test_bundled_starter_heatmaps_follow_the_image():
    from vlm import explain as E
    from vlm.labels import load_label_set
    from vlm.models import load_model

    b = load_model("vlm-xray-starter")
    assert E.tower_of(b.module).kind == "conv"  # Grad-CAM on the body's map, gradients through the new blocks
    ls = load_label_set("chestxray14")
    a = E.explain(b, ls, _radiograph(0, 128), ["Effusion"])[0].map
    c = E.explain(b, ls, _radiograph(1, 128, blob=True), ["Effusion"])[0].map
    assert a.shape == c.shape and a.std() > 0 and not np.allclose(a, c)


def _write_csv(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "labels", "patient", "source"])
        for i, (labels, patient) in enumerate(rows):
            name = f"im{i}.png"
            PILImage.fromarray(_radiograph(i, 64, blob=bool(labels))).save(folder / name)
            w.writerow([name, labels, patient, "nih14"])
    return folder


def test_train_only_rows_drop_validation_patients(tmp_path):
    low = _write_csv(tmp_path / "nih14-lowres", [("Mass", "7"), ("No Finding", "8")])
    val = [Row(path="a.png", labels=("Mass",), label_set="chestxray14", group="nih14/7", source="nih14")]
    sets = {}
    rows, info = train_only_rows([(str(low), "chestxray14")], sets, val)
    assert [r.group for r in rows] == ["nih14-lowres/8"]
    assert info[0]["train_only"] and info[0]["dropped_validation_patients"] == 1 and info[0]["rows"] == 1
    assert "chestxray14" in sets


def _row(labels):
    return Row(path="x", labels=tuple(labels), label_set="chestxray14", group="nih14/1", source="nih14")


def test_balanced_sampling_favours_rare_label_combinations():
    rows = [_row([]) for _ in range(100)] + [_row(["Hernia"])]
    w = sampling_weights(rows, "balanced")
    assert w[-1] == pytest.approx(10 * w[0])
    assert sampling_weights(rows, "uniform") is None
    with pytest.raises(ValueError):
        sampling_weights(rows, "bogus")
    order = epoch_order(len(rows), w, torch.Generator().manual_seed(0))
    assert len(order) == len(rows) and int(order.max()) < len(rows)


def test_lowres_augment_blurs_only_the_chosen_share():
    x = torch.rand(4, 3, 128, 128)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(lowres_augment(x, 0.0, 64, g), x)
    y = lowres_augment(x, 1.0, 32, g)
    assert y.shape == x.shape
    assert (y[..., 1:] - y[..., :-1]).abs().mean() < 0.5 * (x[..., 1:] - x[..., :-1]).abs().mean()


# ----------------------------------------------------------------------------- within source
def _covid_case():
    from vlm.labels import load_label_set

    ls = load_label_set("chest4")
    n = 12
    targets = np.zeros((3 * n, len(ls.names)), dtype=np.int8)
    j, k = ls.names.index("COVID19"), ls.names.index("NORMAL")
    targets[:n, j] = 1
    targets[n:, k] = 1
    sources = ["covidqu"] * (2 * n) + ["kermany"] * n
    probs = np.zeros(targets.shape)
    probs[:n, j] = 0.5        # COVID: middling
    probs[n:2 * n, j] = 0.0   # same-source normals: lower
    probs[2 * n:, j] = 0.9    # other-source normals: higher (a source cue against COVID)
    probs[:, k] = 1 - probs[:, j]
    return ls, targets, probs, sources, [f"p{i}" for i in range(3 * n)]


def test_within_source_uses_only_same_source_negatives():
    ls, targets, probs, sources, groups = _covid_case()
    r = within_source(targets, probs, ls, sources, groups, n_boot=200)
    covid = r["labels"]["COVID19"]
    assert covid["one_vs_rest"]["auc"] == pytest.approx(0.5)
    assert [w["source"] for w in covid["within"]] == ["covidqu"]
    assert covid["within"][0]["auc"] == 1.0 and covid["within"][0]["n_neg"] == 12
    lo, hi = covid["within"][0]["ci95"]
    assert lo <= 1.0 <= hi
    assert r["labels"]["TUBERCULOSIS"]["one_vs_rest"] is None  # no positives at all


def test_within_source_marks_single_source_labels_cross_source_only():
    ls, targets, probs, sources, groups = _covid_case()
    sources = ["covidqu"] * 12 + ["kermany"] * 24  # every COVID image from a source without normals
    r = within_source(targets, probs, ls, sources, groups, n_boot=0)
    assert r["labels"]["COVID19"]["cross_source_only"] and not r["labels"]["COVID19"]["within"]
    excluded = within_source(targets, probs, ls, sources, groups, n_boot=0, exclude=["COVID19"])
    assert excluded["macro"]["one-vs-rest"]["n_comparisons"] == r["macro"]["one-vs-rest"]["n_comparisons"] - 1


def test_source_probe_finds_a_source_signal_and_not_noise():
    rng = np.random.default_rng(0)
    sources = np.array(["a"] * 40 + ["b"] * 40)
    groups = [f"g{i}" for i in range(80)]
    emb = rng.normal(size=(80, 8))
    shifted = emb.copy()
    shifted[40:, 0] += 4.0
    assert source_probe(shifted, sources, groups)["accuracy"] > 0.95
    assert source_probe(emb, sources, groups)["accuracy"] < 0.75
    assert source_probe(emb, ["a"] * 80, groups) is None


# ----------------------------------------------------------------------------- stage 2
def test_stage2_keeps_the_base_body_and_starts_fresh_blocks():
    from safetensors.torch import load_file

    from vlm.models import bundled_dir
    from vlm.pretrain.stage2 import build_from_base

    base = bundled_dir() / "vlm-xray-starter"
    model, cfg, _ = build_from_base(base)
    sd = load_file(str(base / "open_clip_model.safetensors"))
    assert cfg["vision_cfg"]["timm_model_name"] == "edgenext_xx_small_attn2"
    state = model.state_dict()
    body = [k for k in sd if k.startswith("visual.trunk.body.")]
    assert body and all(torch.equal(state[k].half(), sd[k]) for k in body)
    assert not torch.equal(state["visual.trunk.blocks.0.attn.qkv.weight"].half(), sd["visual.trunk.blocks.0.attn.qkv.weight"])


@pytest.fixture
def tiny_data(tmp_path):
    rows = [("Mass" if i % 3 == 0 else "No Finding", str(i)) for i in range(28)]
    return _write_csv(tmp_path / "nih14", rows)


def test_stage2_resumes_to_the_same_weights(tmp_path, tiny_data, monkeypatch):
    """An interrupted run continued with --resume ends with the weights of an uninterrupted one."""
    from safetensors.torch import load_file

    from vlm.pretrain import stage2 as s2

    def config(out, resume=False):
        return s2.Stage2Config(base="vlm-xray-starter", data=[str(tiny_data)], out_dir=str(out), views=2, epochs=3,
                               batch_size=8, val_fraction=0.3, resume=resume, cache_dir=str(tmp_path / "cache"))

    full = s2.stage2(config(tmp_path / "full"))
    assert full["best_epoch"] in (1, 2, 3) and set(full["val"]) == {"chestxray14"}
    assert not (tmp_path / "full" / s2.STATE_FILE).exists()  # removed once finished
    card = (tmp_path / "full" / "README.md").read_text()
    assert "NOT a diagnostic device" in card and "edgenext_xx_small_attn2" in card

    real_epoch, calls = s2.train_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(s2, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        s2.stage2(config(tmp_path / "part"))
    assert (tmp_path / "part" / s2.STATE_FILE).is_file()
    monkeypatch.setattr(s2, "train_epoch", real_epoch)
    resumed = s2.stage2(config(tmp_path / "part", resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    a = load_file(str(tmp_path / "full" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "open_clip_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different configuration"):
        monkeypatch.setattr(s2, "train_epoch", interrupted)
        calls.clear()
        try:
            s2.stage2(config(tmp_path / "other"))
        except KeyboardInterrupt:
            pass
        changed = config(tmp_path / "other", resume=True)
        changed.lr = 5e-3
        s2.stage2(changed)


def test_stage2_at_another_size_gives_the_blocks_that_many_tokens(tmp_path, tiny_data):
    from vlm.models import load_model
    from vlm.pretrain import stage2 as s2

    with pytest.raises(ValueError, match="multiple of 32"):
        s2.Stage2Config(image_size=100)
    out = tmp_path / "s2-64"
    s2.stage2(s2.Stage2Config(base="vlm-xray-starter", data=[str(tiny_data)], out_dir=str(out), views=1, epochs=1,
                              batch_size=8, val_fraction=0.3, image_size=64))
    b = load_model(str(out))
    assert b.image_size == 64
    trunk = b.module.visual.trunk
    assert trunk.body(torch.zeros(1, 3, 64, 64)).shape[-2:] == (2, 2)  # 64 / 32 a side
    assert b.encode_images(torch.randn(2, 3, 64, 64)).shape == (2, 384)


def test_text_padding_is_trimmed_without_changing_the_embeddings():
    """The bundled MiniLM tower masks padding, so the tokenizer drops the all-padding tail: fewer
    columns, the same token ids where kept, the same embeddings as the full context length."""
    from vlm.models import load_model

    b = load_model("vlm-xray-starter", device="cpu")
    texts = ["pleural effusion", "a frontal chest radiograph with a small left-sided pneumothorax and no effusion"]
    ids, full = b.tokenize(texts), b.tokenize.tokenizer(texts)
    assert ids.shape[1] < full.shape[1] and torch.equal(ids, full[:, : ids.shape[1]])
    assert (full[:, ids.shape[1]:] == b.tokenize.pad_id).all()
    with torch.no_grad():
        ref = torch.nn.functional.normalize(b.module.encode_text(full).float(), dim=-1)
        assert torch.allclose(b.encode_texts(texts), ref, atol=1e-5)


def test_deferred_text_tower_is_built_on_first_text_and_equals_the_eager_model():
    """Scoring loads the starter without its MiniLM tower (~0.8 s of start-up): images encode the same,
    text builds the tower on first use, and from then on the model is the eagerly built one."""
    import copy

    from vlm.models import complete, load_model

    eager = load_model("vlm-xray-starter")
    lazy = load_model("vlm-xray-starter", defer_text=True)
    assert "text" not in lazy.module._modules
    x = torch.rand(3, 3, 128, 128)
    texts = ["a chest x-ray with cardiomegaly", "no acute findings"]
    with torch.no_grad():
        assert torch.equal(lazy.encode_images(x), eager.encode_images(x))
        assert "text" not in lazy.module._modules  # images never build it
        copied = copy.deepcopy(lazy.module)
        assert torch.equal(lazy.encode_texts(texts), eager.encode_texts(texts))
    lazy_sd, eager_sd = lazy.module.state_dict(), eager.module.state_dict()
    assert sorted(lazy_sd) == sorted(eager_sd) and all(torch.equal(lazy_sd[k], eager_sd[k]) for k in eager_sd)
    assert lazy.fingerprint == eager.fingerprint and lazy.module.context_length == eager.module.context_length
    assert not lazy.module.text.training  # built in the model's mode
    assert "text" not in copied._modules and complete(copied) is copied and "text" in copied._modules


def test_scoring_with_prompts_in_the_store_never_builds_the_text_tower(image_dir):
    from vlm.api import load_scorer
    from vlm.text_cache import TextEmbeddingCache

    image = sorted(image_dir.iterdir())[0]
    encoding = TextEmbeddingCache(use_shipped=False)  # what a model folder without shipped embeddings does
    first = load_scorer(calibration="none", variants=["original"], ood="off", text_cache=encoding)
    expected = next(first.score([image]))
    assert encoding.encoded > 0 and "text" in first.backbone.module._modules  # the prompts were encoded
    again = load_scorer(calibration="none", variants=["original"], ood="off", text_cache=TextEmbeddingCache(use_shipped=False))
    got = next(again.score([image]))
    assert "text" not in again.backbone.module._modules  # every prompt embedding came from the store
    assert [f.probability for f in got.findings] == [f.probability for f in expected.findings]


def test_shipped_prompt_embeddings_equal_encoding_them_and_spare_the_text_tower(image_dir):
    """The starters ship their label sets' prompt embeddings (python -m vlm.text_cache ship): a cold store
    scores with them and no text encoder pass, with the probabilities encoding would give."""
    from vlm.api import load_scorer
    from vlm.text_cache import TextEmbeddingCache

    image = sorted(image_dir.iterdir())[0]
    encoding = TextEmbeddingCache(enabled=False, use_shipped=False)
    expected = next(load_scorer(calibration="none", ood="warn", text_cache=encoding).score([image]))
    shipped = TextEmbeddingCache(enabled=False)  # a cold store: nothing from earlier runs
    scorer = load_scorer(calibration="none", ood="warn", text_cache=shipped)
    got = next(scorer.score([image]))
    assert encoding.encoded > 0 and shipped.encoded == 0 and shipped.shipped == encoding.encoded
    assert "text" not in scorer.backbone.module._modules
    assert [f.probability for f in got.findings] == [f.probability for f in expected.findings]
    assert got.ood == expected.ood


def test_shipped_prompt_embeddings_of_other_weights_are_not_used(tmp_path):
    """A model folder whose files changed (another fingerprint) encodes its prompts, whatever it ships."""
    import shutil

    from vlm.models import bundled_dir, load_model
    from vlm.text_cache import TextEmbeddingCache

    folder = tmp_path / "changed"
    shutil.copytree(bundled_dir() / "vlm-xray-starter", folder)
    config = folder / "open_clip_config.json"
    config.write_text(config.read_text() + "\n")  # the same model, but not the files it shipped for
    backbone = load_model(str(folder))
    cache = TextEmbeddingCache(enabled=False)
    cache.embed(backbone, ["a chest x-ray with cardiomegaly", "no acute findings"])
    assert backbone.text_embeddings is not None and cache.shipped == 0 and cache.encoded == 2
