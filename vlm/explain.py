"""Heatmaps: which image regions raised a finding's score.

The target of every map is the finding's prompt-ensemble score, never an embedding dimension:
for multi-label sets the positive minus negative prompt logit, for multi-class sets the class
logit, both averaged over prompt styles. Because the embedding is L2-normalised and the logits are
linear in it, a label's target is `normalize(encode_image(x)) . direction_label`, with the
direction built once from the text classifier.

Methods are chosen by the image tower through two small registries:

    TOWERS:  detector(module) -> Tower (kind "conv" or "vit", plus how to reach its layers)
    METHODS: name -> function(tower, pixels (1,3,S,S), directions (L,D)) -> maps (L, gh, gw)

conv towers (timm ConvNets such as the bundled EdgeNeXt starters, OpenAI ModifiedResNet): the
Grad-CAM family from the `grad-cam` package on the last stage's feature map. ViT towers (open_clip
VisionTransformer incl. OpenAI/CheXzero layouts, timm ViT inside open_clip e.g. BiomedCLIP, Hugging
Face CLIP): gradient-weighted attention rollout (Chefer et al. 2021) and patch-to-text similarity.
Grad-CAM is not offered for ViTs: only the CLS token reaches the head, so the last block's
gradient on patch tokens is zero.

Saliency is not localisation: a map shows what moved the score, which may be a shortcut.
"""
from __future__ import annotations

import base64
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_METHOD = {"conv": "gradcam", "vit": "rollout"}
COLORMAPS = {"jet": cv2.COLORMAP_JET, "inferno": cv2.COLORMAP_INFERNO, "viridis": cv2.COLORMAP_VIRIDIS,
             "turbo": cv2.COLORMAP_TURBO, "hot": cv2.COLORMAP_HOT}


class ExplainError(ValueError):
    """A heatmap cannot be made (unknown method, tower without that method, unknown label)."""


# ----------------------------------------------------------------------------------- results

@dataclass
class Heatmap:
    """One finding's map on one image.

    map: float32 (S, S) in [0, 1] over the model's input crop (the image's shorter side resized to
    S, centre-cropped). crop_box: (x0, y0, x1, y1) of that crop in original image pixels.
    peak: (x, y) of the map's maximum in original image pixels. score: the target's value.
    """

    label: str
    method: str
    map: np.ndarray
    crop_box: tuple[float, float, float, float]
    peak: tuple[int, int]
    score: float
    raw_range: tuple[float, float] = (0.0, 1.0)  # min/max of the map before scaling to [0, 1]
    files: dict[str, str] = field(default_factory=dict)  # kind -> path, once saved

    def to_dict(self) -> dict:
        d = {"label": self.label, "method": self.method, "peak": list(self.peak), "score": round(self.score, 6),
             "crop_box": [round(v, 2) for v in self.crop_box], "map_size": list(self.map.shape),
             "empty": self.empty}
        if self.files:
            d["files"] = dict(self.files)
        return d

    @property
    def empty(self) -> bool:
        """No region raised the score (e.g. Grad-CAM's ReLU left nothing): the map is all zeros."""
        return not self.raw_range[1] > self.raw_range[0]

    def overlay(self, pixels: np.ndarray, alpha: float = 0.45, colormap: str = "jet",
                max_side: int | None = 512) -> np.ndarray:
        return overlay(pixels, self, alpha=alpha, colormap=colormap, max_side=max_side)

    def png(self, pixels: np.ndarray, **kwargs) -> bytes:
        return encode_png(self.overlay(pixels, **kwargs))

    def data_uri(self, pixels: np.ndarray, **kwargs) -> str:
        """The overlay as an inline `data:image/png;base64,...` URI (reports stay offline)."""
        return "data:image/png;base64," + base64.b64encode(self.png(pixels, **kwargs)).decode("ascii")


