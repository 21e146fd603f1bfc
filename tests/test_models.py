"""The model factory reads every checkpoint layout, and refuses clearly when weights are absent."""
import json

import pytest
import torch
from click.testing import CliRunner

from vlm.cli import main
from vlm.models import ModelLoadError, list_models, load_model


def _image_and_text(backbone):
    torch.manual_seed(0)
    x = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    return backbone.encode_images(x), backbone.encode_texts(["chest x-ray with effusion", "no effusion"])


def test_open_clip_folder_loads_same_weights(openclip_dir, tiny_model):
    b = load_model(str(openclip_dir))
    assert b.layout == "open_clip folder"
    assert b.mean == (0.5, 0.5, 0.5) and b.image_size == 32
    assert b.card and "tiny test model" in b.card
    x = torch.randn(1, 3, 32, 32)
    ref = torch.nn.functional.normalize(tiny_model.encode_image(x), dim=-1)
    assert torch.allclose(b.encode_images(x), ref, atol=1e-6)


def test_openai_pt_state_dict(openai_pt, openclip_dir):
    b = load_model(str(openai_pt))
    assert b.layout == "OpenAI/CheXzero state dict"
    ref = load_model(str(openclip_dir))
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(b.encode_images(x), ref.encode_images(x), atol=1e-5)
    img, txt = _image_and_text(b)
    assert img.shape == (2, 32) and txt.shape == (2, 32)


def test_openai_layout_safetensors(openai_safetensors):
    b = load_model(str(openai_safetensors))
    assert b.layout == "OpenAI-layout safetensors"
    img, txt = _image_and_text(b)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_safetensors_in_open_clip_folder(openclip_dir):
    b = load_model(str(openclip_dir / "open_clip_model.safetensors"))
    assert b.layout == "open_clip folder"


def test_hf_clip_folder(hf_clip_dir):
    b = load_model(str(hf_clip_dir))
    assert b.layout == "Hugging Face CLIPModel folder"
    assert b.std == (0.3, 0.3, 0.3)
    img, txt = _image_and_text(b)
    assert img.shape == (2, 16) and txt.shape == (2, 16)
    assert not torch.allclose(txt[0], txt[1])


def test_chexzero_registry_entry_uses_env_path(openai_pt, monkeypatch):
    monkeypatch.setenv("VLM_XRAY_CHEXZERO", str(openai_pt))
    b = load_model("chexzero")
    assert b.name == "chexzero" and b.source == str(openai_pt)


def test_missing_chexzero_names_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_XRAY_CHEXZERO", str(tmp_path / "nope.pt"))
    with pytest.raises(ModelLoadError) as e:
        load_model("chexzero")
    msg = str(e.value)
    assert "chexzero" in msg and str(tmp_path / "nope.pt") in msg and "VLM_XRAY_CHEXZERO" in msg


def test_folder_without_weights_is_refused_not_randomised(openclip_dir, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "open_clip_config.json").write_text((openclip_dir / "open_clip_config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights file"):
        load_model(str(d))


def test_mismatched_weights_are_refused(openclip_dir, tmp_path):
    d = tmp_path / "mismatch"
    d.mkdir()
    cfg = json.loads((openclip_dir / "open_clip_config.json").read_text())
    cfg["model_cfg"]["embed_dim"] = 48
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    (d / "open_clip_model.safetensors").write_bytes((openclip_dir / "open_clip_model.safetensors").read_bytes())
    with pytest.raises((ModelLoadError, RuntimeError)):
        load_model(str(d))


def test_hub_model_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("hf-hub:someone/does-not-exist-clip")
    assert "hf-hub:someone/does-not-exist-clip" in str(e.value) and "--model PATH" in str(e.value)


def test_unknown_model_lists_options():
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("no-such-model-or-path")


def test_cli_missing_model_is_one_line_exit_2(monkeypatch, image_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(main, ["analyze", str(image_dir / "grey8.png"), "--model", "biomedclip"])
    assert r.exit_code == 2
    assert "biomedclip" in r.output and "Traceback" not in r.output


def test_registry_lists_required_models():
    names = {m["name"] for m in list_models()}
    assert {"biomedclip", "openai-vit-b-32", "openai-vit-b-16", "chexzero", "vlm-xray-starter"} <= names


def test_torchscript_archive_and_pickles(tmp_path, tiny_model):
    """OpenAI's original .pt files are TorchScript archives; arbitrary pickles are refused."""
    class Holder(torch.nn.Module):
        def __init__(self, sd):
            super().__init__()
            for k, v in sd.items():
                self.register_buffer(k.replace(".", "__"), v)

    # A TorchScript archive whose state dict is the OpenAI layout is read via torch.jit.load.
    sd = tiny_model.state_dict()
    scripted = torch.jit.script(Holder(sd))
    p = tmp_path / "scripted.pt"
    scripted.save(str(p))
    from vlm.models.layouts import _is_torchscript, _load_state_dict

    assert _is_torchscript(p)
    assert set(_load_state_dict(p)) == {k.replace(".", "__") for k in sd}

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ModelLoadError, match="weights-only"):
        load_model(str(bad))
