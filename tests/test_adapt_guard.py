"""Per-label never-worse guard (vlm.adapt.guard): a label whose adapted validation AUC does not clearly
beat zero-shot is served by its zero-shot score, saved in the adapter, and reloaded to identical outputs;
source-matched validation sampling. Generated data and tiny random models only (conftest)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from vlm.adapt import LoraSettings, finetune, load_adapter
from vlm.adapt.guard import guard_head, source_matched_sample
from vlm.adapt.heads import GuardedHead, PromptHead
from vlm.data import load_labelled_csv
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.scoring import Scorer

from test_adapt import CLASSES, _class_csv, _class_image

# the four separable synthetic classes as chestxray14 findings
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Edema"]


@pytest.fixture
def base(openclip_dir):
    return load_model(str(openclip_dir))


def _prompt_head(w: torch.Tensor) -> PromptHead:
    return PromptHead(w, 10.0, True, ["default"]).eval()


def test_guard_falls_back_where_validation_auc_falls_and_keeps_where_it_rises():
    """Two multi-label labels whose signal is on embedding axes 0 and 1. The 'adapted' head points label 0
    along its axis (validation AUC rises) and label 1 against its axis (it falls)."""
    rng = np.random.default_rng(0)
    n, d = 80, 8
    y = rng.integers(0, 2, (n, 2))
    emb = torch.nn.functional.normalize(torch.from_numpy(rng.normal(0, 1, (n, d)) + 2.0 * np.pad(y, ((0, 0), (0, d - 2))))
                                        .float(), dim=-1)
    noise = torch.from_numpy(rng.normal(0, 1, (2, d))).float()
    axis = torch.eye(d)[:2]
    zs_w = torch.stack([0.3 * axis + noise, torch.zeros(2, d)], 1)[None]  # (S=1, L=2, 2, D): weak zero-shot
    ad_w = zs_w.clone()
    ad_w[0, 0, 0], ad_w[0, 1, 0] = 3 * axis[0], -3 * axis[1]
    zs, adapted = _prompt_head(zs_w), _prompt_head(ad_w)
    served, report = guard_head(adapted, zs, emb, y, None, ["rises", "falls"])
    assert isinstance(served, GuardedHead)
    assert report["keep_zero_shot"] == {"rises": False, "falls": True}
    with torch.no_grad():
        out, p_zs, p_ad = served(emb), zs(emb), adapted(emb)
    assert torch.equal(out[..., 1], p_zs[..., 1]) and torch.equal(out[..., 0], p_ad[..., 0])
    # an adapter better on every label is served as it is
    ad_w[0, 1, 0] = 3 * axis[1]
    kept, report = guard_head(_prompt_head(ad_w), zs, emb, y, None, ["rises", "falls"])
    assert not isinstance(kept, GuardedHead) and not any(report["keep_zero_shot"].values())


def test_multiclass_guarded_head_serves_each_label_from_its_own_source():
    """Multi-class: fallen-back labels are zero-shot exactly, the others the adapter's exactly (no
    renormalisation, which would give a single kept label its zero-shot probability back)."""
    rng = np.random.default_rng(1)
    emb = torch.nn.functional.normalize(torch.from_numpy(rng.normal(0, 1, (6, 8))).float(), dim=-1)
    unit = lambda: torch.nn.functional.normalize(torch.randn(1, 4, 8), dim=-1)  # noqa: E731
    zs = PromptHead(unit(), 4.0, False, ["default"]).eval()
    ad = PromptHead(unit(), 4.0, False, ["default"]).eval()
    g = GuardedHead(ad, zs, [True, True, False, True], CLASSES).eval()
    with torch.no_grad():
        out, p_zs, p_ad = g(emb), zs(emb), ad(emb)
    assert torch.equal(out[..., [0, 1, 3]], p_zs[..., [0, 1, 3]])
    assert torch.equal(out[..., 2], p_ad[..., 2]) and not torch.allclose(out[..., 2], p_zs[..., 2])


def _findings_csv(d: Path, per_class: int, seed0: int, swap: bool = False) -> Path:
    """Multi-label CSV of the separable images; `swap` moves the Cardiomegaly label from its own images to
    the Edema images (which keep Edema), so an adapter that learned the images loses Cardiomegaly AUC
    while Atelectasis, Effusion and Edema gain."""
    d.mkdir(exist_ok=True)
    rows = ["filename,labels,patient"]
    swapped = {1: "No Finding", 3: "Edema|Cardiomegaly"}
    for k in range(4):
        label = swapped.get(k, FINDINGS[k]) if swap else FINDINGS[k]
        for i in range(per_class):
            f = f"c{k}_{seed0 + i}.png"
            PILImage.fromarray(_class_image(k, seed0 + 100 * k + i)).save(d / f)
            rows.append(f"{f},{label},p{seed0}_{k}_{i}")
    name = "val.csv" if swap else f"train{seed0}.csv"
    (d / name).write_text("\n".join(rows) + "\n")
    return d / name


@pytest.mark.parametrize("method", ["lora"])
def test_fallen_back_label_is_zero_shot_exactly_and_round_trips(method, base, tmp_path):
    ls = load_label_set("chestxray14")
    data = load_labelled_csv(_findings_csv(tmp_path / "d", 8, 0), ls)
    val = load_labelled_csv(_findings_csv(tmp_path / "d", 8, 5000, swap=True), ls)
    settings = LoraSettings(epochs=10, batch_size=8, lr=1e-2, head_lr=5e-2, augment=False, patience=8)
    ad = finetune(base, ls, data, method=method, shots=None, val=val, settings=settings, out_dir=tmp_path / "a",
                  progress=False)
    guard = ad.info["label_guard"]
    assert guard["applied"] and guard["keep_zero_shot"]["Cardiomegaly"]
    assert not guard["keep_zero_shot"]["Effusion"] and not guard["keep_zero_shot"]["Edema"]
    assert guard["keep_zero_shot"]["Hernia"]  # no validation positives: nothing shows a gain
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["head"]["type"] == "guarded" and meta["head"]["keep_zero_shot"]["Cardiomegaly"] is True
    # a fallen-back label needs base embeddings: the LoRA update was dropped, nothing of it saved
    assert meta["peft"] is None and not (tmp_path / "a" / "adapter_model.safetensors").exists()
    card = (tmp_path / "a" / "README.md").read_text()
    assert "Per-label never-worse guard" in card and "LoRA image update: **dropped" in card
    assert "| Cardiomegaly | 0.578 | 0.578 | zero-shot |" in card
    imgs = sorted(str(p) for p in (tmp_path / "d").glob("c*_50*.png"))
    b2, head, ls2 = load_adapter(tmp_path / "a", load_model(str(base.source)), ls)
    assert b2.fingerprint == base.fingerprint

    def probs(scorer) -> dict[str, np.ndarray]:
        rows = [{f.label: f.probability for f in r.findings} for r in scorer.score(imgs)]
        return {n: np.array([r[n] for r in rows]) for n in ls.names}

    p_mem = probs(Scorer(ad.backbone, ls, variants="original,clahe", head=ad.head))
    p_disk = probs(Scorer(b2, ls2, variants="original,clahe", head=head))
    p_zs = probs(Scorer(base, ls, variants="original,clahe"))
    assert all(np.array_equal(p_mem[n], p_disk[n]) for n in ls.names)
    assert np.array_equal(p_disk["Cardiomegaly"], p_zs["Cardiomegaly"])
    assert not np.allclose(p_disk["Effusion"], p_zs["Effusion"])


def _head_of_kind(kind: str, zs: PromptHead, ls):
    from vlm.adapt.baselines import _zero_shot_linear
    from vlm.adapt.heads import LinearProbeHead, TipAdapterHead

    g = torch.Generator().manual_seed(0)
    d = zs.weight.shape[-1]
    if kind == "linear-probe":
        w0 = _zero_shot_linear(zs)
        return LinearProbeHead(w0, torch.randn(len(ls.names), d, generator=g), torch.zeros(len(ls.names)), False,
                               zs.styles)
    keys = torch.nn.functional.normalize(torch.randn(5, d, generator=g), dim=-1)
    return TipAdapterHead(zs.weight, zs.scale, False, zs.styles, keys, torch.eye(4)[[0, 1, 2, 3, 0]], 2.0, 5.0)


@pytest.mark.parametrize("kind", ["linear-probe", "tip-adapter"])
def test_guarded_head_type_adapters_round_trip(kind, base, tmp_path, image_dir):
    """A guarded linear probe / Tip-Adapter saved and reloaded gives identical probabilities; its mask is in
    adapter.json; a LoRA adapter with a zero-shot label is refused (it would need base embeddings)."""
    from vlm.adapt import save_adapter
    from vlm.scoring import text_classifier

    ls = load_label_set("chest4")
    zs = PromptHead.from_classifier(text_classifier(base, ls)).eval()
    head = GuardedHead(_head_of_kind(kind, zs, ls).eval(), zs, [False, True, False, True], ls.names).eval()
    info = {"method": kind, "lambda": 0.01, "cv": "a test", "alpha": 2.0, "beta": 5.0, "selection": "a test",
            "cache_size": 5, "trainable_params": 0}
    save_adapter(tmp_path / "g", base, ls, head, info)
    meta = json.loads((tmp_path / "g" / "adapter.json").read_text())
    assert meta["head"]["keep_zero_shot"] == dict(zip(ls.names, [False, True, False, True]))
    b2, h2, ls2 = load_adapter(tmp_path / "g", load_model(str(base.source)), ls)
    imgs = sorted(str(p) for p in image_dir.iterdir())

    def probs(scorer):
        return [[f.probability for f in r.findings] for r in scorer.score(imgs)]

    assert probs(Scorer(base, ls, variants="original", head=head)) == probs(Scorer(b2, ls2, variants="original", head=h2))
    with pytest.raises(ValueError, match="LoRA"):
        save_adapter(tmp_path / "bad", base, ls, head, info, lora_module=base.module, lora_config=object())


def test_source_matched_validation_holds_same_source_negatives(tmp_path):
    """COVID19 only from covidqu, most normals from kermany: a plain k-per-class sample may hold no
    covidqu normal at all; the source-matched one holds k of them (and k kermany non-pneumonia rows)."""
    csv_path = _class_csv(tmp_path / "s", 20, source=lambda name, i: (
        "kermany" if name == "PNEUMONIA" or (name == "NORMAL" and i >= 4) else
        "tbx11k" if name == "TUBERCULOSIS" else "covidqu"))
    data = load_labelled_csv(csv_path, load_label_set("chest4"))
    k = 3
    idx = source_matched_sample(data, k, seed=0)
    sub = data.subset(idx)
    src, cls = np.array(sub.column("source")), sub.class_index
    assert (np.bincount(cls, minlength=4) >= k).all()
    covid, pneu = CLASSES.index("COVID19"), CLASSES.index("PNEUMONIA")
    assert ((src == "covidqu") & (cls != covid)).sum() >= k
    assert ((src == "kermany") & (cls != pneu)).sum() >= k
    assert list(idx) == sorted(set(idx))
    # without a source column it is the plain per-class sample
    from vlm.data import sample_shots

    plain = load_labelled_csv(_class_csv(tmp_path / "p", 20), load_label_set("chest4"))
    assert np.array_equal(source_matched_sample(plain, k, 0), sample_shots(plain, k, 0))


def test_group_members_fall_back_together():
    """skin12's "benign keratosis" is evaluated as the sum of its members: one zero-shot member plus one
    adapted member would be a score nobody validated, so a falling member takes its group with it."""
    from vlm.adapt.guard import choose_fallbacks, label_groups

    rng = np.random.default_rng(3)
    y = np.eye(3)[rng.integers(0, 3, 120)]
    p_zs = rng.random((120, 3))
    p_ad = p_zs.copy()
    p_ad[:, 0] = y[:, 0] + 0.3 * rng.random(120)  # rises
    p_ad[:, 1] = y[:, 1] + 0.3 * rng.random(120)  # rises, but shares a group with label 2
    p_ad[:, 2] = 1 - y[:, 2] + 0.3 * rng.random(120)  # falls

    def served(mask):
        return np.where(mask, p_zs, p_ad)

    assert choose_fallbacks(y, p_zs, served)[0].tolist() == [False, False, True]
    assert choose_fallbacks(y, p_zs, served, groups=[[1, 2]])[0].tolist() == [False, True, True]
    ls = load_label_set("skin12")
    (members,) = label_groups(ls)
    assert [ls.names[i] for i in members] == ["seborrheic keratosis", "solar lentigo"]