def overlay(pixels: np.ndarray, heatmap: Heatmap, alpha: float = 0.45, colormap: str = "jet",
            max_side: int | None = 512) -> np.ndarray:
    """RGB uint8 image with the map blended over its crop region (outside the crop: unchanged)."""
    if colormap not in COLORMAPS:
        raise ExplainError(f"unknown colormap {colormap!r}; available: {', '.join(COLORMAPS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ExplainError(f"alpha must be in [0, 1], got {alpha}")
    img = _rgb(pixels)
    h, w = img.shape[:2]
    scale = min(1.0, max_side / max(h, w)) if max_side else 1.0
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    x0, y0, x1, y1 = (round(v * scale) for v in heatmap.crop_box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(img.shape[1], x1), min(img.shape[0], y1)
    m = cv2.resize(heatmap.map.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.uint8(np.clip(m, 0, 1) * 255), COLORMAPS[colormap])[..., ::-1]
    out = img.copy()
    region = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.uint8((1 - alpha) * region + alpha * colour)
    return out


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ExplainError("PNG encoding of the overlay failed")
    return buf.tobytes()


def _rgb(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels[:, :, :3]


# ----------------------------------------------------------------------------------- towers

@dataclass
class Tower:
    """How to reach an image tower's layers for explanation."""

    kind: str  # "conv" or "vit"
    layout: str  # e.g. "timm-conv", "open_clip-vit", "timm-vit", "hf-clip-vit", "openai-resnet"
    owner: nn.Module  # the CLIP-style module; owner.encode_image(pixels) -> unnormalised image features
    target_layer: nn.Module | None = None  # conv: the last stage
    capture_attention: Callable[[], "contextmanager"] | None = None  # vit: yields list of (B,H,N,N)
    patch_features: Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, int]]] | None = None
    prefix_tokens: int = 1

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.owner.encode_image(pixels)


TOWERS: list[Callable[[nn.Module], Tower | None]] = []


def register_tower(detector: Callable[[nn.Module], Tower | None]):
    TOWERS.append(detector)
    return detector


def tower_of(module: nn.Module) -> Tower:
    for detect in TOWERS:
        tower = detect(module)
        if tower is not None:
            return tower
    visual = getattr(module, "visual", module)
    raise ExplainError(f"no heatmap method knows this image tower ({type(visual).__name__}); supported: timm "
                       f"ConvNets, OpenAI ModifiedResNet, open_clip/OpenAI ViT, timm ViT, Hugging Face CLIP")


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _explicit_mha(mha: nn.MultiheadAttention, captured: list[torch.Tensor]):
    """A stand-in forward for a self-attention nn.MultiheadAttention that computes the attention
    matrix explicitly and keeps it (B, H, N, N): the weights MHA itself returns with
    need_weights=True are a reshaped copy that is not on the output's autograd path, so their
    gradient would be empty."""
    def forward(query, key=None, value=None, need_weights=False, attn_mask=None, **_ignored):
        x = query if mha.batch_first else query.transpose(0, 1)  # OpenAI layout is sequence-first
        b, n, c = x.shape
        heads = mha.num_heads
        q, k, v = nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        logits = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
        if attn_mask is not None:
            logits = logits + attn_mask.to(logits.dtype)
        attn = logits.softmax(-1)
        attn.retain_grad()
        captured.append(attn)
        out = mha.out_proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return (out if mha.batch_first else out.transpose(0, 1)), None
    return forward


