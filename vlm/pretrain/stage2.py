"""Second pre-training stage: attention blocks that carry weight, on a trained conv tower.

`vlm-xray pretrain` trains the EdgeNeXt starters from scratch; their attention branches are gated
by layer-scale gammas near 1e-6, so LoRA on them barely moves the output. This stage takes such a
model folder, wraps its image tower as `edgenext_xx_small_attn2` (`vlm.models.towers.ConvBodyAttn`:
the trained body, then two standard transformer blocks with fused `attn.qkv` over the 4x4
feature-map tokens at 128 px; 6x6 at `--image-size 192`), **freezes the body** and trains the blocks, a token norm, the image
projection and the logit scale with the same label-aware multi-positive contrastive loss
(optionally + the per-label prompt loss), against the same locked MiniLM text tower.

Because the body is frozen, its feature maps are computed once per image and view (view 0 plain,
the others with pre-training's augmentation and the low-resolution augmentation) and cached; the
epochs then run on those maps: tens of epochs in minutes on a CPU. Rows, the patient split and
captions are exactly stage 1's (same seed -> same validation patients). Each epoch writes
`stage2_state.pt` (tensors only), so `--resume` continues an interrupted run.

    vlm-xray pretrain-stage2 --base vlm-xray-starter --data ../shared/data/nih14 ... --out DIR
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import atomic_path, atomic_write_json
from ..models.base import OPENAI_MEAN, OPENAI_STD
from .augment import allows_flips, augment, normalize_pixels
from .captions import Captions, prompt_bank
from .checkpoint import WEIGHTS_FILE, load_weights, write_weights
from .config import data_specs
from .dataset import check_withheld, load_training_rows, preload_images, split_rows, withhold
from .extras import epoch_order, lowres_augment, sampling_weights, train_only_rows
from .losses import multipos_loss, positives
from .model import TextSide

logger = logging.getLogger(__name__)

TOWER = "edgenext_xx_small_attn2"
STATE_FILE = "stage2_state.pt"


@dataclass
class Stage2Config:
    """A stage-2 run; round-trips to JSON (stored in metrics.json and the resume state)."""

    base: str = "vlm-xray-starter"
    data: list = field(default_factory=list)
    out_dir: str = ""
    train_only_data: list = field(default_factory=list)
    withhold_labels: tuple = ()
    views: int = 3
    image_size: int | None = None  # None: the base's; larger gives the blocks more tokens (size / 32 a side)
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    prompt_weight: float = 0.0
    sampling: str = "uniform"
    lowres_prob: float = 0.15
    seed: int = 0
    val_fraction: float = 0.15
    cache_dir: str | None = None
    resume: bool = False
    command: str | None = None

    def __post_init__(self):
        self.data = data_specs(self.data)
        self.train_only_data = data_specs(self.train_only_data)
        self.withhold_labels = tuple(sorted(set(self.withhold_labels)))
        if self.views < 1 or self.epochs < 1 or self.batch_size < 2:
            raise ValueError("views and epochs must be >= 1, batch_size >= 2")
        if self.image_size is not None and (self.image_size < 64 or self.image_size % 32):
            raise ValueError(f"image_size must be a multiple of 32 and >= 64 (got {self.image_size})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Stage2Config":
        return cls(**json.loads(text))

    def run_config(self) -> dict:
        """What defines the trained model (no output/cache paths, no run-time switches)."""
        d = json.loads(self.to_json())
        return {k: v for k, v in d.items() if k not in ("out_dir", "cache_dir", "resume", "command")}


# ----------------------------------------------------------------------------- model
def build_from_base(base_dir: Path, tower: str = TOWER):
    """(model with the base folder's weights in `visual.trunk.body`, model cfg, preprocess cfg)."""
    from safetensors.torch import load_file

    from ..models.layouts import build_open_clip

    cfg = json.loads((base_dir / "open_clip_config.json").read_text())
    model_cfg = json.loads(json.dumps(cfg["model_cfg"]))
    base_tower = model_cfg["vision_cfg"]["timm_model_name"]
    if base_tower not in ("edgenext_xx_small", tower):
        raise ValueError(f"{base_dir}: stage 2 expects an edgenext_xx_small tower (got {base_tower}); "
                         f"give a stage-1 model as --base")
    model_cfg["vision_cfg"]["timm_model_name"] = tower
    model = build_open_clip(model_cfg, pretrained_text=True)
    new = ("visual.trunk.pos_embed", "visual.trunk.blocks.", "visual.trunk.norm.", "text.transformer.")
    stored = load_file(str(base_dir / WEIGHTS_FILE))
    if base_tower == tower:  # a stage-2 model as base: keep its body and projection, fresh blocks
        sd = {k: v.float() for k, v in stored.items() if not k.startswith(new)}
    else:
        sd = {(k.replace("visual.trunk.", "visual.trunk.body.", 1) if k.startswith("visual.trunk.") else k): v.float()
              for k, v in stored.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith(new)]
    if bad or unexpected:
        raise ValueError(f"{base_dir}: weights do not fit {tower}: missing {bad[:4]}, unexpected {unexpected[:4]}")
    return model, model_cfg, cfg["preprocess_cfg"]


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """Freeze everything but the new blocks, token norm, image projection and logit scale."""
    for p in model.parameters():
        p.requires_grad_(False)
    t = model.visual.trunk
    params = [t.pos_embed, *t.blocks.parameters(), *t.norm.parameters(), *model.visual.head.parameters(),
              model.logit_scale]
    for p in params:
        p.requires_grad_(True)
    return params


def embed_maps(model, fmaps: torch.Tensor) -> torch.Tensor:
    """Body feature maps (B, C, h, w) -> normalised image embeddings (the tower after its body)."""
    t = model.visual.trunk
    return F.normalize(model.visual.head(t.forward_head(t.tokens_from_map(fmaps.float()))), dim=-1)


@torch.no_grad()
def body_maps(model, px: torch.Tensor, views: int, flips: torch.Tensor, gen: torch.Generator, lowres_prob: float,
              batch: int = 128) -> torch.Tensor:
    """(N, views, C, h, w) fp16 body feature maps of uint8 images; view 0 un-augmented."""
    from tqdm import tqdm

    body = model.visual.trunk.body.eval()
    out = None
    for i in tqdm(range(0, len(px), batch), desc=f"body maps x{views}", leave=False):
        x0 = px[i:i + batch].float() / 255
        per_view = []
        for v in range(views):
            x = x0 if v == 0 else augment(lowres_augment(x0, lowres_prob, 64, gen), flips[i:i + batch], gen)
            per_view.append(body(normalize_pixels(x, OPENAI_MEAN, OPENAI_STD)).half())
        chunk = torch.stack(per_view, 1)
        if out is None:
            out = torch.empty((len(px),) + chunk.shape[1:], dtype=torch.float16)
        out[i:i + len(chunk)] = chunk
    return out


def cached_maps(cache_dir, base_dir: Path, rows, views: int, lowres_prob: float, seed: int, size: int,
                compute) -> torch.Tensor:
    """Body maps from `cache_dir` when the same base weights, rows, size and view settings were computed."""
    if not cache_dir:
        return compute()
    h = hashlib.sha256((base_dir / WEIGHTS_FILE).read_bytes())
    h.update(("\n".join(r.path for r in rows) + f"|{views}|{lowres_prob}|{seed}|views-gen|{size}px").encode())
    path = Path(cache_dir) / f"stage2_maps_{h.hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    maps = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(maps, tmp)
    return maps


# ----------------------------------------------------------------------------- run
@dataclass
class Stage2Run:
    """What one stage-2 run holds (the attributes `loop.prompt_loss` reads are named as there)."""

    config: Stage2Config
    model: torch.nn.Module
    base_dir: Path
    model_cfg: dict
    preprocess_cfg: dict
    label_sets: dict
    train_rows: list
    val_rows: list
    data_info: list
    n_dropped: int
    captions: Captions
    train_combo: torch.Tensor
    text: TextSide
    bank: dict
    prompt_offset: int
    prompt_ids: dict
    prompt_targets: dict
    set_idx: torch.Tensor
    gen: torch.Generator
    device: torch.device = torch.device("cpu")
    withheld: frozenset = frozenset()
    train_maps: torch.Tensor | None = None
    val_maps: torch.Tensor | None = None
    epoch: int = 0
    best: float = -1.0
    best_epoch: int | None = None
    history: list = field(default_factory=list)
    t_prepare: float = 0.0

    @property
    def set_names(self) -> list[str]:
        return list(self.label_sets)

    def embed_prompt_texts(self, texts: list[str]) -> torch.Tensor:
        return self.text.embed([self.prompt_ids[t] for t in texts], training=False)


def prepare(config: Stage2Config) -> Stage2Run:
    """Rows (stage 1's split), model, texts and the cached body maps of a run."""
    from ..models import load_model
    from .train import _prompt_targets

    t0 = time.time()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    base_dir = Path(load_model(config.base).source)
    model, model_cfg, pre = build_from_base(base_dir)
    if config.image_size:  # the body is convolutional: a larger input only makes its map (and the tokens) larger
        pre = {**pre, "size": config.image_size}
        model_cfg["vision_cfg"]["image_size"] = config.image_size
    rows_all, label_sets, data_info = load_training_rows(config.data, config.seed)
    withheld = frozenset(config.withhold_labels)
    check_withheld(withheld, label_sets)
    train_rows, val_rows = split_rows(rows_all, config.val_fraction, config.seed)
    extra, extra_info = train_only_rows(config.train_only_data, label_sets, val_rows, config.seed)
    train_rows, n_dropped = withhold(train_rows + extra, withheld, "drop")
    captions = Captions(label_sets, withheld, config.seed)
    combo = torch.tensor([captions.combo_of(r) for r in train_rows])
    prompt_texts, bank = prompt_bank(label_sets)
    offset = len(captions.table)
    model.eval()
    text = TextSide(model, captions.table.texts + prompt_texts, torch.device("cpu"), lora=False)
    run = Stage2Run(config=config, model=model, base_dir=base_dir, model_cfg=model_cfg, preprocess_cfg=pre,
                    label_sets=label_sets, train_rows=train_rows, val_rows=val_rows, data_info=data_info + extra_info,
                    n_dropped=n_dropped, captions=captions, train_combo=combo, text=text, bank=bank,
                    prompt_offset=offset, prompt_ids={t: offset + i for i, t in enumerate(prompt_texts)},
                    prompt_targets=_prompt_targets(label_sets, train_rows, withheld),
                    set_idx=torch.tensor([list(label_sets).index(r.label_set) for r in train_rows]),
                    gen=gen, withheld=withheld)
    size = int(pre["size"])
    flips = torch.tensor([allows_flips(label_sets[r.label_set]) for r in train_rows])
    # the views' augmentation has its own generator: a cached run draws the same training steps
    views_gen = torch.Generator().manual_seed(config.seed + 1)
    run.train_maps = cached_maps(config.cache_dir, base_dir, train_rows, config.views, config.lowres_prob,
                                 config.seed, size, lambda: body_maps(model, preload_images(
                                     [r.path for r in train_rows], size, config.cache_dir), config.views, flips,
                                     views_gen, config.lowres_prob))
    run.val_maps = body_maps(model, preload_images([r.path for r in val_rows], size, config.cache_dir), 1,
                             torch.zeros(len(val_rows), dtype=torch.bool), views_gen, 0.0)[:, 0]
    run.t_prepare = time.time() - t0
    return run


@torch.no_grad()
def validate(run: Stage2Run, n_boot: int = 0) -> dict:
    """Zero-shot validation per label set, as stage 1 reports it (with intervals when n_boot)."""
    from .evaluation import validation_summary

    model = run.model.eval()
    img = torch.cat([embed_maps(model, run.val_maps[i:i + 512]) for i in range(0, len(run.val_maps), 512)])
    return validation_summary(run, img, n_boot)


def optimiser(run: Stage2Run):
    params = trainable_parameters(run.model)
    cfg = run.config
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)
    steps = max(1, len(run.train_rows) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps * cfg.epochs, pct_start=0.05)
    return params, opt, sched, steps


