"""Probability calibration and per-label operating thresholds (`vlm-xray calibrate`).

Multi-label sets: per label a Platt-style map on the prompt logit difference
z = logit(positive prompts) - logit(negative prompts) of each (variant, style):

    p_vs = sigmoid(scale * z_vs + offset),   P = mean over variants x styles of p_vs

(`scale` = 1 / temperature, kept > 0 so a calibration can flatten but never invert a label's
ranking). The parameters are fitted by minimising the log loss of P itself - the averaged number
`analyze` and `eval` report - not of each p_vs separately.
Multi-class sets: one temperature T on the class logits, p_vs = softmax(logits_vs / T); rows
labelled with a group (e.g. skin12 "benign keratosis") count the summed member probability.

Thresholds are chosen per label on the calibrated probabilities of the calibration data:
- youden (default): the cut maximising sensitivity + specificity - 1 (positive when probability >=
  threshold); ties go to the highest such cut.
- target sensitivity s: the highest cut whose sensitivity is >= s.
A cut between two observed scores is stored as their midpoint (the lowest score called positive
and the next lower score; 0 below the lowest), so the calls on the calibration data are exactly
the reported sensitivity/specificity and tiny float differences cannot flip them.

The JSON file records, per label, the method, the sensitivity/specificity achieved on the
calibration data, n, and the data file, plus the model fingerprint and label set it belongs to:
`load_calibration` refuses a file made for another label set, and `Calibration.check_compatible`
(called by `build_scorer`) one made for another model.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_write_json, read_json
from .metrics import choose_threshold, expected_calibration_error  # noqa: F401 (choose_threshold re-exported)

logger = logging.getLogger(__name__)

FORMAT = "vlm-xray-calibration/1"


class CalibrationError(ValueError):
    """A calibration file is unreadable or does not belong to this model / label set."""


# ----------------------------------------------------------------------------- fitting

def _lbfgs(params: list[torch.Tensor], closure_loss, max_iter: int = 200) -> None:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = closure_loss()
        loss.backward()
        return loss

    opt.step(closure)


def fit_platt(z: np.ndarray, y: np.ndarray, l2: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Per-label (scale > 0, offset) for logit differences z (N, K, L) and targets y (N, L),
    minimising the log loss of mean_k sigmoid(scale * z + offset). Labels without positive or
    negative rows keep the identity (1, 0)."""
    z_t = torch.as_tensor(z, dtype=torch.float64)
    y_t = torch.as_tensor(y, dtype=torch.float64)
    n_labels = z_t.shape[-1]
    fit = torch.as_tensor((y.sum(0) > 0) & (y.sum(0) < len(y)))
    log_scale = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    offset = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)

    def loss():
        p = torch.sigmoid(log_scale.exp() * z_t + offset).mean(1).clamp(1e-12, 1 - 1e-12)
        nll = -(y_t * p.log() + (1 - y_t) * (1 - p).log()).mean(0)
        return (nll * fit).sum() + l2 * (log_scale.pow(2).sum() + offset.pow(2).sum())

    if len(z_t):
        _lbfgs([log_scale, offset], loss)
    scale = np.where(fit.numpy(), log_scale.detach().exp().numpy(), 1.0)
    off = np.where(fit.numpy(), offset.detach().numpy(), 0.0)
    return scale, off


