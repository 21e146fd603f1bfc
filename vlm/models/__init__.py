"""One factory, `load_model(name_or_path)`, hiding every checkpoint layout.

`name_or_path` may be a registry name (`vlm-xray models list`), `hf-hub:org/repo`, an open_clip
architecture with a tag (`ViT-B-32:openai`), an open_clip folder, a Hugging Face CLIPModel folder,
an OpenAI/CheXzero `.pt` state dict, or a `.safetensors` file. Missing weights raise
`ModelLoadError` naming the model, where it looked and how to provide it; nothing is ever
replaced by random weights.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ..fileio import read_yaml
from .base import Backbone, ModelLoadError, complete, file_fingerprint, state_dict_fingerprint
from .layouts import LAYOUTS, build_open_clip, load_open_clip_dir, load_open_clip_pretrained, load_openai_file, load_path

DEFAULT_MODEL = "vlm-xray-starter"

__all__ = ["Backbone", "ModelLoadError", "DEFAULT_MODEL", "LAYOUTS", "load_model", "list_models", "model_registry",
           "build_open_clip", "complete", "file_fingerprint", "state_dict_fingerprint", "bundled_dir"]


def bundled_dir() -> Path:
    return Path(str(resources.files("vlm.models"))) / "bundled"


def model_registry() -> dict[str, dict]:
    return read_yaml(Path(str(resources.files("vlm.models"))) / "registry.yaml", "model registry", ModelLoadError)


def _registry_status(entry: dict) -> str:
    kind = entry["kind"]
    if kind == "bundled":
        return "bundled" if (bundled_dir().parent / entry["path"] / "open_clip_config.json").is_file() else "missing"
    if kind == "file":
        return "local" if _file_candidates(entry, existing_only=True) else "not found"
    return "download"


def _file_candidates(entry: dict, existing_only: bool = False) -> list[Path]:
    cands = []
    if entry.get("env") and os.environ.get(entry["env"]):
        cands.append(Path(os.environ[entry["env"]]).expanduser())
    cands += [Path(p).expanduser() for p in entry.get("paths", [])]
    return [c for c in cands if c.is_file()] if existing_only else cands


def list_models() -> list[dict]:
    """Registry entries with their availability (bundled / local / download / missing)."""
    return [{"name": k, "kind": v["kind"], "status": _registry_status(v), "description": v.get("description", "")}
            for k, v in model_registry().items()]


def _load_bundled(name: str, entry: dict, defer_text: bool = False) -> Backbone:
    path = bundled_dir().parent / entry["path"]
    if not (path / "open_clip_config.json").is_file():
        raise ModelLoadError(
            f"bundled model {name!r} is not in this installation (looked in {path}). "
            f"Reinstall vlm-xray, or train it with `vlm-xray pretrain` and pass --model PATH.")
    return load_open_clip_dir(path, name, defer_text)


def _load_hub(name: str, entry: dict, defer_text: bool = False) -> Backbone:
    return load_open_clip_pretrained(entry["id"], entry.get("pretrained"), name)


def _load_user_file(name: str, entry: dict, defer_text: bool = False) -> Backbone:
    found = _file_candidates(entry, existing_only=True)
    if not found:
        looked = ", ".join(str(c) for c in _file_candidates(entry)) or "(nowhere)"
        raise ModelLoadError(f"model {name!r}: checkpoint not found (looked in: {looked}). {entry.get('how', '')}")
    return load_openai_file(found[0], name)


# registry.yaml `kind` -> loader of that kind of entry: (name, entry, defer_text) -> Backbone
REGISTRY_KINDS = {"bundled": _load_bundled, "open_clip": _load_hub, "file": _load_user_file}


def load_model(name_or_path: str | None = None, device: str = "cpu", defer_text: bool = False) -> Backbone:
    """The model `name_or_path` names (None: the bundled starter) on `device`. defer_text: a pretrained HF
    text tower (the starters' MiniLM) is built when text is first encoded, not now - for scoring, whose
    prompt embeddings usually come from the store (`vlm.models.deferred_text`)."""
    spec = name_or_path or DEFAULT_MODEL
    reg = model_registry()
    if spec in reg:
        kind = reg[spec]["kind"]
        if kind not in REGISTRY_KINDS:
            raise ModelLoadError(f"registry entry {spec!r} has unknown kind {kind!r}")
        backbone = REGISTRY_KINDS[kind](spec, reg[spec], defer_text)
    elif spec.startswith("hf-hub:"):
        backbone = load_open_clip_pretrained(spec, None, spec)
    elif Path(spec).expanduser().exists():
        backbone = load_path(Path(spec).expanduser(), Path(spec).name, defer_text)
    elif ":" in spec and not spec.startswith(("/", ".")) and "/" not in spec.split(":")[0]:
        arch, tag = spec.split(":", 1)
        backbone = load_open_clip_pretrained(arch, tag, spec)
    else:
        raise ModelLoadError(
            f"model {spec!r} not found: it is not a registry name ({', '.join(reg)}), not an hf-hub: id, "
            f"and no file or folder exists at {Path(spec).expanduser().resolve()}. "
            f"See `vlm-xray models list`.")
    return backbone.to(device)
