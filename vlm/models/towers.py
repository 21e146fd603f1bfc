"""Small image towers registered with timm, so open_clip's `TimmModel` builds them by name.

`convvit_*`: a convolutional stem (cheap, data-efficient local features at 1/16 resolution)
feeding a few standard pre-norm transformer blocks (timm `vision_transformer.Block`: fused
`attn.qkv` / `attn.proj` `nn.Linear`, no layer-scale). Unlike EdgeNeXt, whose attention branches
are gated by layer-scale gammas initialised at 1e-6 (so LoRA on them barely moves the output),
every transformer block here contributes at full weight from the start: LoRA on `attn.qkv`
changes the embedding. Any input size works (learned 2-D position embedding, interpolated).

Importing this module registers the models (timm's "adding a model is one decorated function");
`vlm.models.layouts.build_open_clip` imports it before building a model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import Block

__all__ = ["ConvBodyAttn", "ConvViT", "convvit_small", "convvit_tiny", "edgenext_xx_small_attn2"]


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class _InvertedResidual(nn.Module):
    """MobileNetV2-style block: 1x1 expand, 3x3 depthwise (optionally strided), 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 2):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def _add_token_blocks(m: nn.Module, dim: int, grid: int, depth: int, num_heads: int, mlp_ratio: float,
                      drop_path_rate: float, num_classes: int, global_pool: str) -> None:
    """The transformer part both towers share: a learned 2-D position embedding over a grid x grid
    token map, `depth` timm blocks (fused attn.qkv, no layer-scale), token norm, optional head."""
    m.grid = grid
    m.pos_embed = nn.Parameter(torch.zeros(1, dim, grid, grid))
    nn.init.trunc_normal_(m.pos_embed, std=0.02)
    dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
    m.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=d) for d in dpr])
    m.norm = nn.LayerNorm(dim)
    m.num_features = m.embed_dim = dim
    m.global_pool = global_pool
    m.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()


class ConvViT(nn.Module):
    """Conv stem to 1/16 resolution, then `depth` transformer blocks over the (H/16 x W/16) tokens."""

    def __init__(self, stem_widths=(32, 48, 96), embed_dim: int = 192, depth: int = 4, num_heads: int = 3,
                 mlp_ratio: float = 2.0, grid: int = 10, num_classes: int = 0, global_pool: str = "avg",
                 drop_path_rate: float = 0.0, in_chans: int = 3, **_ignored):
        super().__init__()
        w1, w2, w3 = stem_widths
        # patchify 4x4 first: full-resolution conv layers dominate CPU time for little gain at this size
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, w1, 4, 4, bias=False), nn.BatchNorm2d(w1), nn.GELU(),  # 1/4
            _InvertedResidual(w1, w2),
            _InvertedResidual(w2, w3, stride=2),           # 1/8
            _InvertedResidual(w3, w3),
            nn.Conv2d(w3, embed_dim, 2, 2),                # 1/16 patch merge -> tokens
        )
        _add_token_blocks(self, embed_dim, grid, depth, num_heads, mlp_ratio, drop_path_rate, num_classes, global_pool)
        self.default_cfg = self.pretrained_cfg = {"pool_size": None, "num_classes": num_classes,
                                                  "input_size": (3, 16 * grid, 16 * grid)}
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int = 0, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h, w = x.shape[-2:]
        pos = self.pos_embed if (h, w) == (self.grid, self.grid) else \
            F.interpolate(self.pos_embed, size=(h, w), mode="bicubic", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)  # (B, h*w, C)
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(1)
        elif self.global_pool == "max":
            x = x.amax(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _build(pretrained: bool, **kwargs) -> ConvViT:
    if pretrained:
        raise ValueError("convvit towers have no pretrained weights; they are trained by `vlm-xray pretrain`")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return ConvViT(**kwargs)


@register_model
def convvit_tiny(pretrained: bool = False, **kwargs) -> ConvViT:
    """~1.9 M parameters; 4 blocks x 192 wide, 3 heads; 10x10 tokens at 160 px."""
    return _build(pretrained, **{"embed_dim": 192, "depth": 4, "num_heads": 3, "mlp_ratio": 2.0, **kwargs})


@register_model
def convvit_small(pretrained: bool = False, **kwargs) -> ConvViT:
    """~4 M parameters; 6 blocks x 256 wide, 4 heads."""
    return _build(pretrained, **{"stem_widths": (32, 64, 128), "embed_dim": 256, "depth": 6, "num_heads": 4,
                                 "mlp_ratio": 2.0, **kwargs})



class ConvBodyAttn(nn.Module):
    """A timm conv network's final feature map (its own head norm applied per location) as tokens,
    then `depth` standard transformer blocks (fused `attn.qkv`, no layer-scale), then avg pool.

    Built for a second training stage on top of an already trained conv tower (the EdgeNeXt
    starters): the body's weights can be copied from that tower (keys `body.*`), the blocks start
    near identity (small init of their output projections) and learn attention over the spatial
    tokens, which also gives few-shot LoRA attention projections that carry full weight."""

    def __init__(self, body: str = "edgenext_xx_small", depth: int = 2, num_heads: int = 4, mlp_ratio: float = 2.0,
                 grid: int = 4, num_classes: int = 0, global_pool: str = "avg", drop_path_rate: float = 0.0,
                 **_ignored):
        super().__init__()
        import timm

        self.body = timm.create_model(body, pretrained=False, num_classes=0, global_pool="")
        _add_token_blocks(self, self.body.num_features, grid, depth, num_heads, mlp_ratio, drop_path_rate, num_classes,
                          global_pool)
        self.default_cfg = self.pretrained_cfg = {"pool_size": None, "num_classes": num_classes}
        # the body's stages, as the body itself lists them: the OOD guard pools their outputs, Grad-CAM
        # explains the last one (gradients flow back through the new blocks)
        self.feature_info = [{**f, "module": f"body.{f['module']}"} for f in self.body.feature_info]
        for m in self.blocks.modules():
            ConvViT._init(m)

    reset_classifier = ConvViT.reset_classifier
    forward_head = ConvViT.forward_head

    def tokens_from_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """Body feature map (B, C, h, w) -> normalised tokens after the transformer blocks."""
        h, w = fmap.shape[-2:]
        pos = self.pos_embed if (h, w) == (self.grid, self.grid) else \
            F.interpolate(self.pos_embed, size=(h, w), mode="bicubic", align_corners=False)
        return self.norm(self.blocks((fmap + pos).flatten(2).transpose(1, 2)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens_from_map(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def edgenext_xx_small_attn2(pretrained: bool = False, **kwargs) -> ConvBodyAttn:
    """edgenext_xx_small body (1.2 M) + 2 transformer blocks x 168 wide, 4 heads (+0.47 M); size/32 tokens a
    side (4x4 at 128 px, 6x6 at 192 px)."""
    if pretrained:
        raise ValueError("edgenext_xx_small_attn2 has no pretrained weights; see vlm.pretrain_stage2")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return ConvBodyAttn(**{"body": "edgenext_xx_small", "depth": 2, "num_heads": 4, **kwargs})