def fit_temperature(logits: np.ndarray, y: np.ndarray, l2: float = 1e-4) -> float:
    """One temperature T for class logits (N, K, C) and targets y (N, C) (several 1s = a group row:
    the summed probability of the marked classes is scored), minimising the log loss of
    mean_k softmax(logits / T)."""
    lg = torch.as_tensor(logits, dtype=torch.float64)
    y_t = torch.as_tensor(y, dtype=torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def loss():
        p = (lg / log_t.exp()).softmax(-1).mean(1)
        return -((p * y_t).sum(-1).clamp_min(1e-12).log()).mean() + l2 * log_t.pow(2)

    if len(lg):
        _lbfgs([log_t], loss)
    return float(log_t.detach().exp())


# ----------------------------------------------------------------------------- the calibration object

@dataclass
class Calibration:
    """What `Scorer.probabilities` calls: calibrated (..., S, L) probabilities, per-label thresholds."""

    source: str
    label_set: str
    label_names: list[str]
    mode: str
    thresholds: dict[str, float]
    scale: np.ndarray | None = None  # (L,) multilabel
    offset: np.ndarray | None = None  # (L,) multilabel
    temperature: float = 1.0  # multiclass
    model_fingerprint: str = ""
    variants: list[str] = field(default_factory=list)
    prompt_styles: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def probabilities(self, classifier, emb: torch.Tensor) -> torch.Tensor:
        """emb (..., D) -> calibrated probabilities (..., S, L) in the classifier's style order."""
        per_style = []
        for s, lg in classifier.logits(emb).items():
            lg = lg.float()
            if self.mode == "multilabel":
                a = torch.as_tensor(self.scale, dtype=lg.dtype, device=lg.device)
                b = torch.as_tensor(self.offset, dtype=lg.dtype, device=lg.device)
                per_style.append(torch.sigmoid(a * (lg[..., 0] - lg[..., 1]) + b))
            else:
                per_style.append((lg / self.temperature).softmax(-1))
        return torch.stack(per_style, dim=-2)

    def check_compatible(self, scorer) -> None:
        """Refuse a calibration fitted for another model; warn when styles/variants differ."""
        if getattr(scorer, "head", None) is not None:
            raise CalibrationError(f"{self.source}: calibration files calibrate the zero-shot prompt classifier "
                                   f"and cannot be combined with --adapter")
        fp = scorer.backbone.fingerprint
        if self.model_fingerprint and fp != self.model_fingerprint:
            raise CalibrationError(
                f"{self.source}: calibration was fitted for model {self.info.get('model', '?')!r} (fingerprint "
                f"{self.model_fingerprint}), but this run uses {scorer.backbone.name!r} (fingerprint {fp}); "
                f"run `vlm-xray calibrate` with this model")
        if self.prompt_styles and list(scorer.styles) != list(self.prompt_styles):
            logger.warning(f"{self.source}: fitted with prompt styles {self.prompt_styles}, used with {scorer.styles}")
        if self.variants and list(scorer.variants) != list(self.variants):
            logger.warning(f"{self.source}: fitted with variants {self.variants}, used with {scorer.variants}")


def load_calibration(path, label_set, fingerprint: str | None = None) -> Calibration:
    """Read a calibration JSON for `label_set`; raises CalibrationError (a ValueError) with a clear
    message if it is unreadable, or made for another label set (or, given `fingerprint`, model)."""
    p = Path(path)
    d = read_json(p, what="calibration file", error=CalibrationError)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CalibrationError(f"{p}: not a vlm-xray calibration file (expected format {FORMAT!r}); "
                               f"create one with `vlm-xray calibrate`")
    if d["label_set"] != label_set.name or list(d["label_names"]) != list(label_set.names):
        raise CalibrationError(
            f"{p}: calibration is for label set {d['label_set']!r} ({len(d['label_names'])} labels), "
            f"not {label_set.name!r} ({len(label_set.names)} labels); pass --labels {d['label_set']} or "
            f"calibrate for this label set")
    if fingerprint is not None and d.get("model_fingerprint") and d["model_fingerprint"] != fingerprint:
        raise CalibrationError(f"{p}: calibration was fitted for model {d.get('model')!r} (fingerprint "
                               f"{d['model_fingerprint']}), not for this model (fingerprint {fingerprint})")
    labels = d["labels"]
    names = list(d["label_names"])
    cal = Calibration(
        source=str(p), label_set=d["label_set"], label_names=names, mode=d["mode"],
        thresholds={n: float(labels[n]["threshold"]) for n in names},
        model_fingerprint=d.get("model_fingerprint", ""), variants=list(d.get("variants") or []),
        prompt_styles=list(d.get("prompt_styles") or []), info=d,
    )
    if cal.mode == "multilabel":
        cal.scale = np.array([labels[n]["scale"] for n in names], dtype=np.float32)
        cal.offset = np.array([labels[n]["offset"] for n in names], dtype=np.float32)
    else:
        cal.temperature = float(d["temperature"])
    return cal


# ----------------------------------------------------------------------------- calibrate a scorer on data

def prompt_logits(scorer, emb: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """(N, V, D) -> multilabel: logit differences (N, V*S, L); multiclass: class logits (N, V*S, L)."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(emb), chunk):
            lg = scorer.classifier.logits(emb[i : i + chunk].to(scorer.backbone.device))
            per = [(x[..., 0] - x[..., 1]) if scorer.label_set.multilabel else x for x in lg.values()]
            outs.append(torch.stack(per, dim=2).float().cpu())  # (n, V, S, L)
    if not outs:
        return np.zeros((0, len(scorer.variants) * len(scorer.styles), len(scorer.label_set.labels)))
    x = torch.cat(outs).numpy()
    return x.reshape(x.shape[0], -1, x.shape[-1])


def calibrated_mean(mode: str, logits: np.ndarray, scale=None, offset=None, temperature: float = 1.0) -> np.ndarray:
    """Mean over K of calibrated probabilities for (N, K, L) logits (identity parameters = uncalibrated)."""
    x = torch.as_tensor(logits, dtype=torch.float64)
    if mode == "multilabel":
        a = torch.as_tensor(np.ones(x.shape[-1]) if scale is None else scale, dtype=torch.float64)
        b = torch.as_tensor(np.zeros(x.shape[-1]) if offset is None else offset, dtype=torch.float64)
        return torch.sigmoid(a * x + b).mean(1).numpy()
    return (x / temperature).softmax(-1).mean(1).numpy()


def fit_calibration(scorer, data, method: str = "youden", target_sensitivity: float | None = None,
                    progress: bool = False, data_description: str | None = None) -> dict:
    """Fit on `data` with `scorer` (no adapter, no calibration) and return the calibration JSON payload."""
    from .evaluate import cache_line, encode_dataset

    if scorer.head is not None:
        raise CalibrationError("calibration fits the zero-shot prompt classifier; --adapter is not supported here")
    t0 = time.perf_counter()
    emb, ok, failures = encode_dataset(scorer.backbone, data.paths, scorer.variants, scorer.image_cache,
                                       scorer.batch_size, scorer.num_workers, progress)
    logger.info(cache_line(scorer.image_cache))
    if len(ok) < 2:
        raise CalibrationError(f"{data.csv_path}: fewer than 2 readable images; cannot calibrate")
    y = data.targets[ok].astype(np.float64)
    logits = prompt_logits(scorer, emb)
    ls = scorer.label_set
    names = ls.names
    if ls.multilabel:
        scale, offset = fit_platt(logits, y)
        p_before = calibrated_mean("multilabel", logits)
        p_after = calibrated_mean("multilabel", logits, scale, offset)
        temperature = None
    else:
        temperature = fit_temperature(logits, y)
        p_before = calibrated_mean("multiclass", logits)
        p_after = calibrated_mean("multiclass", logits, temperature=temperature)
    labels = {}
    for j, n in enumerate(names):
        thr = choose_threshold(y[:, j], p_after[:, j], method, target_sensitivity)
        n_pos = int(y[:, j].sum())
        entry = {
            "threshold": round(thr["threshold"], 6),
            "threshold_method": thr["method"],
            "sensitivity": None if thr["sensitivity"] is None else round(thr["sensitivity"], 4),
            "specificity": None if thr["specificity"] is None else round(thr["specificity"], 4),
            "n": int(len(y)), "n_pos": n_pos, "n_neg": int(len(y) - n_pos),
            "data": str(data.csv_path),
            "ece_before": round(expected_calibration_error(y[:, j], p_before[:, j]), 6),
            "ece_after": round(expected_calibration_error(y[:, j], p_after[:, j]), 6),
        }
        if ls.multilabel:
            fitted = 0 < n_pos < len(y)
            entry = {"scale": float(scale[j]), "temperature": float(1 / scale[j]), "offset": float(offset[j]),
                     "fitted": fitted, **entry}
        labels[n] = entry
    ece_b = float(np.mean([v["ece_before"] for v in labels.values()]))
    ece_a = float(np.mean([v["ece_after"] for v in labels.values()]))
    payload = {
        "format": FORMAT,
        "label_set": ls.name,
        "label_names": names,
        "mode": ls.mode,
        "model": scorer.backbone.name,
        "model_fingerprint": scorer.backbone.fingerprint,
        "variants": list(scorer.variants),
        "prompt_styles": list(scorer.styles),
        "method": ("per-label Platt scaling of the pos-neg prompt logit difference (scale > 0, offset), "
                   "probability = mean over variants x styles of sigmoid(scale * z + offset)")
        if ls.multilabel else "one temperature on the class logits, probability = mean over variants x styles "
                              "of softmax(logits / T)",
        "threshold_method": "youden" if method == "youden" else f"target sensitivity {target_sensitivity:g}",
        "data": str(data.csv_path),
        "data_subset": data_description,
        "n_images": int(len(y)),
        "n_failed": len(failures),
        "mean_ece_before": round(ece_b, 6),
        "mean_ece_after": round(ece_a, 6),
        "ece_method": "10 equal-width bins per label, averaged (on the calibration data itself)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if temperature is not None:
        payload["temperature"] = temperature
    payload["labels"] = labels
    return payload


def write_calibration(payload: dict, path) -> None:
    atomic_write_json(Path(path), payload, indent=2)


def summary_lines(payload: dict) -> list[str]:
    lines = [f"calibration for {payload['label_set']} ({payload['mode']}), model {payload['model']}, "
             f"{payload['n_images']} images from {payload['data']}"]
    if payload.get("temperature") is not None:
        lines.append(f"  temperature {payload['temperature']:.4g}")
    w = max(len(n) for n in payload["labels"])
    lines.append(f"  {'label':<{w}}  {'thr':>7}  {'sens':>5}  {'spec':>5}  {'n_pos':>5}  ECE before -> after")

    def f(x):
        return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:5.2f}"

    for n, e in payload["labels"].items():
        lines.append(f"  {n:<{w}}  {e['threshold']:7.4f}  {f(e['sensitivity'])}  {f(e['specificity'])}  "
                     f"{e['n_pos']:>5}  {e['ece_before']:.4f} -> {e['ece_after']:.4f}")
    lines.append(f"  mean ECE (calibration data) {payload['mean_ece_before']:.4f} -> {payload['mean_ece_after']:.4f}; "
                 f"thresholds: {payload['threshold_method']}")
    return lines
