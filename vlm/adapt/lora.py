"""LoRA few-shot fine-tuning of a CLIP-style backbone's attention projections (PEFT).

Targets are DETECTED, not hard-coded: inside the image tower (and the text tower with
`lora_text`), every `nn.MultiheadAttention` (fused in_proj; PEFT's LoRA for it also adapts
out_proj), every `nn.Linear` named like a fused q/k/v projection (`qkv`, `in_proj`, `c_attn`,
...) and every separate query/value `nn.Linear` (`q_proj`/`v_proj`, BERT's `query`/`value`) is a
candidate. Each candidate is then VERIFIED on a copy of the model: a nonzero LoRA update of that
module alone must change the tower's output. Modules whose weights are read directly instead of
called (e.g. open_clip's ModifiedResNet `AttentionPool2d`, which passes `q_proj.weight` to
`F.multi_head_attention_forward`) fail that check and are skipped, and said so.

The classifier is the label set's prompt embeddings (`PromptHead`, CLIP-LoRA style) with the
model's logit scale, so zero training steps reproduce zero-shot scoring exactly.
"""
from __future__ import annotations

import logging
import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import LabelledData
from ..images import ImageLoadError, load_image
from ..labels import LabelSet
from ..metrics import confident_gain, per_label_confident_gain, selection_auc
from ..models import Backbone, complete
from ..prompt_classifier import build_prompt_classifier, text_classifier
from ..transforms import model_tensors
from ..variants import get_variant
from .heads import PromptHead

logger = logging.getLogger(__name__)

IMAGE_TOWERS = ("visual", "model.vision_model", "vision_model")
TEXT_TOWERS = ("text", "model.text_model", "text_model", "transformer")  # transformer: open_clip CLIP's text
FUSED_QKV = {"qkv", "in_proj", "c_attn", "wqkv", "qkv_proj", "to_qkv", "query_key_value"}
SEPARATE_QV = {"q_proj", "v_proj", "query", "value", "to_q", "to_v", "q", "v"}
ATTENTION_HINTS = ("attn", "attention", "xca", "mixer")


MIN_GAIN = 0.005  # a trained epoch replaces zero-shot only if it beats it by this val macro AUC
# and the gain's paired-bootstrap 10% quantile over the validation images is above 0


class LoraTargetError(ValueError):
    """No attention projection in the tower can carry a working LoRA adapter."""


# ----------------------------------------------------------------------------- target detection

def tower_prefix(module: nn.Module, tower: str) -> str | None:
    names = dict(complete(module).named_modules())
    for p in (IMAGE_TOWERS if tower == "image" else TEXT_TOWERS):
        if p in names:
            return p
    return None


def find_candidates(module: nn.Module, tower: str) -> list[tuple[str, str]]:
    """(full module name, kind) of the attention projections in `tower` ("image" or "text")."""
    prefix = tower_prefix(module, tower)
    if prefix is None:
        return []
    root = module.get_submodule(prefix)
    mha = [n for n, m in root.named_modules() if isinstance(m, nn.MultiheadAttention)]
    out = []
    for n, m in root.named_modules():
        full = f"{prefix}.{n}" if n else prefix
        if isinstance(m, nn.MultiheadAttention):
            if getattr(m, "_qkv_same_embed_dim", True):
                out.append((full, "MultiheadAttention (fused in_proj + out_proj)"))
            continue
        if not isinstance(m, nn.Linear) or any(n.startswith(h + ".") for h in mha):
            continue
        last = n.rsplit(".", 1)[-1]
        if last.lower() in FUSED_QKV:
            out.append((full, "Linear (fused q/k/v)"))
        elif last in SEPARATE_QV and (len(last) > 1 or any(h in n.lower() for h in ATTENTION_HINTS)):
            if last in ("q_proj", "query", "to_q", "q"):
                out.append((full, "Linear (query)"))
            else:
                out.append((full, "Linear (value)"))
    return out


def _probe_output(backbone: Backbone, module: nn.Module, tower: str) -> torch.Tensor:
    dev = next(module.parameters()).device
    if tower == "image":
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, backbone.image_size, backbone.image_size, generator=g).to(dev)
        return module.encode_image(x).float()
    tokens = backbone.tokenize(["chest radiograph with a finding", "normal study"])
    tokens = {k: v.to(dev) for k, v in tokens.items()} if isinstance(tokens, dict) else tokens.to(dev)
    return module.encode_text(tokens).float()


