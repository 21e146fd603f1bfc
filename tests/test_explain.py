"""Heatmaps: every tower layout, targets are prompt-ensemble scores, sanity checks (Adebayo et al.'s
model randomisation, a planted signal), hooks released."""
from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_CLIP_CFG, needs_shared_data, tiny_open_clip
from vlm import explain as E
from vlm.models.base import Backbone


def _backbone(module, size, name="tiny") -> Backbone:
    return Backbone(name, module.eval(), tokenize=None, image_size=size, fingerprint=name)


def _directions(n=3, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) * 10


def _timm_clip(tower: str, size: int, pool: str = "avg"):
    from vlm.models import build_open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"timm_model_name": tower, "timm_model_pretrained": False,
                                           "timm_pool": pool, "timm_proj": "linear", "image_size": size},
           "text_cfg": TINY_CLIP_CFG["text_cfg"]}
    torch.manual_seed(0)
    return build_open_clip(cfg).eval()


def _hf_clip_module():
    from transformers import CLIPConfig, CLIPModel

    from vlm.models.layouts import HFCLIPWrapper

    torch.manual_seed(1)
    cfg = CLIPConfig(text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0,
                                  "eos_token_id": 1, "pad_token_id": 0},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, projection_dim=32)
    return HFCLIPWrapper(CLIPModel(cfg).eval())


LAYOUTS = {
    "open_clip-vit": lambda: (_backbone(tiny_open_clip(), 32), "vit"),
    "timm-vit": lambda: (_backbone(_timm_clip("test_vit", 64, pool=""), 64), "vit"),
    "timm-conv": lambda: (_backbone(_timm_clip("test_convnext", 64), 64), "conv"),
    "hf-clip-vit": lambda: (_backbone(_hf_clip_module(), 32), "vit"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_distinct_maps_per_label_and_image(layout):
    backbone, kind = LAYOUTS[layout]()
    assert E.tower_of(backbone.module).layout == layout
    methods = E.methods_for(backbone)
    assert methods[0] == E.DEFAULT_METHOD[kind]
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 3, backbone.image_size, backbone.image_size, generator=g)
    b = torch.randn(1, 3, backbone.image_size, backbone.image_size, generator=g)
    d = _directions()
    for method in methods:
        name, maps_a, scores = E.explain_tensor(backbone, a, d, method)
        _, maps_b, _ = E.explain_tensor(backbone, b, d, method)
        assert name == method and maps_a.shape[0] == 3 and np.isfinite(maps_a).all()
        if method not in (E.DEFAULT_METHOD[kind], "patch-text"):
            continue  # Grad-CAM++/HiResCAM/LayerCAM may be all-zero on a random tiny model
        assert not np.allclose(maps_a[0], maps_a[1]), f"{layout}/{method}: two labels gave the same map"
        assert not np.allclose(maps_a[0], maps_b[0]), f"{layout}/{method}: two images gave the same map"
        with torch.no_grad():
            expected = (nn.functional.normalize(backbone.module.encode_image(a).float(), dim=-1) @ d.T)[0]
        assert np.allclose(scores, expected.numpy(), atol=1e-4), "target must be the label's score"
    # the explanation pass leaves the model as it found it: no hooks, fused attention restored, no grads
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.module.modules())
    assert all(p.grad is None for p in backbone.module.parameters())
    assert not any("forward" in m.__dict__ for m in backbone.module.modules())


def test_explicit_attention_reproduces_the_model_output():
    """The rollout swaps in an explicit attention forward; it must compute what MHA computes, in
    both the batch-first and the sequence-first (OpenAI) layout."""
    for batch_first in (True, False):
        torch.manual_seed(0)
        mha = nn.MultiheadAttention(16, 2, batch_first=batch_first).eval()
        x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
        captured = []
        ref = mha(x, x, x, need_weights=False)[0]
        out = E._explicit_mha(mha, captured)(x, x, x, need_weights=False)[0]
        assert torch.allclose(ref, out, atol=1e-5)
        assert captured[0].shape == (2, 2, 5, 5)


def test_timm_vit_fused_attention_is_restored():
    backbone, _ = LAYOUTS["timm-vit"]()
    blocks = backbone.module.visual.trunk.blocks
    before = [b.attn.fused_attn for b in blocks]
    E.explain_tensor(backbone, torch.randn(1, 3, 64, 64), _directions(), "rollout")
    assert [b.attn.fused_attn for b in blocks] == before


def test_method_errors_name_the_choices():
    backbone, _ = LAYOUTS["open_clip-vit"]()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(E.ExplainError, match="rollout"):
        E.explain_tensor(backbone, x, _directions(), "gradcam")  # Grad-CAM on a ViT would be all zeros
    with pytest.raises(E.ExplainError, match="available"):
        E.explain_tensor(backbone, x, _directions(), "no-such-method")


