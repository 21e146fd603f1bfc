"""The training loop as plain functions over a `TrainingRun` (everything one run holds)."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..labels import LabelSet
from .augment import augment, normalize_pixels
from .captions import Captions
from .config import PretrainConfig
from .dataset import Row
from .losses import CONTRASTIVE, multiclass_prompt_loss, multilabel_prompt_loss, positives
from .model import TextSide

logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    config: PretrainConfig
    model: torch.nn.Module
    label_sets: dict[str, LabelSet]
    train_rows: list[Row]
    val_rows: list[Row]
    captions: Captions
    train_combo: torch.Tensor  # (N,) label-combination id per training row
    bank: dict  # prompt bank: set -> style -> label -> (positive ids, negative ids), relative to prompt_offset
    prompt_offset: int  # prompt texts follow the captions in the text side
    prompt_ids: dict[str, int]  # prompt text -> index in the text side
    text: TextSide
    prompt_targets: dict[str, tuple[list[str], torch.Tensor]]  # set -> (active labels, (N, L) targets)
    set_idx: torch.Tensor  # (N,) index of each training row's label set
    flips: torch.Tensor  # (N,) bool: mirroring allowed
    train_px: torch.Tensor
    val_px: torch.Tensor
    device: torch.device
    mean: tuple
    std: tuple
    withheld: frozenset
    optimizer: torch.optim.Optimizer = None
    params: list = field(default_factory=list)
    adjust_lr: object = None
    steps_per_epoch: int = 1
    gen: torch.Generator = None
    # progress (saved in train_state.pt)
    epoch: int = 0
    step: int = 0
    best: float = -1.0
    history: list = field(default_factory=list)
    elapsed_before: float = 0.0
    t_train0: float = 0.0
    n_seen: int = 0
    session_seconds: float = 0.0  # training time of this session

    @property
    def use_amp(self) -> bool:
        return self.device.type == "cuda"

    @property
    def set_names(self) -> list[str]:
        return list(self.label_sets)

    @property
    def elapsed(self) -> float:
        """Training seconds over all sessions of this run (resumes included)."""
        return self.elapsed_before + time.time() - self.t_train0

    def embed_prompt_texts(self, texts: list[str]) -> torch.Tensor:
        return self.text.embed([self.prompt_ids[t] for t in texts], training=False)


def _draw(n: int, gen: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=gen))


def prompt_loss(run: TrainingRun, img: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's label sets of the prompt loss, with one prompt style and one phrasing
    per label drawn per step."""
    dev, gen, off = run.device, run.gen, run.prompt_offset
    terms = []
    for sname, ls in run.label_sets.items():
        in_set = (run.set_idx[idx] == run.set_names.index(sname)).to(dev)
        if not in_set.any():
            continue
        style = list(ls.prompt_styles)[_draw(len(ls.prompt_styles), gen)]
        per = run.bank[sname][style]
        active, y = run.prompt_targets[sname]
        yy = y[idx].to(dev)
        if ls.multilabel:
            pe = run.text.embed([_pick(per[n][0], gen) + off for n in active])
            ne = run.text.embed([_pick(per[n][1], gen) + off for n in active])
            terms.append(multilabel_prompt_loss(img[in_set], pe, ne, yy[in_set], scale))
        else:
            ok = in_set & (yy.sum(1) > 0)
            if ok.any():
                pe = run.text.embed([_pick(per[n][0], gen) + off for n in active])
                terms.append(multiclass_prompt_loss(img[ok], pe, yy[ok], scale))
    return torch.stack(terms).mean() if terms else torch.zeros((), device=dev)


def _pick(ids: list[int], gen: torch.Generator) -> int:
    return ids[_draw(len(ids), gen)]


def train_step(run: TrainingRun, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step on the rows `idx`: (total loss, contrastive, prompt, logit scale)."""
    cfg, model, dev, gen = run.config, run.model, run.device, run.gen
    x = run.train_px[idx].to(dev).float() / 255
    x = normalize_pixels(augment(x, run.flips[idx].to(dev), gen, cfg.aug_strength), run.mean, run.std)
    combo_b = run.train_combo[idx]
    cap = run.captions.sample(combo_b, gen)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.use_amp):
        img = F.normalize(model.encode_image(x).float(), dim=-1)
    txt = run.text.embed(cap)
    scale = model.logit_scale.exp().clamp(max=100)
    l_con = CONTRASTIVE[cfg.loss](scale * img @ txt.T, positives(combo_b).to(dev), model)
    l_prompt = prompt_loss(run, img, idx, scale) if cfg.prompt_weight > 0 else torch.zeros((), device=dev)
    total = l_con + cfg.prompt_weight * l_prompt
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(run.params, 5.0)
    run.optimizer.step()
    return total, l_con, l_prompt, scale


def epoch_order(run: TrainingRun) -> torch.Tensor:
    """A seeded permutation of the training rows (repeated up to one batch when there are fewer)."""
    n, bs = len(run.train_rows), run.config.batch_size
    perm = torch.randperm(n, generator=run.gen)
    if n < bs and n > 1:
        perm = perm.repeat(math.ceil(bs / max(1, n)))[:bs]
    return perm


def train_one_epoch(run: TrainingRun, epoch: int) -> tuple[dict, bool]:
    """Train one epoch; returns (epoch record, whether the time budget stopped it)."""
    from tqdm import tqdm

    cfg = run.config
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    perm = epoch_order(run)
    bar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
               leave=False)
    losses, t0, lr, stopped = [], time.time(), cfg.lr, False
    for s in bar:
        elapsed = run.elapsed
        if budget and elapsed >= budget:
            stopped = True
            break
        lr = run.adjust_lr(run.step, elapsed)
        idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        total, l_con, l_prompt, scale = train_step(run, idx)
        run.step += 1
        run.n_seen += len(idx)
        losses.append(total.item())
        if run.step % 10 == 0 or s == 0:
            run.history.append({"step": run.step, "loss": total.item(), "loss_contrastive": l_con.item(),
                                "loss_prompt": l_prompt.item()})
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", scale=f"{float(scale.detach()):.1f}")
    seconds = time.time() - t0
    rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
           "epoch_seconds": round(seconds, 1), "steps": len(losses),
           "images_per_second": round(len(losses) * cfg.batch_size / max(seconds, 1e-9), 1), "lr": lr}
    return rec, stopped


def epoch_message(rec: dict, epochs: int) -> str:
    msg = (f"epoch {rec['epoch']}/{epochs} loss {rec['train_loss']:.4f} ({rec['epoch_seconds']:.0f}s, "
           f"{rec['images_per_second']} img/s)")
    if "val_score" in rec:
        msg += " | val " + ", ".join(f"{k} {v['mean_auc']:.3f}" for k, v in rec["val"].items())
        msg += " *" if rec.get("best") else ""
    return msg