def _lora_config(names: list[str], rank: int, alpha: float, dropout: float):
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=list(names),
                      bias="none")


@torch.no_grad()
def verify_targets(backbone: Backbone, names: list[str], tower: str, rank: int = 4,
                   effects: dict | None = None) -> tuple[list[str], dict[str, str]]:
    """Split `names` into those where a nonzero LoRA update changes `tower`'s output and the rest.

    A target whose LoRA layer is never called (its weights are read directly) leaves the output
    bit-identical. `effects` (if given) receives each target's relative output change for a
    random B ~ N(0, 0.5^2): tiny values mean the branch is damped, e.g. by a layer-scale gamma.
    Works on a deep copy; the backbone is not modified."""
    from peft import inject_adapter_in_model

    if not names:
        return [], {}
    probe = copy.deepcopy(complete(backbone.module)).eval()
    inject_adapter_in_model(_lora_config(names, rank, 2 * rank, 0.0), probe)
    base = _probe_output(backbone, probe, tower)
    ref = base.abs().max().item() or 1.0
    good, bad = [], {}
    g = torch.Generator().manual_seed(1)
    for name in names:
        sub = probe.get_submodule(name)
        bs = [p for n, p in sub.named_parameters() if "lora_B" in n]
        if not bs:
            bad[name] = "PEFT did not attach a LoRA layer"
            continue
        for p in bs:
            p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.5)
        diff = (_probe_output(backbone, probe, tower) - base).abs().max().item()
        for p in bs:
            p.zero_()
        if effects is not None:
            effects[name] = diff / ref
        if diff > 0:
            good.append(name)
        else:
            bad[name] = "output unchanged by a nonzero LoRA update (weights read directly, not called)"
    return good, bad


def gating_scales(module: nn.Module, targets: list[str]) -> list[str]:
    """Layer-scale parameters that multiply the attention branches holding `targets`.

    EdgeNeXt's `gamma_xca`, timm ViT's `ls1.gamma`: initialised at ~1e-6 and often still tiny
    after pre-training, they make a LoRA update of the attention projections almost invisible.
    Found by name next to the attention module (the target's parent) inside its block."""
    out = []
    names = dict(module.named_parameters())
    for t in targets:
        parts = t.split(".")
        if len(parts) < 3:
            continue
        block, attn = ".".join(parts[:-2]), parts[-2]
        for cand in (f"{block}.gamma_{attn}", f"{block}.{attn}_gamma", f"{block}.ls1.gamma", f"{block}.ls_{attn}.gamma",
                     f"{block}.layer_scale_1", f"{block}.gamma_1"):
            if cand in names and names[cand].dim() == 1 and cand not in out:
                out.append(cand)
    return out


_DETECTED: dict[tuple, dict] = {}


def detect_targets(backbone: Backbone, towers: tuple[str, ...] = ("image",)) -> dict:
    """Candidates per tower, verified. Raises LoraTargetError when a tower has none that work.

    Memoised per (fingerprint, towers): the fingerprint names the weights, so repeated runs on one
    model (a few-shot study) verify once."""
    key = (backbone.fingerprint, tuple(towers), id(backbone.module)) if backbone.fingerprint else None
    if key is not None and key in _DETECTED:
        return copy.deepcopy(_DETECTED[key])
    out = _detect_targets(backbone, towers)
    if key is not None:
        _DETECTED[key] = copy.deepcopy(out)
    return out


def _detect_targets(backbone: Backbone, towers: tuple[str, ...]) -> dict:
    found: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    skipped: dict[str, str] = {}
    effects: dict[str, float] = {}
    for tower in towers:
        cands = find_candidates(backbone.module, tower)
        kinds.update(dict(cands))
        good, bad = verify_targets(backbone, [n for n, _ in cands], tower, effects=effects)
        skipped.update(bad)
        for n, why in bad.items():
            logger.warning(f"LoRA target {n} skipped: {why}")
        if not good:
            listing = "; ".join(f"{n}: {why}" for n, why in bad.items()) or "none found"
            raise LoraTargetError(
                f"{backbone.name}: no usable attention projection for LoRA in the {tower} tower "
                f"(looked for nn.MultiheadAttention and nn.Linear named qkv/in_proj/q_proj/v_proj/query/value; "
                f"{listing}). Use --method linear-probe or --method tip-adapter instead.")
        found[tower] = good
    return {"targets": found, "kinds": {n: kinds[n] for t in found.values() for n in t}, "skipped": skipped,
            "effects": {n: effects[n] for t in found.values() for n in t}}


