"""The LiT model: open_clip `CustomTextCLIP` with a timm image tower (random init) and the
all-MiniLM-L6-v2 text tower (locked, or LoRA-adapted), plus the text side used in training."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import TEXT_CFG, TEXT_WIDTH, PretrainConfig


def build_model_cfg(image_tower: str, image_size: int, embed_dim: int, loss: str = "multipos") -> dict:
    cfg = {
        "embed_dim": int(embed_dim),
        "custom_text": True,
        "vision_cfg": {"timm_model_name": image_tower, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "linear", "image_size": int(image_size)},
        "text_cfg": dict(TEXT_CFG),
    }
    if loss == "siglip":
        cfg["init_logit_scale"] = math.log(10.0)
        cfg["init_logit_bias"] = -10.0
    return cfg


def lora_target_linears(model) -> list[str]:
    """Names of the image tower's attention projections that are `nn.Linear` (LoRA can adapt them)."""
    return [n for n, m in model.visual.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("qkv", "q", "k", "v", "kv", "proj")
            and ("attn" in n or "xca" in n or "attention" in n)]


def build_model(config: PretrainConfig) -> tuple[torch.nn.Module, dict]:
    """(model, its open_clip model config). The text projection starts as the identity when the
    joint space is MiniLM's own (embed_dim 384), else a random orthogonal map; the text tower is
    frozen except for LoRA weights when `text_lora`. Consumes the global torch RNG (image tower init)."""
    from ..models.layouts import build_open_clip

    model_cfg = build_model_cfg(config.image_tower, config.image_size, config.embed_dim, config.loss)
    model = build_open_clip(model_cfg, pretrained_text=True)
    if config.embed_dim == TEXT_WIDTH:
        with torch.no_grad():
            model.text.proj.weight.copy_(torch.eye(TEXT_WIDTH))
    else:
        torch.nn.init.orthogonal_(model.text.proj.weight)
    for p in model.text.parameters():
        p.requires_grad = False
    model.text.proj.weight.requires_grad = bool(config.train_text_proj)
    if config.text_lora:
        from peft import LoraConfig, get_peft_model

        model.text.transformer = get_peft_model(
            model.text.transformer, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"]))
    return model, model_cfg


def text_features(model, texts: list[str], tokenizer, batch: int = 64, device="cpu") -> torch.Tensor:
    """Pooled (pre-projection) MiniLM features of `texts`."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            tok = tokenizer(texts[i:i + batch]).to(device)
            mask = (tok != model.text.config.pad_token_id).long()
            out = model.text.transformer(input_ids=tok, attention_mask=mask)
            outs.append(model.text.pooler(out, mask).float())
    return torch.cat(outs) if outs else torch.zeros(0, TEXT_WIDTH)


class TextSide:
    """Embeddings of the run's texts (captions, then prompts) by index.

    A locked text tower is run once over every text (pooled features kept); with LoRA the
    transformer runs per step on the tokens (with gradients while training)."""

    def __init__(self, model, texts: list[str], device: torch.device, lora: bool):
        from ..models.layouts import _open_clip_tokenizer

        self.model, self.device = model, device
        tokenizer = _open_clip_tokenizer(TEXT_CFG)
        self.features = None if lora else text_features(model, texts, tokenizer, device=device)  # (T, 384)
        self.tokens = tokenizer(texts) if lora else None
        self.grad = lora

    def embed(self, ids, training: bool = True) -> torch.Tensor:
        """L2-normalised projected embeddings of the texts `ids`."""
        ids = torch.as_tensor(ids)
        model = self.model
        if self.features is not None:
            pooled = self.features[ids].to(self.device)
        else:
            uniq, inv = torch.unique(ids, return_inverse=True)
            tok = self.tokens[uniq].to(self.device)
            mask = (tok != model.text.config.pad_token_id).long()
            with torch.enable_grad() if (training and self.grad) else torch.no_grad():
                out = model.text.transformer(input_ids=tok, attention_mask=mask)
                pooled = model.text.pooler(out, mask).float()[inv]
        return F.normalize(model.text.proj(pooled), dim=-1)
