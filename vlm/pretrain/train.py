"""`pretrain(config)`: one LiT pre-training run from labelled CSVs to an open_clip model folder."""
from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write_json, atomic_write_text
from ..models.base import OPENAI_MEAN, OPENAI_STD
from .augment import allows_flips
from .captions import Captions, prompt_bank
from .card import model_card
from .checkpoint import STATE_FILE, WEIGHTS_FILE, load_train_state, load_weights, save_train_state, write_weights
from .config import PretrainConfig
from .dataset import check_withheld, load_training_rows, preload_images, split_rows, withhold
from .evaluation import evaluate
from .loop import TrainingRun, epoch_message, train_one_epoch
from .model import TextSide, build_model, lora_target_linears
from .scheduler import cosine_lr

logger = logging.getLogger(__name__)

CARD_BOOTSTRAP = 1000  # resamples for the validation AUC intervals in metrics.json and the card


def pretrain(config: PretrainConfig | list | None = None, out_dir: str | Path | None = None, **settings) -> dict:
    """Train a LiT-style CLIP (locked MiniLM text, trained image tower); write an open_clip folder.

    Pass a `PretrainConfig`, or (data, out_dir, **settings) as its fields. Writes
    open_clip_config.json, open_clip_model.safetensors (best epoch), metrics.json, README.md (model
    card) and, while training, train_state.pt. Returns the metrics dict; key "model" holds the
    in-memory model with the best weights (exactly as saved, fp16-rounded)."""
    if not isinstance(config, PretrainConfig):
        config = PretrainConfig(data=list(config or []), out_dir=str(out_dir or ""), **settings)
    config.validate()
    t_start = time.time()
    _seed_everything(config)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run, info = prepare_run(config)
    stopped = train(run, out)
    metrics = finish(run, out, {**info, "t_start": t_start, "stopped_by_time_budget": stopped})
    metrics["model"] = run.model
    return metrics


def _seed_everything(config: PretrainConfig) -> None:
    if config.num_threads or config.device == "cpu":
        torch.set_num_threads(config.num_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)


def prepare_run(config: PretrainConfig) -> tuple[TrainingRun, dict]:
    """Rows, split, model, texts, images and optimiser of a run (in this order: the random draws of
    each step depend on it)."""
    rows_all, label_sets, data_info = load_training_rows(config.data, config.seed, config.max_rows_per_csv)
    withheld = frozenset(config.withhold_labels)
    check_withheld(withheld, label_sets)
    train_rows, val_rows = split_rows(rows_all, config.val_fraction, config.seed)
    train_rows, n_dropped = withhold(train_rows, withheld, config.withheld_mode)
    if not train_rows:
        raise ValueError("no training rows left")
    model, model_cfg = build_model(config)
    init_record = {}
    if config.init_from:
        init_record = init_image_tower(model, config.init_from, config.image_tower)
    lora_targets = lora_target_linears(model)
    device = torch.device(config.device)
    model.to(device)
    captions = Captions(label_sets, withheld, config.seed)
    train_combo = torch.tensor([captions.combo_of(r) for r in train_rows])
    prompt_texts, bank = prompt_bank(label_sets)
    offset = len(captions.table)
    t0 = time.time()
    model.eval()
    text = TextSide(model, captions.table.texts + prompt_texts, device, lora=config.text_lora)
    t_text = time.time() - t0
    t0 = time.time()
    train_px = preload_images([r.path for r in train_rows], config.image_size, config.cache_dir, config.progress)
    val_px = preload_images([r.path for r in val_rows], config.image_size, config.cache_dir, config.progress)
    run = TrainingRun(
        config=config, model=model, label_sets=label_sets, train_rows=train_rows, val_rows=val_rows,
        captions=captions, train_combo=train_combo, bank=bank, prompt_offset=offset,
        prompt_ids={t: offset + i for i, t in enumerate(prompt_texts)}, text=text,
        prompt_targets=_prompt_targets(label_sets, train_rows, withheld),
        set_idx=torch.tensor([list(label_sets).index(r.label_set) for r in train_rows]),
        flips=torch.tensor([allows_flips(label_sets[r.label_set]) for r in train_rows]),
        train_px=train_px, val_px=val_px, device=device, mean=OPENAI_MEAN, std=OPENAI_STD, withheld=withheld)
    _optimiser(run)
    info = {"init_record": init_record, "model_cfg": model_cfg,
            "data_info": data_info, "n_dropped": n_dropped, "lora_targets": lora_targets,
            "n_caption_texts": offset, "n_prompt_texts": len(prompt_texts),
            "t_text": t_text, "t_load": time.time() - t0}
    return run, info


