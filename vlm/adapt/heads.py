"""Classifier heads an adapter puts on top of the (possibly LoRA-adapted) image embeddings.

Every head maps L2-normalised image embeddings (..., D) to probabilities (..., S, L), the shape
`Scorer.probabilities` returns, and names its S "styles" in `.styles` (the Scorer reports them
as prompt styles). Heads are plain `nn.Module`s whose tensors are saved to `head.safetensors`;
`head_config()` plus those tensors rebuild them (`build_head`).

- `PromptHead`: the label set's ensembled prompt embeddings per style (CLIP-LoRA style), so an
  untrained head reproduces zero-shot scoring exactly; its weights may be fine-tuned.
- `LinearProbeHead`: a linear classifier on frozen features, initialised at zero-shot.
- `TipAdapterHead`: zero-shot logits per style + alpha * cache logits (Tip-Adapter, Zhang et al.
  2022): affinity exp(-beta (1 - cos)) to the few-shot keys, times their one-hot labels.
- `GuardedHead`: any of these with some labels served by their zero-shot prompt score (the
  per-label never-worse guard, `vlm.adapt.guard`); valid on base-model image embeddings only.
"""
from __future__ import annotations

import torch
from torch import nn

from ..prompt_classifier import prompt_logits, prompt_probabilities as _prompt_probs


class PromptHead(nn.Module):
    """weights (S, L, 2, D) multilabel (positive, negative) or (S, L, D) multiclass."""

    kind = "prompt"

    def __init__(self, weights: torch.Tensor, logit_scale: float, multilabel: bool, styles: list[str]):
        super().__init__()
        self.weight = nn.Parameter(weights.detach().clone().float())
        self.scale = float(logit_scale)  # a Python float, as in TextClassifier (same rounding)
        self.multilabel = bool(multilabel)
        self.styles = list(styles)

    @classmethod
    def from_classifier(cls, classifier) -> "PromptHead":
        w = torch.stack([classifier.weights[s] for s in classifier.styles])
        return cls(w, classifier.logit_scale, classifier.label_set.multilabel, classifier.styles)

    def logits(self, emb: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) -> (..., S, L, 2) multilabel or (..., S, L); `weight` overrides the stored one."""
        w = (self.weight if weight is None else weight).to(emb.dtype)
        # TextClassifier's own arithmetic (prompt_logits), so an untrained head is zero-shot exactly
        per = [prompt_logits(emb, w[i], self.scale, self.multilabel) for i in range(w.shape[0])]
        return torch.stack(per, dim=-3 if self.multilabel else -2)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return _prompt_probs(self.logits(emb), self.multilabel)

    def probabilities_from(self, emb: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return _prompt_probs(self.logits(emb, weight), self.multilabel)

    def head_config(self) -> dict:
        return {"type": self.kind, "multilabel": self.multilabel, "styles": self.styles,
                "logit_scale": self.scale}


class LinearProbeHead(nn.Module):
    """Logistic regression on frozen features, per prompt style: logits_s = e (W0_s + dW)^T + b.

    W0_s is the zero-shot classifier of style s (prompt embeddings x logit scale; multi-label:
    the positive-minus-negative direction, so sigmoid = the 2-way prompt softmax), dW and b are
    learned and shared by the styles. dW = 0, b = 0 reproduces zero-shot scoring exactly.
    Softmax (multi-class) or per-label sigmoid (multi-label)."""

    kind = "linear-probe"

    def __init__(self, weight0: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor, multilabel: bool,
                 styles: list[str]):
        super().__init__()
        self.register_buffer("weight0", weight0.detach().clone().float())  # (S, L, D)
        self.delta = nn.Parameter(delta.detach().clone().float())  # (L, D)
        self.bias = nn.Parameter(bias.detach().clone().float())  # (L,)
        self.multilabel = bool(multilabel)
        self.styles = list(styles)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., S, L)"""
        w = self.weight0.to(emb.dtype)
        d = self.delta.to(emb.dtype)
        per = [emb @ w[i].T + (emb @ d.T if self.delta.any() else 0) + self.bias.to(emb.dtype)
               for i in range(w.shape[0])]
        return torch.stack(per, dim=-2)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        lg = self.logits(emb)
        return lg.sigmoid() if self.multilabel else lg.softmax(-1)

    def head_config(self) -> dict:
        return {"type": self.kind, "multilabel": self.multilabel, "styles": self.styles}