# ----------------------------------------------------------------------------- training data

def load_pixels(paths: list[str]) -> tuple[list[np.ndarray], list[int]]:
    """'original'-variant RGB pixels of each readable path, and the indices that were readable."""
    original = get_variant("original")
    px, keep = [], []
    for i, p in enumerate(paths):
        try:
            px.append(original(load_image(p).pixels))
            keep.append(i)
        except ImageLoadError as e:
            logger.warning(f"skipping unreadable training image {p}: {e.reason}")
    return px, keep


def augment(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light augmentation: random crop (85-100% area), +-5 degree rotation, horizontal flip,
    +-10% contrast and brightness."""
    h, w = px.shape[:2]
    area = rng.uniform(0.85, 1.0)
    ratio = math.exp(rng.uniform(math.log(0.9), math.log(1.1)))
    ch = min(h, int(round(math.sqrt(area / ratio) * h)))
    cw = min(w, int(round(math.sqrt(area * ratio) * w)))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = px[top : top + ch, left : left + cw]
    angle = rng.uniform(-5, 5)
    m = cv2.getRotationMatrix2D((cw / 2, ch / 2), angle, 1.0)
    img = cv2.warpAffine(img, m, (cw, ch), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    c, b = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1) * 255
    img = np.clip(img.astype(np.float32) * c + b + (1 - c) * img.mean(), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def _tensors(backbone: Backbone, pixels: list[np.ndarray]) -> torch.Tensor:
    return model_tensors(pixels, backbone.image_size, backbone.mean, backbone.std)


# ----------------------------------------------------------------------------- training

@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    lr: float = 1e-3
    head_lr: float | None = 1e-2  # the prompt-initialised head (None: lr); features of small towers are close
    # together, so a linear head needs large weights: 1e-2 fits 16 shots in the step budget, 1e-3 does not
    weight_decay: float = 0.01
    epochs: int = 40
    batch_size: int = 16
    lora_text: bool = False
    train_head: bool = True
    augment: bool = True
    patience: int = 8
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimiser steps (0: the untrained adapter)
    # also train the layer-scale gammas gating the targeted attention branches: "auto" = when a
    # LoRA update of the targets barely moves the output (median relative effect < 1e-4)
    layer_scale: str = "auto"
    # CLAP-style anchor: penalty anchor * ||W - W_zero_shot||^2 / ||W_zero_shot||^2 on the head weights
    anchor: float = 0.0
    # WiSE-FT: the kept adapter is zero-shot + a * (trained - zero-shot), a chosen on the validation
    # images from these (a = 0 is zero-shot, which the never-worse guard falls back to)
    wise_alphas: tuple = (0.25, 0.5, 0.75, 1.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LoraResult:
    # a copy of the base backbone with LoRA layers (fingerprint still the base's); the base backbone itself
    # when the per-label guard dropped the LoRA update (then lora_config is None)
    backbone: Backbone
    head: nn.Module  # PromptHead, or a GuardedHead around it
    lora_config: object  # peft.LoraConfig, or None
    info: dict
    extra_state: dict = dataclasses.field(default_factory=dict)  # trained layer-scale gammas (base-model names)


def prompt_weights(backbone: Backbone, module: nn.Module, label_set: LabelSet, styles: list[str]) -> torch.Tensor:
    """Ensembled prompt embeddings (S, L[, 2], D) computed through `module`'s text tower, with grad
    (the one prompt-classifier builder, with this module as the text encoder)."""

    def embed_texts(texts: list[str]) -> torch.Tensor:
        uniq = list(dict.fromkeys(texts))  # each distinct prompt through the text tower once
        dev = next(module.parameters()).device
        tokens = backbone.tokenize(uniq)
        tokens = {k: v.to(dev) for k, v in tokens.items()} if isinstance(tokens, dict) else tokens.to(dev)
        emb = F.normalize(module.encode_text(tokens).float(), dim=-1)
        row = {t: i for i, t in enumerate(uniq)}
        return emb[[row[t] for t in texts]]

    clf = build_prompt_classifier(label_set, styles, embed_texts, backbone.logit_scale)
    return torch.stack([clf.weights[s] for s in clf.styles])


def head_loss(head: PromptHead, emb: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None):
    lg = head.logits(emb, weight)  # (B, S, L[, 2])
    if head.multilabel:
        diff = lg[..., 0] - lg[..., 1]
        return F.binary_cross_entropy_with_logits(diff, targets[:, None, :].expand_as(diff).float())
    s = lg.shape[1]
    # soft targets: a row labelled with a group (e.g. skin12 "benign keratosis") spreads over its members
    y = targets.float() / targets.float().sum(1, keepdim=True).clamp(min=1)
    return sum(F.cross_entropy(lg[:, i], y) for i in range(s)) / s


def count_parameters(module: nn.Module, head: nn.Module | None = None) -> tuple[int, int]:
    """(trainable, total) parameters of module (+ head)."""
    params = list(module.parameters()) + (list(head.parameters()) if head is not None else [])
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@torch.no_grad()
def encode_tensors(module: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    dev = next(module.parameters()).device
    out = [F.normalize(module.encode_image(x[i : i + batch_size].to(dev)).float(), dim=-1)
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def disable_noop_adapters(module: nn.Module) -> int:
    """Switch off LoRA layers whose B matrices are all zero (an exact no-op), so they run the
    base layer itself. PEFT's MultiheadAttention LoRA re-assigns in_proj_weight as a plain tensor
    for every call, which changes float rounding (~1e-7) even for a zero update; with this an
    untrained (or early-stopped-at-epoch-0) adapter reproduces zero-shot scores bit for bit.
    Returns how many layers were switched off."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for m in module.modules():
        if isinstance(m, LoraLayer) and hasattr(m, "lora_B"):
            bs = [b.weight for b in m.lora_B.values()]
            out = getattr(getattr(m.get_base_layer(), "out_proj", None), "lora_B", None)
            if isinstance(getattr(m.get_base_layer(), "out_proj", None), LoraLayer) and out is not None:
                bs += [b.weight for b in out.values()]
            if bs and all(not b.any() for b in bs):
                m._disable_adapters = True
                n += 1
    return n


def apply_lora(base_module: nn.Module, config, lora_state: dict[str, torch.Tensor],
               extra_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of `base_module` with LoRA layers (`config`) holding `lora_state`
    (`get_peft_model_state_dict` keys), frozen, in eval mode, no-op layers switched off.

    Both training and `load_adapter` end here, so an adapter in memory and the same adapter
    reloaded from its folder compute bit-identical outputs (PEFT's MultiheadAttention LoRA merges
    and unmerges into the base weights on every call, which drifts them by float rounding; the
    fresh copy starts from the untouched base weights)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    module = copy.deepcopy(complete(base_module))  # a deferred text tower is built first: LoRA may target it
    inject_adapter_in_model(config, module)
    res = set_peft_model_state_dict(module, lora_state)
    unexpected = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"LoRA weights do not fit the model: unexpected {unexpected[:3]}")
    n_lora = sum(1 for k in module.state_dict() if "lora_" in k)
    if n_lora != len(lora_state):
        raise ValueError(f"{len(lora_state)} LoRA tensors given but the model has {n_lora} LoRA tensors")
    if extra_state:
        params = dict(module.named_parameters())
        missing = [k for k in extra_state if k not in params]
        if missing:
            raise ValueError(f"adapter layer-scale tensors {missing[:3]} are not parameters of the model")
        with torch.no_grad():
            for k, v in extra_state.items():
                if params[k].shape != v.shape:
                    raise ValueError(f"adapter tensor {k}: shape {tuple(v.shape)} != model {tuple(params[k].shape)}")
                params[k].copy_(v.to(params[k]))
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    disable_noop_adapters(module)
    return module


def _set_lora_train(module: nn.Module, training: bool) -> None:
    """Base model stays in eval mode (frozen norms, no base dropout); only LoRA dropout trains."""
    module.eval()
    if training:
        for n, m in module.named_modules():
            if n.endswith("lora_dropout"):
                m.train()


def _lora_module(backbone: Backbone, st: LoraSettings, towers: tuple[str, ...]):
    """(detected targets, target names, LoraConfig, a copy of the module with LoRA layers (only they train),
    layer-scale gammas also trained)."""
    from peft import inject_adapter_in_model

    det = detect_targets(backbone, towers)
    names = [n for t in towers for n in det["targets"][t]]
    config = _lora_config(names, st.rank, st.alpha, st.dropout)
    module = copy.deepcopy(complete(backbone.module))
    for p in module.parameters():
        p.requires_grad_(False)
    torch.manual_seed(st.seed)
    inject_adapter_in_model(config, module)
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n)
    img_effects = [det["effects"][n] for n in det["targets"]["image"]]
    median_effect = float(np.median(img_effects)) if img_effects else 1.0
    scales = []
    if st.layer_scale == "on" or (st.layer_scale == "auto" and median_effect < 1e-4):
        scales = gating_scales(module, det["targets"]["image"])
        params = dict(module.named_parameters())
        for n in scales:
            params[n].requires_grad_(True)
        if scales:
            logger.info(f"LoRA targets barely move the output (median relative effect {median_effect:.1e}); also training "
                f"their layer-scale gammas: {', '.join(scales)}")
        elif st.layer_scale == "auto":
            logger.info(f"warning: LoRA targets barely move the output (median relative effect {median_effect:.1e}) and no "
                f"layer-scale gamma was found; the head will do most of the adaptation")
    return det, names, config, module, scales