@contextmanager
def _mha_attention(blocks: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """open_clip/OpenAI blocks call nn.MultiheadAttention with need_weights=False (and the OpenAI
    layout is sequence-first): swap in the explicit forward for this pass only."""
    captured: list[torch.Tensor] = []
    try:
        for blk in blocks:
            blk.attn.forward = _explicit_mha(blk.attn, captured)
        yield captured
    finally:
        for blk in blocks:
            blk.attn.__dict__.pop("forward", None)


@contextmanager
def _timm_attention(blocks: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """timm's fused attention (scaled_dot_product_attention) never calls attn_drop, so a hook there
    sees nothing: switch fused_attn off for this pass only, and capture attn_drop's output."""
    captured: list[torch.Tensor] = []

    def post(_mod, _inp, out):
        out.retain_grad()
        captured.append(out)

    saved = [blk.attn.fused_attn for blk in blocks]
    handles = [blk.attn.attn_drop.register_forward_hook(post) for blk in blocks]
    try:
        for blk in blocks:
            blk.attn.fused_attn = False
        with _hooks(handles):
            yield captured
    finally:
        for blk, fused in zip(blocks, saved):
            blk.attn.fused_attn = fused


@contextmanager
def _hf_attention(vision_model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """HF CLIP returns attention weights only from the eager implementation: switch to it for
    this pass and capture each CLIPAttention's second output."""
    captured: list[torch.Tensor] = []

    def post(_mod, _inp, out):
        out[1].retain_grad()
        captured.append(out[1])

    cfg = vision_model.config
    saved = cfg._attn_implementation
    handles = [layer.self_attn.register_forward_hook(post) for layer in vision_model.encoder.layers]
    try:
        cfg._attn_implementation = "eager"
        with _hooks(handles):
            yield captured
    finally:
        cfg._attn_implementation = saved


@register_tower
def _open_clip_vit(module: nn.Module) -> Tower | None:
    from open_clip.transformer import VisionTransformer

    visual = getattr(module, "visual", None)
    if not isinstance(visual, VisionTransformer):
        return None
    if visual.attn_pool is not None:
        raise ExplainError("attention-pooled open_clip ViTs (CoCa) are not supported by the heatmap methods")
    blocks = list(visual.transformer.resblocks)

    def patch_features(x):
        tokens = visual.ln_post(visual.transformer(visual._embeds(x)))[:, 1:]
        grid = visual.grid_size
        return (tokens @ visual.proj if visual.proj is not None else tokens), tuple(grid)

    return Tower("vit", "open_clip-vit", module, capture_attention=lambda: _mha_attention(blocks),
                 patch_features=patch_features)


@register_tower
def _timm_tower(module: nn.Module) -> Tower | None:
    from open_clip.timm_model import TimmModel

    visual = getattr(module, "visual", None)
    if not isinstance(visual, TimmModel):
        return None
    trunk = visual.trunk
    if hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed") and hasattr(trunk.blocks[0], "attn") \
            and hasattr(trunk.blocks[0].attn, "fused_attn"):
        blocks = list(trunk.blocks)
        prefix = int(getattr(trunk, "num_prefix_tokens", 1))

        def patch_features(x):
            tokens = trunk.forward_features(x)[:, prefix:]
            return visual.head(tokens), _grid_side(tokens.shape[1])  # grid of this input, not the config's

        return Tower("vit", "timm-vit", module, capture_attention=lambda: _timm_attention(blocks),
                     patch_features=patch_features, prefix_tokens=prefix)
    info = getattr(trunk, "feature_info", None)
    if not info:
        return None
    last = info[-1]["module"] if hasattr(info, "__getitem__") else info.module_name()[-1]
    return Tower("conv", "timm-conv", module, target_layer=trunk.get_submodule(last))


@register_tower
def _openai_resnet(module: nn.Module) -> Tower | None:
    from open_clip.modified_resnet import ModifiedResNet

    visual = getattr(module, "visual", None)
    if not isinstance(visual, ModifiedResNet):
        return None
    return Tower("conv", "openai-resnet", module, target_layer=visual.layer4)


@register_tower
def _hf_clip(module: nn.Module) -> Tower | None:
    inner = getattr(module, "model", None)
    vision = getattr(inner, "vision_model", None)
    if vision is None or not hasattr(inner, "visual_projection"):
        return None

    def patch_features(x):
        hidden = vision(pixel_values=x).last_hidden_state[:, 1:]
        return inner.visual_projection(vision.post_layernorm(hidden)), _grid_side(hidden.shape[1])

    return Tower("vit", "hf-clip-vit", module, capture_attention=lambda: _hf_attention(vision),
                 patch_features=patch_features)


# ----------------------------------------------------------------------------------- methods

METHODS: dict[str, tuple[str, Callable]] = {}  # name -> (tower kind, fn(tower, pixels, directions))


def register_method(name: str, kind: str):
    def deco(fn):
        METHODS[name] = (kind, fn)
        return fn
    return deco


class _ScoreHead(nn.Module):
    """pixels -> (B, L) prompt-ensemble target scores; what the CAM package differentiates."""

    def __init__(self, tower: Tower, directions: torch.Tensor):
        super().__init__()
        self.owner = tower.owner  # a registered submodule, so the CAM package finds parameters
        self.directions = directions

    def forward(self, x):
        return nn.functional.normalize(self.owner.encode_image(x).float(), dim=-1) @ self.directions.T


def _grad_cam_family(cam_class):
    def method(tower: Tower, pixels: torch.Tensor, directions: torch.Tensor) -> np.ndarray:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        n = directions.shape[0]
        head = _ScoreHead(tower, directions)
        cam = cam_class(model=head, target_layers=[tower.target_layer])
        # Not `with cam:` - the package's __exit__ prints and swallows IndexErrors.
        try:
            maps = cam(input_tensor=pixels.repeat(n, 1, 1, 1),
                       targets=[ClassifierOutputTarget(i) for i in range(n)])
        finally:
            cam.activations_and_grads.release()
            cam.outputs = None
        return maps
    return method


def _register_cams() -> None:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM

    for name, cls in (("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus), ("hirescam", HiResCAM),
                      ("layercam", LayerCAM)):
        register_method(name, "conv")(_grad_cam_family(cls))


_register_cams()


@register_method("rollout", "vit")
def gradient_rollout(tower: Tower, pixels: torch.Tensor, directions: torch.Tensor) -> np.ndarray:
    """Chefer et al. 2021 (rule 6): R <- R + mean_heads(relu(dA * A)) R per block, read the CLS row."""
    with tower.capture_attention() as attns:
        score = _ScoreHead(tower, directions)(pixels)[0]  # (L,)
    if not attns:
        raise ExplainError(f"{tower.layout}: no attention maps were captured; this tower's attention layout "
                           f"is not one the rollout knows")
    maps = []
    for i in range(directions.shape[0]):
        grads = torch.autograd.grad(score[i], attns, retain_graph=i < directions.shape[0] - 1)
        n_tok = attns[0].shape[-1]
        r = torch.eye(n_tok)
        for a, g in zip(attns, grads):
            cam = (g[0] * a[0]).clamp(min=0).mean(0).detach().float()
            r = r + cam @ r
        maps.append(r[0, tower.prefix_tokens:].numpy())
    side = _grid_side(maps[0].shape[0])
    return np.stack([m.reshape(side) for m in maps])


@register_method("patch-text", "vit")
def patch_text_similarity(tower: Tower, pixels: torch.Tensor, directions: torch.Tensor) -> np.ndarray:
    """Each patch token, projected like the pooled token, scored against the label's text direction."""
    with torch.no_grad():
        feats, grid = tower.patch_features(pixels)
        sims = nn.functional.normalize(feats[0].float(), dim=-1) @ directions.T  # (N, L)
    return sims.T.reshape(directions.shape[0], *grid).numpy()


def _grid_side(n: int) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ExplainError(f"{n} patch tokens do not form a square grid")
    return side, side


# ----------------------------------------------------------------------------------- front

def label_directions(classifier, labels: Sequence[str]) -> torch.Tensor:
    """(L, D) text directions whose dot product with a normalised image embedding is each label's
    prompt-ensemble score, averaged over the classifier's prompt styles."""
    ls = classifier.label_set
    unknown = [lab for lab in labels if lab not in ls.names]
    if unknown:
        raise ExplainError(f"label(s) {', '.join(map(repr, unknown))} not in {ls.name}; available: "
                           f"{', '.join(ls.names)}")
    idx = [ls.names.index(lab) for lab in labels]
    per_style = []
    for s in classifier.styles:
        w = classifier.weights[s].float()
        per_style.append(w[:, 0] - w[:, 1] if ls.multilabel else w)
    return classifier.logit_scale * torch.stack(per_style).mean(0)[idx].cpu()


def choose_method(tower: Tower, method: str | None) -> str:
    if method is None:
        return DEFAULT_METHOD[tower.kind]
    if method not in METHODS:
        raise ExplainError(f"unknown heatmap method {method!r}; available: {', '.join(METHODS)}")
    if METHODS[method][0] != tower.kind:
        fits = [n for n, (k, _) in METHODS.items() if k == tower.kind]
        raise ExplainError(f"heatmap method {method!r} is for {METHODS[method][0]} towers; this model's "
                           f"image tower ({tower.layout}) takes: {', '.join(fits)}")
    return method


def methods_for(backbone) -> list[str]:
    """Heatmap methods available for a backbone's image tower (the default first)."""
    tower = tower_of(backbone.module)
    names = [n for n, (k, _) in METHODS.items() if k == tower.kind]
    return sorted(names, key=lambda n: n != DEFAULT_METHOD[tower.kind])


def explain_tensor(backbone, pixels: torch.Tensor, directions: torch.Tensor,
                   method: str | None = None) -> tuple[str, np.ndarray, np.ndarray]:
    """pixels (1,3,S,S) -> (method, raw maps (L, gh, gw), target scores (L,)). Model-level entry:
    directions may be any (L, D) text directions (tests plant their own)."""
    tower = tower_of(backbone.module)
    name = choose_method(tower, method)
    module = backbone.module
    was_training = module.training
    module.eval()
    device = backbone.device
    pixels, directions = pixels.to(device), directions.to(device)
    try:
        with torch.enable_grad():
            maps = METHODS[name][1](tower, pixels, directions)
        with torch.no_grad():
            scores = _ScoreHead(tower, directions)(pixels)[0].cpu().numpy()
    finally:
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    return name, np.asarray(maps, dtype=np.float32), scores


def _crop_box(h: int, w: int, size: int) -> tuple[float, float, float, float]:
    """The model-input crop of `transforms.resize_center_crop` as a box (x0, y0, x1, y1) in original pixels."""
    from .transforms import crop_geometry

    _, nh, nw, top, left = crop_geometry(h, w, size)
    sy, sx = h / nh, w / nw
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def _to_heatmap(label: str, method: str, raw: np.ndarray, score: float, size: int,
                crop_box: tuple[float, float, float, float]) -> Heatmap:
    up = cv2.resize(raw.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(up.min()), float(up.max())
    norm = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    py, px = np.unravel_index(int(np.argmax(up)), up.shape)
    x0, y0, x1, y1 = crop_box
    peak = (int((x0 + (px + 0.5) * (x1 - x0) / size)), int((y0 + (py + 0.5) * (y1 - y0) / size)))
    return Heatmap(label=label, method=method, map=norm, crop_box=crop_box, peak=peak, score=float(score),
                   raw_range=(lo, hi))


def explain(scorer_or_backbone, label_set, image, labels: Sequence[str] | None = None,
            method: str | None = None, classifier=None, prompt_styles: Sequence[str] | None = None) -> list[Heatmap]:
    """Heatmaps for `labels` (default: all labels of the set) on one image.

    scorer_or_backbone: a Scorer (its backbone, and its prompt classifier when it has one) or a
    Backbone. image: a path, a `vlm.images.Image`, or RGB/grey uint8 pixels. method: None picks the
    tower's default (gradcam for conv towers, rollout for ViTs); see `METHODS`. The map is made on the
    'original' preprocessing variant (no CLAHE/flip), with the model's own resize and centre crop."""
    from .transforms import model_transform

    backbone = getattr(scorer_or_backbone, "backbone", scorer_or_backbone)
    pixels = _pixels_of(image)
    labels = list(labels) if labels else list(label_set.names)
    if classifier is None:
        classifier = getattr(scorer_or_backbone, "classifier", None)
    if classifier is None or classifier.label_set.name != label_set.name:
        from .prompt_classifier import text_classifier

        classifier = text_classifier(backbone, label_set, list(prompt_styles) if prompt_styles else None)
    directions = label_directions(classifier, labels)
    x = model_transform(pixels, backbone.image_size, backbone.mean, backbone.std)[None]
    name, raw, scores = explain_tensor(backbone, x, directions, method)
    box = _crop_box(pixels.shape[0], pixels.shape[1], backbone.image_size)
    return [_to_heatmap(lab, name, raw[i], scores[i], backbone.image_size, box) for i, lab in enumerate(labels)]


def _pixels_of(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return _rgb(image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8))
    if isinstance(image, (str, Path)):
        from .images import load_image

        return load_image(image).pixels
    pixels = getattr(image, "pixels", None)
    if pixels is None:
        raise ExplainError(f"cannot explain a {type(image).__name__}: pass a path, a vlm Image or uint8 pixels")
    return pixels


def save_heatmaps(heatmaps: Sequence[Heatmap], pixels: np.ndarray, out_dir: str | Path, stem: str,
                  npy: bool = False, alpha: float = 0.45, colormap: str = "jet") -> list[Heatmap]:
    """Write `<stem>.<label>.<method>.png` overlays (and `.npy` float maps when asked) atomically;
    records the paths in each heatmap's `files`."""
    from .fileio import atomic_path, atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for hm in heatmaps:
        base = f"{stem}.{_safe(hm.label)}.{_safe(hm.method)}"
        png = out / f"{base}.png"
        atomic_write_bytes(png, hm.png(pixels, alpha=alpha, colormap=colormap, max_side=None))
        hm.files["png"] = str(png)
        if npy:
            with atomic_path(out / f"{base}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, hm.map)
            hm.files["npy"] = str(out / f"{base}.npy")
    return list(heatmaps)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_+" else "_" for c in name)


def attach_heatmaps(scorer, result, out_dir: str | Path | None = None, method: str | None = None,
                    load_options=None) -> None:
    """Heatmaps of `result`'s positive findings, added to `result.heatmaps` (the inline PNG for the
    HTML report; with `out_dir`, the overlay files too, whose paths the JSON then lists)."""
    from .images import load_image

    labels = [f.label for f in result.positives]
    if not labels:
        return
    pixels = load_image(result.image, load_options).pixels
    maps = explain(scorer, scorer.label_set, pixels, labels, method=method)
    if out_dir is not None:
        save_heatmaps(maps, pixels, out_dir, result.image_id)
    result.heatmaps = [{**hm.to_dict(), "data_uri": hm.data_uri(pixels)} for hm in maps]