def init_image_tower(model, source: str, image_tower: str) -> dict:
    """Start from a trained model's weights file (image tower, text projection, logit scale: the joint
    space they were trained in), e.g. a 128 px model fine-tuned at 192 px (progressive resizing). The
    text transformer stays the locked MiniLM of `build_model`. Returns how that model was made (its
    name, command and size, from its metrics.json), for the card."""
    from ..models import load_model

    folder = Path(load_model(source, defer_text=True).source)
    theirs = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"].get("timm_model_name")
    if theirs != image_tower:
        raise ValueError(f"--init-from {folder}: its image tower is {theirs}, not {image_tower}; "
                         f"give --image-tower {theirs} or another model")
    load_weights(model, folder / WEIGHTS_FILE)
    logger.info("image tower initialised from %s", folder)
    mj = folder / "metrics.json"
    made = json.loads(mj.read_text()) if mj.is_file() else {}
    return {"init_from_name": made.get("name") or folder.name, "init_from_command": made.get("command"),
            "init_from_image_size": (made.get("config") or {}).get("image_size")}


def _prompt_targets(label_sets, train_rows, withheld) -> dict:
    """Per label set: (labels the prompt loss trains, (N, L) float targets of every training row).
    Multi-class targets are multi-hot: a group label ("benign keratosis") is any of its members."""
    out = {}
    for sname, ls in label_sets.items():
        active = [n for n in ls.names if n not in withheld]
        if ls.multilabel:
            out[sname] = (active, torch.tensor([[float(n in r.labels) for n in active] for r in train_rows]))
        else:
            out[sname] = (active, torch.tensor([[float(r.label_set == sname and n in r.labels) for n in active]
                                                for r in train_rows]))
    return out