def train_epoch(run: Stage2Run, params, opt, sched, steps: int, weights) -> float:
    """One epoch over the cached maps (a random view per row and step); returns the mean loss."""
    from .loop import prompt_loss

    cfg, model, gen = run.config, run.model, run.gen
    model.train()
    order, losses = epoch_order(len(run.train_rows), weights, gen), []
    for s in range(steps):
        idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        view = torch.randint(cfg.views, (len(idx),), generator=gen)
        img = embed_maps(model, run.train_maps[idx, view])
        combo = run.train_combo[idx]
        txt = run.text.embed(run.captions.sample(combo, gen))
        scale = model.logit_scale.exp().clamp(max=100)
        loss = multipos_loss(scale * img @ txt.T, positives(combo))
        if cfg.prompt_weight:
            loss = loss + cfg.prompt_weight * prompt_loss(run, img, idx, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def _save_state(run: Stage2Run, path: Path, opt, sched) -> None:
    state = {"trainable": {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad},
             "optimizer": opt.state_dict(), "scheduler": json.dumps(sched.state_dict()),
             "epoch": run.epoch, "best": run.best, "best_epoch": -1 if run.best_epoch is None else run.best_epoch,
             "history": json.dumps(run.history), "config": json.dumps(run.config.run_config()),
             "gen_state": run.gen.get_state(), "rng_state": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(run: Stage2Run, path: Path, opt, sched) -> None:
    st = torch.load(path, map_location="cpu", weights_only=True)
    saved, mine = json.loads(st["config"]), run.config.run_config()
    core = {k: v for k, v in mine.items() if k != "epochs"}
    if {k: v for k, v in saved.items() if k != "epochs"} != json.loads(json.dumps(core)):
        raise ValueError(f"{path}: saved run used a different configuration; use a new --out or drop --resume")
    params = dict(run.model.named_parameters())
    with torch.no_grad():
        for n, v in st["trainable"].items():
            params[n].copy_(v)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(json.loads(st["scheduler"]))
    run.epoch, run.best = int(st["epoch"]), float(st["best"])
    run.best_epoch = None if int(st["best_epoch"]) < 0 else int(st["best_epoch"])
    run.history = json.loads(st["history"])
    run.gen.set_state(st["gen_state"])
    torch.set_rng_state(st["rng_state"])
    logger.info("resumed from %s after epoch %d", path, run.epoch)


def stage2(config: Stage2Config) -> dict:
    """Train stage 2 and write an open_clip folder (weights of the best epoch, config, metrics,
    card). Returns the metrics dict."""
    t0 = time.time()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = prepare(config)
    params, opt, sched, steps = optimiser(run)
    state = out / STATE_FILE
    if config.resume and state.is_file():
        _resume(run, state, opt, sched)
    weights = sampling_weights(run.train_rows, config.sampling)
    for epoch in range(run.epoch, config.epochs):
        loss = train_epoch(run, params, opt, sched, steps, weights)
        val = validate(run)
        score = float(np.nanmean([v["mean_auc"] for v in val.values()]))
        run.epoch = epoch + 1
        run.history.append({"epoch": run.epoch, "loss": loss, "val_score": score,
                            "val_mean_auc": {k: v["mean_auc"] for k, v in val.items()}})
        logger.info("epoch %d/%d loss %.4f val %s", run.epoch, config.epochs, loss,
                    {k: round(v["mean_auc"], 3) for k, v in val.items()})
        if score > run.best:
            run.best, run.best_epoch = score, run.epoch
            write_weights(run.model, out / WEIGHTS_FILE, include_text=False)
        _save_state(run, state, opt, sched)
    metrics = finish(run, out, time.time() - t0)
    state.unlink(missing_ok=True)
    return metrics


def finish(run: Stage2Run, out: Path, seconds: float) -> dict:
    """Reload the best weights as stored, validate them with intervals, write config, metrics, card."""
    from .card import stage2_card

    load_weights(run.model, out / WEIGHTS_FILE)
    final = validate(run, n_boot=1000)
    atomic_write_json(out / "open_clip_config.json", {"model_cfg": run.model_cfg, "preprocess_cfg": run.preprocess_cfg})
    base_metrics = run.base_dir / "metrics.json"
    base = json.loads(base_metrics.read_text()) if base_metrics.is_file() else {}
    metrics = {"name": out.resolve().name, "stage": 2, "tower": TOWER, "config": run.config.run_config(),
               "command": run.config.command, "base_name": base.get("name") or run.base_dir.name,
               "base_command": base.get("command"), "base_config": base.get("config") or {},
               **{k: base[k] for k in ("init_from_name", "init_from_command", "init_from_image_size") if k in base},
               "base_val_mean_auc": {k: v.get("mean_auc") for k, v in
                                                                          (base.get("val") or {}).items()},
               "data": run.data_info, "n_train": len(run.train_rows), "n_val": len(run.val_rows),
               "n_train_dropped_withheld": run.n_dropped, "best_epoch": run.best_epoch, "val": final,
               "val_score": float(np.nanmean([v["mean_auc"] for v in final.values()])),
               "image_tower_params": sum(p.numel() for p in run.model.visual.parameters()),
               "trainable_params": sum(p.numel() for p in trainable_parameters(run.model)),
               "lora_target_linears": [n for n, _ in run.model.visual.named_modules()
                                       if n.endswith(("attn.qkv", "xca.qkv"))],
               "seconds": {"prepare": round(run.t_prepare, 1), "total": round(seconds, 1)},
               "card_bootstrap": 1000, "history": run.history}
    atomic_write_json(out / "metrics.json", metrics)
    stage2_card(out, metrics)
    return metrics