def _log_trainable(module: nn.Module, head: PromptHead, names, scales, train_head: bool, st: LoraSettings):
    """(trainable, total, breakdown) parameter counts, logged."""
    trainable, total = count_parameters(module, head)
    named = dict(module.named_parameters())
    breakdown = {"lora": sum(p.numel() for n, p in named.items() if "lora_" in n and p.requires_grad),
                 "layer_scale": sum(named[n].numel() for n in scales),
                 "head": head.weight.numel() if train_head else 0}
    logger.info(f"LoRA r={st.rank} alpha={st.alpha} dropout={st.dropout} on {len(names)} module(s): "
        + ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else ""))
    logger.info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%): "
        + ", ".join(f"{k} {v:,}" for k, v in breakdown.items() if v))
    return trainable, total, breakdown


def _param_groups(module: nn.Module, head: PromptHead, scales, train_head: bool, st: LoraSettings) -> list[dict]:
    """AdamW groups: LoRA weights (with weight decay), layer-scale gammas and the head (without)."""
    groups = [{"params": [p for n, p in module.named_parameters() if p.requires_grad and n not in scales],
               "lr": st.lr, "weight_decay": st.weight_decay}]
    if scales:
        params = dict(module.named_parameters())
        groups.append({"params": [params[n] for n in scales], "lr": st.lr, "weight_decay": 0.0})
    if train_head:
        groups.append({"params": [head.weight], "lr": st.head_lr if st.head_lr is not None else st.lr,
                       "weight_decay": 0.0})
    return groups