def test_explain_front_door_with_label_set(openclip_dir, image_dir, tmp_path):
    from vlm.images import load_image
    from vlm.labels import load_label_set
    from vlm.models import load_model

    backbone = load_model(str(openclip_dir))
    ls = load_label_set("chestxray14")
    path = image_dir / "grey8.png"
    maps = E.explain(backbone, ls, path, ["Cardiomegaly", "Effusion"])
    assert [m.label for m in maps] == ["Cardiomegaly", "Effusion"]
    assert all(m.method == "rollout" for m in maps)
    pixels = load_image(path).pixels
    h, w = pixels.shape[:2]
    for m in maps:
        assert m.map.shape == (32, 32) and m.map.min() >= 0 and m.map.max() <= 1
        assert 0 <= m.peak[0] < w and 0 <= m.peak[1] < h
    saved = E.save_heatmaps(maps, pixels, tmp_path / "out", "grey8", npy=True)
    png = saved[0].files["png"]
    from PIL import Image as PILImage

    assert PILImage.open(png).size == (w, h)
    assert np.array_equal(np.load(saved[0].files["npy"]), maps[0].map)
    assert maps[0].data_uri(pixels).startswith("data:image/png;base64,")
    assert maps[0].to_dict()["files"]["png"] == png
    with pytest.raises(E.ExplainError, match="not in chestxray14"):
        E.explain(backbone, ls, path, ["NotALabel"])


def test_multiclass_target_is_the_class_logit(openclip_dir, image_dir):
    from vlm.labels import load_label_set
    from vlm.models import load_model
    from vlm.prompt_classifier import text_classifier

    backbone = load_model(str(openclip_dir))
    ls = load_label_set("chest4")
    clf = text_classifier(backbone, ls)
    d = E.label_directions(clf, ["NORMAL"])
    expected = clf.logit_scale * torch.stack([clf.weights[s][ls.names.index("NORMAL")] for s in clf.styles]).mean(0)
    assert torch.allclose(d[0], expected, atol=1e-6)
    maps = E.explain(backbone, ls, image_dir / "rgb.jpg", ["NORMAL", "PNEUMONIA"], method="patch-text")
    assert maps[0].method == "patch-text" and not np.allclose(maps[0].map, maps[1].map)


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.parametrize("layout,method", [("timm-conv", "gradcam"), ("open_clip-vit", "rollout")])
def test_repeated_calls_release_hooks_and_memory(layout, method):
    backbone, _ = LAYOUTS[layout]()
    x = torch.randn(1, 3, backbone.image_size, backbone.image_size)
    d = _directions(n=1)
    for _ in range(5):  # warm-up: allocator pools, lazy imports
        E.explain_tensor(backbone, x, d, method)
    gc.collect()
    before = _rss_mb()
    for _ in range(40):  # benchmarks/bench_explain.py measures 500 calls on the bundled starter
        E.explain_tensor(backbone, x, d, method)
    gc.collect()
    assert _rss_mb() - before < 15, "memory grew over repeated heatmap calls"
    assert not any(m._forward_hooks or m._backward_hooks for m in backbone.module.modules())


# ----------------------------------------------------------------------------------- planted signal

