"""Training-free / frozen-feature few-shot baselines: linear probe and Tip-Adapter.

Both work on frozen, L2-normalised image embeddings of the shots ('original' variant) and pick
their one hyper-parameter set by cross-validation on the shots themselves (pooled held-out macro
AUC), with the zero-shot classifier among the candidates, so they fall back to zero-shot when the
shots cannot show that adapting helps.

- Linear probe: logistic regression e (W0_s + dW)^T + b per prompt style s, initialised at the
  zero-shot classifier W0_s (prompt embeddings times the logit scale; dW = 0, b = 0 is zero-shot
  exactly) and L2-regularised towards it, lambda * ||dW||^2 (lambda chosen from a grid; a small
  lambda is close to a plain linear probe). Full-batch L-BFGS, deterministic.
- Tip-Adapter (Zhang et al. 2022, training-free): logits = zero-shot logits + alpha * A Y with
  A = exp(-beta (1 - e K^T)), K = shot features, Y = one-hot shot labels; (alpha, beta) from a small
  grid by leave-one-out on the shots (the held-out shot is removed from the cache).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..data import LabelledData
from ..labels import LabelSet
from ..metrics import auc_metrics, confident_gain
from ..models import Backbone
from ..prompt_classifier import prompt_probabilities, text_classifier
from .heads import LinearProbeHead, PromptHead, TipAdapterHead

logger = logging.getLogger(__name__)

LP_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0)
TIP_ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
TIP_BETAS = (1.0, 3.0, 5.5, 10.0, 20.0)
# an adapted candidate replaces zero-shot only when it beats it by this much (macro AUC) on the
# selection data AND the gain's paired-bootstrap 10% quantile is above 0: few-shot selection data
# are noisy, and zero-shot is the safe default
MIN_GAIN = 0.005


def frozen_features(backbone: Backbone, data: LabelledData, cache=None, batch_size: int = 32,
                    progress: bool = False) -> tuple[torch.Tensor, np.ndarray, list[int]]:
    """('original'-variant embeddings (N, D), targets (N, L), kept row indices) of `data`."""
    from ..evaluate import encode_dataset

    emb, keep, _ = encode_dataset(backbone, data.paths, ["original"], cache, batch_size, progress=progress)
    if not len(keep):
        raise ValueError(f"{data.csv_path}: none of the {len(data)} images could be read")
    return emb[:, 0], data.targets[keep], keep.tolist()


def _folds(targets: np.ndarray, multilabel: bool, seed: int, max_folds: int = 5) -> list[np.ndarray]:
    """Held-out index sets: leave-one-out for <= 8 shots, else `max_folds` stratified folds."""
    n = len(targets)
    if n <= 8:
        return [np.array([i]) for i in range(n)]
    rng = np.random.default_rng(seed)
    fold = np.zeros(n, dtype=int)
    key = targets.argmax(1) if not multilabel else np.zeros(n, dtype=int)
    for c in np.unique(key):
        idx = rng.permutation(np.where(key == c)[0])
        fold[idx] = (np.arange(len(idx)) + rng.integers(max_folds)) % max_folds
    return [np.where(fold == f)[0] for f in range(max_folds) if (fold == f).any()]


def _confident(t, p_new, p_zs, label_set, seed) -> bool:
    """Adopt a candidate over zero-shot only if its selection-data gain is >= MIN_GAIN and its
    paired-bootstrap 10% quantile is > 0."""
    gain, lower = confident_gain(np.asarray(t), np.asarray(p_new), np.asarray(p_zs), label_set, seed=seed)
    return gain >= MIN_GAIN and lower > 0


def _shots_and_zero_shot(backbone, label_set, train, styles, cache, features, val, val_features):
    """(shot features, shot targets, validation features or None, zero-shot PromptHead, its classifier)."""
    x, y, _ = features if features is not None else frozen_features(backbone, train, cache)
    if val_features is None and val is not None and len(val):
        val_features = frozen_features(backbone, val, cache)
    clf = text_classifier(backbone, label_set, styles)
    return x, y, val_features, PromptHead.from_classifier(clf), clf


def _guarded(head, zs: PromptHead, val_features, val, label_set: LabelSet, seed: int, info: dict):
    """The per-label never-worse guard (vlm.adapt.guard) on the validation features; records its report."""
    from .guard import guard_head, label_groups, validation_sources

    if val_features is None:
        info["label_guard"] = {"applied": False, "why": "no validation images"}
        logger.warning("no validation images: the per-label never-worse guard cannot run")
        return head
    vx, vy, keep = val_features
    served, report = guard_head(head, zs.eval(), vx, vy, validation_sources(val, keep), label_set.names, seed,
                                label_groups(label_set))
    info["label_guard"] = {"applied": True, **report}
    return served


def _score(targets: np.ndarray, probs: np.ndarray, label_set: LabelSet) -> float:
    m = auc_metrics(targets, probs, label_set)["macro_auc"]
    return -1.0 if m is None else float(m)


# ----------------------------------------------------------------------------- linear probe

def _zero_shot_linear(head: PromptHead) -> torch.Tensor:
    """Per-style zero-shot linear classifiers W0 (S, L, D) (multi-label: positive - negative)."""
    w = head.weight.detach()
    return head.scale * (w[:, :, 0] - w[:, :, 1]) if head.multilabel else head.scale * w


def fit_linear(x: torch.Tensor, y: np.ndarray, w0: torch.Tensor, lam: float, multilabel: bool,
               max_iter: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW, b) minimising mean over styles of the logistic loss of x (W0_s + dW)^T + b, plus
    lam * ||dW||^2 (a pull towards zero-shot); full-batch L-BFGS from dW = 0, b = 0."""
    n_lab, dim = w0.shape[1:]
    dw = torch.zeros(n_lab, dim, requires_grad=True)
    b = torch.zeros(n_lab, requires_grad=True)
    yt = torch.from_numpy(np.asarray(y)).float()
    soft = yt / yt.sum(1, keepdim=True).clamp(min=1)  # group rows spread over their members
    base = torch.einsum("nd,sld->snl", x, w0).detach()  # (S, N, L)
    opt = torch.optim.LBFGS([dw, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        lg = base + (x @ dw.T + b)[None]
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(lg, yt[None].expand_as(lg))
        else:
            loss = sum(F.cross_entropy(lg[i], soft) for i in range(len(lg))) / len(lg)
        loss = loss + lam * dw.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return dw.detach(), b.detach()


def _lp_head(w0, dw, b, ml, styles) -> LinearProbeHead:
    return LinearProbeHead(w0, dw, b, ml, styles).eval()


def _linear_probs(x, head: LinearProbeHead) -> np.ndarray:
    with torch.no_grad():
        return head(x).mean(-2).numpy()


def train_linear_probe(backbone: Backbone, label_set: LabelSet, train: LabelledData, styles=None,
                       seed: int = 0, cache=None, features=None, val=None,
                       val_features=None) -> tuple[torch.nn.Module, dict]:
    """Fit on the shots; lambda by validation AUC when `val` is given, else cross-validation."""
    t0 = time.time()
    torch.manual_seed(seed)
    x, y, val_features, zs, clf = _shots_and_zero_shot(backbone, label_set, train, styles, cache, features, val,
                                                       val_features)
    w0 = _zero_shot_linear(zs)
    ml = label_set.multilabel
    zero = (torch.zeros(w0.shape[1:]), torch.zeros(w0.shape[1]))

    def head(dw, b):
        return _lp_head(w0, dw, b, ml, clf.styles)

    folds = _folds(y, ml, seed)
    probs = {}
    if val_features is not None:
        vx, vy, _ = val_features
        sel_t = vy
        probs["zero-shot"] = _linear_probs(vx, head(*zero))
        for lam in LP_LAMBDAS:
            probs[lam] = _linear_probs(vx, head(*fit_linear(x, y, w0, lam, ml)))
        results = {k: _score(vy, p, label_set) for k, p in probs.items()}
        how = f"validation AUC on {len(vy)} images"
    else:
        sel_t = y
        probs["zero-shot"] = _linear_probs(x, head(*zero))
        for lam in LP_LAMBDAS:
            pooled = np.zeros(y.shape)
            for held in folds:
                tr = np.setdiff1d(np.arange(len(y)), held)
                pooled[held] = _linear_probs(x[held], head(*fit_linear(x[tr], y[tr], w0, lam, ml)))
            probs[lam] = pooled
        results = {k: _score(y, p, label_set) for k, p in probs.items()}
        how = f"{'leave-one-out' if len(folds) == len(y) else f'{len(folds)}-fold'} CV on the shots"
    # ties go to zero-shot, then to the strongest pull towards it
    best = max(results, key=lambda k: (round(results[k], 6), k if k != "zero-shot" else float("inf")))
    if best != "zero-shot" and not _confident(sel_t, probs[best], probs["zero-shot"], label_set, seed):
        best = "zero-shot"
    dw, b = zero if best == "zero-shot" else fit_linear(x, y, w0, best, ml)
    logger.info(f"linear probe: lambda={best} (macro AUC {results[best]:.4f}, {how}; zero-shot {results['zero-shot']:.4f})")
    info = {"method": "linear-probe", "lambda": best, "selection_macro_auc": {str(k): v for k, v in results.items()},
            "cv": how, "trainable_params": int(dw.numel() + b.numel()), "n_train_images": int(len(y)),
            "train_seconds": round(time.time() - t0, 1)}
    return _guarded(head(dw, b), zs, val_features, val, label_set, seed, info), info


# ----------------------------------------------------------------------------- Tip-Adapter

def train_tip_adapter(backbone: Backbone, label_set: LabelSet, train: LabelledData, styles=None,
                      seed: int = 0, cache=None, features=None, val=None,
                      val_features=None) -> tuple[torch.nn.Module, dict]:
    """Cache = the shots; (alpha, beta) by validation AUC when `val` is given, else leave-one-out."""
    t0 = time.time()
    x, y, val_features, zs, clf = _shots_and_zero_shot(backbone, label_set, train, styles, cache, features, val,
                                                       val_features)
    ml = label_set.multilabel
    yt = torch.from_numpy(np.asarray(y)).float()
    qx, qy = (x, y) if val_features is None else (val_features[0], val_features[1])
    how = f"leave-one-out on the {len(y)} shots" if val_features is None else f"validation AUC on {len(qy)} images"
    with torch.no_grad():
        zs_logits = zs.logits(qx)  # (N, S, L[, 2])
        cos = qx @ x.T
    results, probs = {}, {}
    for beta in TIP_BETAS:
        aff = torch.exp(-beta * (1.0 - cos))
        if val_features is None:
            aff.fill_diagonal_(0.0)  # leave-one-out: a shot never sees itself in the cache
        cache_lg = torch.stack([aff @ yt, aff @ (1 - yt)], -1) if ml else aff @ yt
        cache_lg = cache_lg.unsqueeze(-3 if ml else -2)
        for alpha in TIP_ALPHAS:
            if alpha == 0.0 and beta != TIP_BETAS[0]:
                continue
            p = prompt_probabilities(zs_logits + alpha * cache_lg, ml).mean(1).numpy()
            results[(alpha, beta)] = _score(qy, p, label_set)
            probs[(alpha, beta)] = p
    # ties go to the smaller alpha (closer to zero-shot), then the smaller beta
    (alpha, beta) = max(results, key=lambda k: (round(results[k], 6), -k[0], -k[1]))
    if alpha != 0.0 and not _confident(qy, probs[(alpha, beta)], probs[(0.0, TIP_BETAS[0])], label_set, seed):
        alpha, beta = 0.0, TIP_BETAS[0]
    logger.info(f"tip-adapter: alpha={alpha} beta={beta} (macro AUC {results[(alpha, beta)]:.4f}, {how}; "
        f"zero-shot {results[(0.0, TIP_BETAS[0])]:.4f})")
    head = TipAdapterHead(zs.weight, zs.scale, ml, clf.styles, x, yt, alpha, beta).eval()
    info = {"method": "tip-adapter", "alpha": alpha, "beta": beta,
            "selection": how, "selection_macro_auc": {f"alpha={a},beta={b}": v for (a, b), v in results.items()},
            "cache_size": int(len(y)), "trainable_params": 0, "n_train_images": int(len(y)),
            "train_seconds": round(time.time() - t0, 1)}
    return _guarded(head, zs, val_features, val, label_set, seed, info), info