def _lora_info(det, scales, st, trainable, breakdown, total, train_head, n, step, epoch, best_epoch, best_auc,
               history, t0) -> dict:
    return {
        "method": "lora",
        "targets": det["targets"],
        "target_kinds": det["kinds"],
        "skipped_targets": det["skipped"],
        "target_effects": det["effects"],
        "layer_scale_params": scales,
        "lora": {"r": st.rank, "alpha": st.alpha, "dropout": st.dropout},
        "trainable_params": trainable,
        "trainable_breakdown": breakdown,
        "total_params": total,
        "head_trained": train_head,
        "n_train_images": n,
        "steps": step,
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        "best_val_macro_auc": best_auc,
        "history": history,
        "train_seconds": round(time.time() - t0, 1),
        "settings": st.to_dict(),
    }


def _training_data(backbone: Backbone, train: LabelledData, val: LabelledData | None):
    """('original' pixels of the readable training images, their targets, validation tensors, targets)."""
    pixels, keep = load_pixels(train.paths)
    if not pixels:
        raise ValueError(f"{train.csv_path}: none of the {len(train)} training images could be read")
    y_train = torch.from_numpy(train.targets[keep]).float()
    val_x = val_t = val_sources = None
    if val is not None and len(val):
        vpx, vkeep = load_pixels(val.paths)
        val_x, val_t = _tensors(backbone, vpx), val.targets[vkeep]
        sources = val.column("source")
        val_sources = np.array([sources[i] for i in vkeep], dtype=object) if any(sources) else None
    return pixels, y_train, (val_x, val_t, val_sources)