def _disc_images(n: int, size: int, radius: int, rng: np.random.Generator, with_disc: np.ndarray):
    yy, xx = np.mgrid[0:size, 0:size]
    imgs, centres = [], []
    for has in with_disc:
        img = rng.uniform(0.25, 0.45) + rng.normal(0, 0.06, (size, size))
        cy, cx = rng.integers(radius + 1, size - radius - 1, size=2)
        if has:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] += 0.5
        imgs.append(np.clip(img, 0, 1))
        centres.append((cx, cy))
    x = torch.tensor(np.stack(imgs), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    return (x - 0.4) / 0.2, np.array(centres)


class _DiscViT(nn.Module):
    """A tiny open_clip VisionTransformer image tower (the layout of open_clip/OpenAI ViTs), trained
    below to raise one text direction when a bright disc is present."""

    def __init__(self):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.visual = VisionTransformer(image_size=64, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0,
                                        output_dim=16)

    def encode_image(self, x):
        return self.visual(x)


def _train_disc_model(model: nn.Module, direction: torch.Tensor, size: int, radius: int, steps: int, lr: float,
                      rng: np.random.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        y = rng.random(16) < 0.5
        x, _ = _disc_images(16, size, radius, rng, y)
        score = 10 * nn.functional.normalize(model.encode_image(x), dim=-1) @ direction.T
        loss = nn.functional.binary_cross_entropy_with_logits(score[:, 0], torch.tensor(y, dtype=torch.float32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_planted_signal_peak_falls_inside_the_disc():
    """A model that can only succeed by finding the disc must have its map peak on the disc."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    size, radius = 64, 8
    model = _DiscViT()
    direction = nn.functional.normalize(torch.randn(1, 16), dim=-1)
    _train_disc_model(model, direction, size, radius, steps=100, lr=1e-3, rng=rng)
    backbone = _backbone(model, size, "disc")
    x, centres = _disc_images(40, size, radius, rng, np.ones(40, bool))
    blank, _ = _disc_images(40, size, radius, rng, np.zeros(40, bool))
    with torch.no_grad():
        score = lambda z: (nn.functional.normalize(model.encode_image(z), dim=-1) @ direction.T)[:, 0]  # noqa: E731
        accuracy = ((score(x) > 0).float().mean() + (score(blank) < 0).float().mean()) / 2
    assert accuracy > 0.9, "the planted-signal model did not learn the disc"
    inside = 0
    for i in range(len(x)):
        name, maps, _ = E.explain_tensor(backbone, x[i:i + 1], direction * 10)
        hm = E._to_heatmap("disc", name, maps[0], 0.0, size, (0, 0, size, size))
        inside += np.hypot(hm.peak[0] - centres[i][0], hm.peak[1] - centres[i][1]) <= radius
    assert name == "rollout"
    assert inside / len(x) >= 0.9, f"peak inside the disc in only {inside}/{len(x)} images"


# ----------------------------------------------------------------------------------- randomisation

def _reinitialise_image_tower(module: nn.Module) -> None:
    torch.manual_seed(123)
    for m in module.visual.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


@pytest.mark.shared_data
def test_model_randomisation_changes_the_maps():
    """Adebayo et al. 2018: maps of the trained starter and of the same model with its image tower
    re-initialised must not agree (mean Spearman rank correlation <= 0.3)."""
    from scipy.stats import spearmanr

    from vlm.labels import load_label_set
    from vlm.models import load_model

    data = needs_shared_data("nih14")
    images = sorted(data.glob("*.jpg"))[:6]
    ls = load_label_set("chestxray14")
    labels = ["Cardiomegaly", "Effusion", "Pneumonia"]
    trained = load_model("vlm-xray-starter")
    randomised = load_model("vlm-xray-starter")
    _reinitialise_image_tower(randomised.module)
    rhos = []
    for img in images:
        a = E.explain(trained, ls, img, labels)
        b = E.explain(randomised, ls, img, labels, classifier=None)
        for ha, hb in zip(a, b):
            rho = spearmanr(ha.map.ravel(), hb.map.ravel()).statistic
            rhos.append(0.0 if np.isnan(rho) else rho)
    assert np.mean(rhos) <= 0.3, f"mean Spearman {np.mean(rhos):.2f} between trained and randomised maps"
    # and the trained model's maps are image-specific
    m1 = E.explain(trained, ls, images[0], ["Effusion"])[0].map
    m2 = E.explain(trained, ls, images[1], ["Effusion"])[0].map
    assert not np.allclose(m1, m2)


def test_report_shows_heatmaps_inline_and_json_keeps_paths_only(openclip_dir, image_dir):
    from vlm.images import load_image
    from vlm.labels import load_label_set
    from vlm.models import load_model
    from vlm.report import render_report
    from vlm.results import ImageResult
    from vlm.scoring import Scorer

    backbone = load_model(str(openclip_dir))
    ls = load_label_set("chestxray14")
    path = image_dir / "grey8.png"
    result = next(Scorer(backbone, ls).score([path], threshold=0.0))
    pixels = load_image(path).pixels
    maps = E.explain(backbone, ls, path, ["Cardiomegaly", "Effusion"])
    result.heatmaps = [{**m.to_dict(), "data_uri": m.data_uri(pixels)} for m in maps]
    result.ood = {"in_distribution": False, "score": 20.0, "threshold": 14.0, "reason": "far <away>",
                  "method": "mahalanobis", "details": {}}
    html = render_report(result, fmt="html")
    assert html.count('<img src="data:image/png;base64,') >= 2 and html.count('alt="Regions that raised the score') == 2
    assert "Regions that raised this score" in html and "Saliency is not localisation" in html
    assert 'id="ood-warning"' in html and "far &lt;away&gt;" in html  # autoescaped
    d = result.to_dict()
    assert "data_uri" not in json.dumps(d) and d["heatmaps"][0]["label"] == "Cardiomegaly"
    back = ImageResult.from_dict(json.loads(json.dumps(d)))
    assert back.ood["in_distribution"] is False and back.heatmaps[1]["label"] == "Effusion"
    result.heatmaps, result.ood = [], None
    plain = render_report(result, fmt="html")
    assert 'id="heatmaps"' not in plain and 'id="ood-warning"' not in plain