def _optimiser(run: TrainingRun) -> None:
    cfg = run.config
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    decay = [p for p in run.params if p.ndim >= 2]
    no_decay = [p for p in run.params if p.ndim < 2]
    run.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    n_train = len(run.train_rows)
    steps = max(1, n_train // cfg.batch_size) if n_train >= cfg.batch_size else 1
    run.steps_per_epoch = min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps
    run.adjust_lr = cosine_lr(run.optimizer, cfg.lr, int(cfg.warmup_epochs * run.steps_per_epoch),
                              run.steps_per_epoch * cfg.epochs, cfg.max_minutes * 60 if cfg.max_minutes else None)
    run.gen = torch.Generator().manual_seed(cfg.seed)


def resume(run: TrainingRun, state_path: Path) -> None:
    """Continue a run from its train_state.pt (same configuration up to the budget)."""
    st = load_train_state(state_path)
    run.config.check_resume(st["config"], str(state_path))
    run.model.load_state_dict(st["model"], strict=False)
    run.optimizer.load_state_dict(st["optimizer"])
    run.elapsed_before = float(st.get("elapsed", 0.0))
    run.epoch, run.best, run.step = int(st["epoch"]), float(st["best"]), int(st["step"])
    run.history = st["history"]
    run.gen.set_state(st["gen_state"])
    torch.set_rng_state(st["rng_state"])
    logger.info("resumed from %s at epoch %d", state_path, run.epoch)


def train(run: TrainingRun, out: Path) -> bool:
    """Epochs until done or the time budget is spent; the best epoch's weights and the training
    state are written after each epoch. Returns whether the budget stopped training."""
    cfg = run.config
    state_path = out / STATE_FILE
    if cfg.resume and state_path.is_file():
        resume(run, state_path)
    run.model.train()
    if not cfg.text_lora:
        run.model.text.eval()
    run.t_train0 = time.time()
    stopped = False
    for epoch in range(run.epoch, cfg.epochs):
        rec, stopped = train_one_epoch(run, epoch)
        if not rec["steps"]:  # time budget used up before this epoch started
            break
        _validate_and_keep_best(run, rec, out, last=epoch + 1 == cfg.epochs or stopped)
        run.history.append(rec)
        logger.info(epoch_message(rec, cfg.epochs))
        save_train_state(state_path, run.model, run.optimizer, epoch=epoch + 1, step=run.step, best=run.best,
                         elapsed=run.elapsed, history=run.history, run_config=cfg.run_config(), gen=run.gen)
        if stopped:
            logger.info("time budget of %s min reached after epoch %d", cfg.max_minutes, epoch + 1)
            break
    run.session_seconds = time.time() - run.t_train0
    return stopped


def _validate_and_keep_best(run: TrainingRun, rec: dict, out: Path, last: bool) -> None:
    cfg = run.config
    if not run.val_rows:  # nothing to select on: the latest weights are the model
        write_weights(run.model, out / WEIGHTS_FILE, include_text=cfg.text_lora)
        return
    if rec["epoch"] % cfg.val_every and not last:
        return
    val = evaluate(run)
    score = float(np.nanmean([v["mean_auc"] for v in val.values()]))
    rec.update(val=val, val_score=score)
    if score > run.best or run.best < 0:
        run.best = score
        write_weights(run.model, out / WEIGHTS_FILE, include_text=cfg.text_lora)
        rec["best"] = True


def _label_counts(rows, set_names) -> dict:
    # counts of the CSV label strings (a group such as "benign keratosis" counted as itself)
    return {s: dict(Counter(n for r in rows if r.label_set == s for n in (r.raw_labels or ("(none)",))))
            for s in set_names}


def finish(run: TrainingRun, out: Path, info: dict) -> dict:
    """Reload the best weights exactly as stored, validate them, write config, metrics and card."""
    cfg, model = run.config, run.model
    if cfg.text_lora:
        model.text.transformer = model.text.transformer.merge_and_unload()
    load_weights(model, out / WEIGHTS_FILE)
    final_val = evaluate(run, n_boot=CARD_BOOTSTRAP) if run.val_rows else {}
    model.eval()
    atomic_write_text(out / "open_clip_config.json", json.dumps({
        "model_cfg": info["model_cfg"],
        "preprocess_cfg": {"mean": list(run.mean), "std": list(run.std), "size": cfg.image_size,
                           "resize_mode": "shortest", "interpolation": "bicubic"}}, indent=2))
    epochs_hist = [h for h in run.history if "epoch" in h]
    metrics = {
        "config": cfg.run_config(), "name": out.resolve().name, "command": cfg.command, "data": info["data_info"],
        **info["init_record"],
        "n_train": len(run.train_rows), "n_val": len(run.val_rows), "n_train_dropped_withheld": info["n_dropped"],
        "train_counts": _label_counts(run.train_rows, run.set_names),
        "val_counts": _label_counts(run.val_rows, run.set_names),
        "image_tower_params": sum(p.numel() for p in model.visual.parameters()),
        "lora_target_linears": info["lora_targets"],
        "n_caption_texts": info["n_caption_texts"], "n_prompt_texts": info["n_prompt_texts"],
        "seconds": {"text_precompute": round(info["t_text"], 1), "image_preload": round(info["t_load"], 1),
                    "train": round(run.elapsed_before + run.session_seconds, 1),  # cumulative over resumes
                    "total": round(time.time() - info["t_start"], 1)},
        "images_per_second": round(run.n_seen / max(run.session_seconds, 1e-9), 1),
        "best_epoch": next((h["epoch"] for h in reversed(epochs_hist) if h.get("best")), None),
        "epochs_done": max((h["epoch"] for h in epochs_hist), default=0),
        "stopped_by_time_budget": info["stopped_by_time_budget"],
        "val": final_val,
        "val_score": float(np.nanmean([v["mean_auc"] for v in final_val.values()])) if final_val else None,
        "history": run.history,
        "card_bootstrap": CARD_BOOTSTRAP if final_val else 0,
    }
    atomic_write_json(out / "metrics.json", metrics, default=str)
    atomic_write_text(out / "README.md", model_card(metrics, run.label_sets, cfg))
    if not cfg.keep_train_state:
        (out / STATE_FILE).unlink(missing_ok=True)
    return metrics