def _optimiser(module: nn.Module, head: PromptHead, scales, train_head: bool, st: LoraSettings, n: int):
    """(AdamW, cosine schedule over the run, total steps, steps per epoch) for `n` training images."""
    opt = torch.optim.AdamW(_param_groups(module, head, scales, train_head, st))
    steps_per_epoch = max(1, math.ceil(n / st.batch_size))
    total_steps = st.epochs * steps_per_epoch
    if st.max_steps is not None:
        total_steps = min(total_steps, st.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(1, total_steps))))
    return opt, sched, total_steps, steps_per_epoch


def _adapted_backbone(backbone: Backbone, module: nn.Module, head: PromptHead, config, scales, st: LoraSettings,
                      label_set: LabelSet, styles: list[str]):
    """(the backbone with the trained LoRA state applied to a fresh copy, layer-scale state); head frozen."""
    from peft import get_peft_model_state_dict

    lora_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()}
    params = dict(module.named_parameters())
    extra_state = {n: params[n].detach().clone() for n in scales}
    module = apply_lora(backbone.module, config, lora_state, extra_state)
    adapted = dataclasses.replace(backbone, module=module)
    if st.lora_text:  # bake the adapted text tower's prompt embeddings into the head
        with torch.no_grad():
            head.weight.copy_(prompt_weights(backbone, module, label_set, styles))
    for p in head.parameters():
        p.requires_grad_(False)
    head.eval()
    return adapted, extra_state


def train_lora(
    backbone: Backbone,
    label_set: LabelSet,
    train: LabelledData,
    val: LabelledData | None = None,
    settings: LoraSettings | None = None,
    styles: list[str] | None = None,
    progress: bool = True,
) -> LoraResult:
    """Fine-tune LoRA adapters (+ the prompt head) on `train`; early-stop on `val` macro AUC.

    With `val`, the epoch-0 (untrained = zero-shot) state competes too, so the returned adapter
    is never worse than zero-shot on the validation data."""
    st = settings or LoraSettings()
    t0 = time.time()
    torch.manual_seed(st.seed)
    rng = np.random.default_rng(st.seed)
    styles = label_set.styles(styles)
    towers = ("image", "text") if st.lora_text else ("image",)
    det, names, config, module, scales = _lora_module(backbone, st, towers)
    classifier = text_classifier(backbone, label_set, styles)
    head = PromptHead.from_classifier(classifier).to(backbone.device)
    train_head = st.train_head and not st.lora_text  # with text LoRA the head is the text tower's output
    head.weight.requires_grad_(train_head)
    trainable, total, breakdown = _log_trainable(module, head, names, scales, train_head, st)

    pixels, y_train, (val_x, val_t, val_sources) = _training_data(backbone, train, val)
    n = len(pixels)
    opt, sched, total_steps, steps_per_epoch = _optimiser(module, head, scales, train_head, st, n)

    def current_weight():
        return prompt_weights(backbone, module, label_set, styles) if st.lora_text else None

    val_probs: dict[int, np.ndarray] = {}

    def evaluate() -> float | None:
        if val_x is None:
            return None
        _set_lora_train(module, False)
        with torch.no_grad():
            w = current_weight()
            emb = encode_tensors(module, val_x)
            probs = head.probabilities_from(emb, w).mean(1).cpu().numpy()
        val_probs[epoch] = probs
        return selection_auc(val_t, probs, val_sources)

    def snapshot():
        return {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" in k or k in scales}, \
            head.weight.detach().clone()

    history = []
    epoch = 0
    best_auc = zero_shot_auc = evaluate()
    best_epoch, best_state = 0, snapshot()
    zero_shot_state = best_state
    w_zero = zero_shot_state[1]
    if best_auc is not None:
        history.append({"epoch": 0, "step": 0, "loss": None, "val_macro_auc": best_auc})
        logger.info(f"epoch 0 (zero-shot): val macro AUC {best_auc:.4f}")
    bar = None
    if progress and total_steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="lora", unit="step")
    step, since_best, epoch = 0, 0, 0
    eval_every = max(1, round(8 / steps_per_epoch))  # validate about every 8 steps, at most once an epoch
    while step < total_steps:
        epoch += 1
        _set_lora_train(module, True)
        order = rng.permutation(n)
        losses = []
        for i in range(0, n, st.batch_size):
            if step >= total_steps:
                break
            idx = order[i : i + st.batch_size]
            imgs = [augment(pixels[j], rng) if st.augment else pixels[j] for j in idx]
            x = _tensors(backbone, imgs).to(backbone.device)
            emb = F.normalize(module.encode_image(x).float(), dim=-1)
            loss = head_loss(head, emb, y_train[idx].to(emb.device), current_weight())
            if st.anchor and train_head:
                loss = loss + st.anchor * (head.weight - w_zero).pow(2).sum() / w_zero.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", epoch=epoch)
        last = step >= total_steps
        auc = evaluate() if (epoch % eval_every == 0 or last) else None
        history.append({"epoch": epoch, "step": step, "loss": float(np.mean(losses)) if losses else None,
                        "val_macro_auc": auc})
        if bar is not None and auc is not None:
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", val_auc=f"{auc:.4f}", epoch=epoch)
        if auc is not None:
            if auc > best_auc + 1e-6:
                best_auc, best_epoch, best_state, since_best = auc, epoch, snapshot(), 0
            else:
                since_best += 1
                if since_best >= st.patience:
                    logger.info(f"early stop at epoch {epoch}: no val improvement in {st.patience} validation rounds")
                    break
    if bar is not None:
        bar.close()
    wise = None
    if val_x is not None:
        choice = _keep_or_fall_back(module, head, (val_x, val_t, val_probs[0], val_sources), label_set, st, zero_shot_state,
                                    best_state, best_epoch, best_auc, zero_shot_auc, current_weight)
        best_epoch, best_auc, wise = choice
    else:
        best_epoch = epoch
    changes_images = _changes_images(module, backbone.module, scales)
    adapted, extra_state = _adapted_backbone(backbone, module, head, config, scales, st, label_set, styles)
    info = _lora_info(det, scales, st, trainable, breakdown, total, train_head, n, step, epoch, best_epoch,
                      best_auc, history, t0)
    info["wise_ft"] = wise
    result = LoraResult(adapted, head, config, info, extra_state)
    return _label_guard(backbone, result, w_zero, (val_x, val_t, val_sources), label_set, st.seed, changes_images)