class TipAdapterHead(nn.Module):
    """Zero-shot prompt logits per style blended with a few-shot cache (training-free).

    multiclass: logits_s = scale * e W_s^T + alpha * A Y, A = exp(-beta (1 - e K^T)).
    multilabel: each label's two-way (positive, negative) logits get + alpha * A (Y, 1 - Y).
    With alpha = 0 this is zero-shot exactly.
    """

    kind = "tip-adapter"

    def __init__(self, weights: torch.Tensor, logit_scale: float, multilabel: bool, styles: list[str],
                 keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float):
        super().__init__()
        self.prompt = PromptHead(weights, logit_scale, multilabel, styles)
        self.register_buffer("keys", keys.detach().clone().float())
        self.register_buffer("values", values.detach().clone().float())
        self.alpha, self.beta = float(alpha), float(beta)
        self.multilabel = bool(multilabel)
        self.styles = list(styles)

    def cache_logits(self, emb: torch.Tensor) -> torch.Tensor:
        aff = torch.exp(-self.beta * (1.0 - emb @ self.keys.to(emb.dtype).T))
        y = self.values.to(emb.dtype)
        if self.multilabel:
            return torch.stack([aff @ y, aff @ (1 - y)], dim=-1)  # (..., L, 2)
        return aff @ y  # (..., L)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        zs = self.prompt.logits(emb)  # (..., S, L[, 2])
        if self.alpha == 0.0:
            return _prompt_probs(zs, self.multilabel)
        cache = self.cache_logits(emb).unsqueeze(-3 if self.multilabel else -2)
        return _prompt_probs(zs + self.alpha * cache, self.multilabel)

    def head_config(self) -> dict:
        return {"type": self.kind, "multilabel": self.multilabel, "styles": self.styles,
                "logit_scale": self.prompt.scale, "alpha": self.alpha, "beta": self.beta}


def compose_with_zero_shot(p_adapted: torch.Tensor, p_zero_shot: torch.Tensor, keep_zero_shot: torch.Tensor) -> torch.Tensor:
    """Probabilities (..., L): the labels in `keep_zero_shot` (bool (L,)) take the zero-shot value exactly,
    the others the adapter's.

    Multi-class sets are NOT renormalised: rescaling the adapted labels into the mass the zero-shot
    labels leave would hand a single kept label exactly its zero-shot probability (1 - the others'), and
    change the scores the guard validated. So each label's score is the one-vs-rest score of its own
    source (adapter or zero-shot) and a row may not sum to 1."""
    return torch.where(keep_zero_shot.to(p_adapted.device), p_zero_shot, p_adapted)


class GuardedHead(nn.Module):
    """An adapter head whose labels in `keep_zero_shot` are served by their zero-shot prompt score.

    The per-label never-worse guard (`vlm.adapt.guard`) sets the mask: a label whose adapted score
    did not clearly beat zero-shot on the validation images keeps the base model's prompt prototype.
    Valid on base-model image embeddings only (head-type adapters): the zero-shot part is computed on
    the same embedding the adapted head sees, so a LoRA update of the image tower is never combined
    with it (`load_adapter` refuses that)."""

    kind = "guarded"

    def __init__(self, inner: nn.Module, zero_shot: PromptHead, keep_zero_shot, labels: list[str]):
        super().__init__()
        if list(inner.styles) != list(zero_shot.styles):
            raise ValueError(f"guarded head: adapter styles {inner.styles} != zero-shot styles {zero_shot.styles}")
        if len(keep_zero_shot) != len(labels):
            raise ValueError(f"guarded head: {len(keep_zero_shot)} mask entries for {len(labels)} labels")
        self.inner, self.zero_shot = inner, zero_shot
        # the mask lives in adapter.json (head config), not in the tensors: a reader sees which labels fall back
        self.register_buffer("keep_zero_shot", torch.tensor([bool(k) for k in keep_zero_shot]), persistent=False)
        self.labels = list(labels)
        self.multilabel = bool(zero_shot.multilabel)
        self.styles = list(zero_shot.styles)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return compose_with_zero_shot(self.inner(emb), self.zero_shot(emb), self.keep_zero_shot)

    def head_config(self) -> dict:
        return {"type": self.kind, "multilabel": self.multilabel, "styles": self.styles,
                "keep_zero_shot": dict(zip(self.labels, self.keep_zero_shot.tolist())),
                "inner": self.inner.head_config(), "zero_shot": self.zero_shot.head_config()}


def _build_guarded(config: dict, tensors: dict[str, torch.Tensor]) -> GuardedHead:
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    mask = config["keep_zero_shot"]
    return GuardedHead(build_head(config["inner"], part("inner.")), build_head(config["zero_shot"], part("zero_shot.")),
                       list(mask.values()), list(mask))


# head type (as saved in head_config()["type"]) -> builder from (config, tensors); adding a head = one entry
HEAD_BUILDERS = {
    PromptHead.kind: lambda c, t: PromptHead(t["weight"], c["logit_scale"], bool(c["multilabel"]), c["styles"]),
    LinearProbeHead.kind: lambda c, t: LinearProbeHead(t["weight0"], t["delta"], t["bias"], bool(c["multilabel"]),
                                                       c["styles"]),
    TipAdapterHead.kind: lambda c, t: TipAdapterHead(t["prompt.weight"], c["logit_scale"], bool(c["multilabel"]),
                                                     c["styles"], t["keys"], t["values"], c["alpha"], c["beta"]),
    GuardedHead.kind: _build_guarded,
}


def build_head(config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a head from its `head_config()` and saved state dict."""
    kind = config.get("type")
    if kind not in HEAD_BUILDERS:
        raise ValueError(f"unknown adapter head type {kind!r} (known: {', '.join(HEAD_BUILDERS)})")
    head = HEAD_BUILDERS[kind](config, tensors)
    head.load_state_dict(tensors, strict=True)
    for p in head.parameters():
        p.requires_grad_(False)
    return head.eval()