def _changes_images(module: nn.Module, base_module: nn.Module, scales: list[str]) -> bool:
    """Whether the kept LoRA state changes image embeddings at all (a nonzero B, or a moved gamma)."""
    state = module.state_dict()
    base = dict(base_module.named_parameters())
    return any(v.any() for k, v in state.items() if "lora_B" in k) or \
        any(not torch.equal(state[n], base[n]) for n in scales)


def _label_guard(backbone: Backbone, res: LoraResult, w_zero: torch.Tensor, val, label_set: LabelSet, seed: int,
                 changes_images: bool) -> LoraResult:
    """The per-label never-worse guard (vlm.adapt.guard) on a trained LoRA adapter.

    A fallen-back label needs its zero-shot score, i.e. the image embedding WITHOUT the LoRA update;
    serving it would take a second image pass through the base tower in every scorer. Instead: the
    LoRA update is kept only when every label clearly beats zero-shot with it; otherwise it is
    dropped and the trained head, on base embeddings, goes through the guard like any head-type
    adapter (labels that do not clearly beat zero-shot there are served by their prompt prototype)."""
    from . import guard
    from .guard import _confident, _mean_probs, guard_head, label_groups, label_report

    val_x, val_t, val_sources = val
    if val_x is None:
        res.info["label_guard"] = {"applied": False, "why": "no validation images"}
        logger.warning("no validation images: the per-label never-worse guard cannot run")
        return res
    if res.info["best_epoch"] == 0 or not guard.ENABLED:
        why = "the kept adapter is zero-shot already" if guard.ENABLED else "switched off (a measurement)"
        res.info["label_guard"] = {"applied": False, "why": why}
        return res
    head = res.head
    zs = PromptHead(w_zero, head.scale, head.multilabel, head.styles).to(w_zero.device).eval()
    base_emb = encode_tensors(backbone.module, val_x)
    if changes_images:
        p_zs = _mean_probs(zs, base_emb)
        p_ad = _mean_probs(head, encode_tensors(res.backbone.module, val_x))
        gain, lower = per_label_confident_gain(val_t, p_ad, p_zs, val_sources, n_boot=guard.N_BOOT, seed=seed,
                                               quantile=guard.QUANTILE)
        if _confident(gain, lower).all():
            report = label_report(val_t, p_ad, p_zs, val_sources, label_set.names, np.zeros(len(gain), bool))
            res.info["label_guard"] = {"applied": True, "lora_update": "kept", **report}
            logger.info("per-label guard: every label clearly beats zero-shot with the LoRA update; kept")
            return res
        logger.info("per-label guard: with the LoRA update not every label clearly beats zero-shot "
                    f"({', '.join(n for n, ok in zip(label_set.names, _confident(gain, lower)) if not ok)}); "
                    "dropping the update, guarding the head on base-model embeddings")
    served, report = guard_head(head, zs, base_emb, val_t, val_sources, label_set.names, seed, label_groups(label_set))
    update = "dropped (a label did not clearly beat zero-shot with it)" if changes_images else "none (no-op)"
    res.info["label_guard"] = {"applied": True, "lora_update": update, **report}
    if served is head and not changes_images:
        return res  # nothing falls back and LoRA is a no-op: the adapter as trained
    return LoraResult(backbone, served, None, res.info, {})


def interpolate_state(zero: tuple, trained: tuple, alpha: float) -> tuple[dict, torch.Tensor]:
    """WiSE-FT between the zero-shot and the trained (LoRA state, head weight): the LoRA update
    B @ A becomes alpha * B @ A (B starts at 0), layer-scale gammas and the head move linearly."""
    z_state, z_head = zero
    t_state, t_head = trained
    state = {k: (v if "lora_A" in k else alpha * v if "lora_B" in k else z_state[k] + alpha * (v - z_state[k]))
             for k, v in t_state.items()}
    return state, z_head + alpha * (t_head - z_head)


def _keep_or_fall_back(module, head, val, label_set, st: LoraSettings, zero_state, best_state, best_epoch: int,
                       best_auc: float, zero_shot_auc: float, current_weight) -> tuple[int, float, dict]:
    """Load the kept adapter into module/head: the best epoch interpolated toward zero-shot by the
    WiSE-FT amount that scores best on the validation images (ties: the smaller amount), or
    zero-shot itself unless that clearly beats it (gain >= MIN_GAIN, bootstrap 10 % quantile > 0)."""
    val_x, val_t, zs_probs, val_sources = val

    def load(state) -> np.ndarray:
        module.load_state_dict(state[0], strict=False)
        with torch.no_grad():
            head.weight.copy_(state[1])
            _set_lora_train(module, False)
            return head.probabilities_from(encode_tensors(module, val_x), current_weight()).mean(1).cpu().numpy()

    scores = {}
    if best_epoch > 0:
        for a in sorted(st.wise_alphas):
            probs = load(interpolate_state(zero_state, best_state, a))
            scores[a] = (selection_auc(val_t, probs, val_sources), probs)
    alpha = max(scores, key=lambda a: (round(scores[a][0], 6), -a)) if scores else 0.0
    if scores:
        gain, lower = confident_gain(val_t, scores[alpha][1], zs_probs, label_set, seed=st.seed, sources=val_sources)
        if not (gain >= MIN_GAIN and lower > 0):
            logger.info(f"epoch {best_epoch} at WiSE-FT a={alpha} (val macro AUC {scores[alpha][0]:.4f}) does not "
                        f"reliably beat zero-shot ({zero_shot_auc:.4f}; gain {gain:+.4f}, bootstrap 10% quantile "
                        f"{lower:+.4f}): keeping the zero-shot adapter")
            alpha = 0.0
    final = interpolate_state(zero_state, best_state, alpha) if alpha else zero_state
    load(final)
    kept_auc = scores[alpha][0] if alpha else zero_shot_auc
    kept_epoch = best_epoch if alpha else 0
    logger.info(f"validation macro AUC: zero-shot {zero_shot_auc:.4f}, adapted {kept_auc:.4f} "
                f"(epoch {kept_epoch}, WiSE-FT a={alpha})")
    return kept_epoch, kept_auc, {"alpha": alpha, "best_epoch": best_epoch, "zero_shot_val_macro_auc": zero_shot_auc,
                                  "val_macro_auc_by_alpha": {str(a): s[0] for a, s in scores.items()}}
