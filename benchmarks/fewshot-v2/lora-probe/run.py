"""Does LoRA on the attention projections of `vlm-xray-starter-unseen` add within-source signal that a
head-only adapter cannot, at 16 shots? (issue 10). chest4, held-out = the model's pre-training validation
patients (`vlm.adapt.study.pretrain_val_split`); shots, validation sample and scoring exactly as
`vlm.adapt.study.run_study` draws them (k per class, or `source_matched_sample` shots; validation =
max(k, 8) per class source-matched from the other pool patients, seed + 1000). Training is the library's
`train_lora` (head-only = `LORA_METHODS["head-only"]`: LoRA frozen at its no-op init), with the per-label
guard switched off (`vlm.adapt.guard.ENABLED = False`), so a LoRA update is never dropped after training.
LoRA's own epoch-0 / WiSE-FT macro never-worse check (`lora._keep_or_fall_back`) still runs; it has no
switch, so each run records the kept epoch and WiSE-FT amount (epoch 0 = the adapter is zero-shot).

Per configuration x seed: held-out macro AUC, within-source macro, TUBERCULOSIS, COVID19 within COVID-QU,
and how far the kept adapter moves the held-out image embeddings (1 - mean cosine to the base embeddings).

    python benchmarks/fewshot-v2/lora-probe/run.py [--config NAME ...] [--seeds 3] [--first-seed 0] [--shots 16]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlm.adapt import LORA_METHODS, guard
from vlm.adapt.core import exclude_groups
from vlm.adapt.guard import source_matched_sample
from vlm.adapt.heads import PromptHead
from vlm.adapt.lora import LoraSettings, encode_tensors, train_lora
from vlm.adapt.study import pretrain_val_split
from vlm.data import load_labelled_csv, sample_shots
from vlm.images import load_image
from vlm.labels import load_label_set
from vlm.metrics import auc_metrics
from vlm.models import load_model
from vlm.prompt_classifier import text_classifier
from vlm.transforms import variant_tensors
from vlm.within_source import within_source

logger = logging.getLogger("lora-probe")
HERE = Path(__file__).resolve().parent
BIG = {"rank": 16, "alpha": 32.0, "lr": 3e-3, "epochs": 80, "patience": 16}
# name: (method, LoraSettings overrides, shots sampling)
CONFIGS = {
    "head-only": ("head-only", {}, "k"),
    "lora-default": ("lora", {}, "k"),
    "head-only-long": ("head-only", {"epochs": 80, "patience": 16}, "k"),
    "lora-r16-lr3e-3-80ep": ("lora", BIG, "k"),
    "head-only-long-matched": ("head-only", {"epochs": 80, "patience": 16}, "matched"),
    "lora-r16-lr3e-3-80ep-matched": ("lora", BIG, "matched"),
    # not in the default run: LoRA alone, the head frozen at the prompt embeddings (what the features learn)
    "lora-only-r16-lr3e-3-80ep": ("lora", {**BIG, "train_head": False}, "k"),
}
DEFAULT = list(CONFIGS)[:6]
COLS = {"macro": "macro_auc", "within-source macro": "within_macro_auc", "TUBERCULOSIS": "auc:TUBERCULOSIS",
        "COVID19 within COVID-QU": "within:COVID19@covidqu"}


def held_out_tensors(backbone, held):
    xs = [variant_tensors(load_image(p), ["original"], backbone.image_size, backbone.mean, backbone.std)
          for p in held.paths]  # an unreadable held-out image is an error here, not a skipped row
    return torch.stack(xs)[:, 0]


def metrics(targets, probs, label_set, sources) -> dict:
    m = auc_metrics(targets, probs, label_set)
    w = within_source(targets, probs, label_set, sources, n_boot=0)
    out = {"macro_auc": m["macro_auc"], **{f"auc:{k}": v for k, v in m["per_label"].items()},
           "within_macro_auc": (w["macro"].get("within") or {}).get("auc")}
    for name, e in w["labels"].items():
        out.update({f"within:{name}@{x['source']}": x["auc"] for x in e["within"]})
    return out


def run_one(backbone, label_set, pool, name, seed, shots, ev, base_emb) -> dict:
    method, overrides, sampling = CONFIGS[name]
    shots_of = source_matched_sample if sampling == "matched" else sample_shots
    train = pool.subset(shots_of(pool, shots, seed))
    rest = exclude_groups(pool, train)
    val = rest.subset(source_matched_sample(rest, max(shots, 8), seed + 1000))  # as run_study draws it
    st = dataclasses.replace(LoraSettings(), seed=seed, **{**overrides, **LORA_METHODS[method]})
    t0 = time.time()
    res = train_lora(backbone, label_set, train, val, st, progress=False)
    emb = base_emb if res.backbone is backbone else encode_tensors(res.backbone.module, ev["x"])
    with torch.no_grad():
        probs = res.head(emb[:, None]).mean((1, 2)).cpu().numpy()
    drift = float(1 - F.cosine_similarity(emb, base_emb, dim=-1).mean())
    row = {"config": name, "method": method, "seed": seed, "shots_sampling": sampling, "n_train": len(train),
           "n_val": len(val), **metrics(ev["t"], probs, label_set, ev["sources"]),
           "best_epoch": res.info["best_epoch"], "steps": res.info["steps"],
           "wise_alpha": (res.info.get("wise_ft") or {}).get("alpha"),
           "label_guard": res.info["label_guard"].get("why"), "embedding_drift": round(drift, 6),
           "layer_scale_params": len(res.info["layer_scale_params"]), "trainable_params": res.info["trainable_params"],
           "seconds": round(time.time() - t0, 1)}
    logger.info(f"{name:<30} seed {seed}: macro {row['macro_auc']:.4f} within {row['within_macro_auc']:.4f} "
                f"TB {row['auc:TUBERCULOSIS']:.4f} COVID19@covidqu {row['within:COVID19@covidqu']:.4f} "
                f"epoch {row['best_epoch']} a={row['wise_alpha']} drift {drift:.2e} {row['seconds']} s")
    return row


def _mean_sd(vals) -> str:
    vals = [v for v in vals if v is not None]
    return "n/a" if not vals else f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"


def markdown(rows, zs, meta) -> str:
    configs = list(dict.fromkeys(r["config"] for r in rows))
    head = ["config", "method", "shots"] + list(COLS) + ["kept epoch (per seed)", "WiSE-FT a", "embedding drift"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| zero-shot | | 0 | " + " | ".join(f"{zs[c]:.3f}" for c in COLS.values()) + " | | | 0 |"]
    for c in configs:
        rs = [r for r in rows if r["config"] == c]
        cells = [c, rs[0]["method"], rs[0]["shots_sampling"]] + [_mean_sd([r.get(k) for r in rs]) for k in COLS.values()]
        cells += [", ".join(str(r["best_epoch"]) for r in rs), ", ".join(str(r["wise_alpha"]) for r in rs),
                  f"{np.mean([r['embedding_drift'] for r in rs]):.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rows) -> str:
    """Each LoRA config minus the head-only config with the same shots sampling and schedule, per seed."""
    pairs = {"lora-default": "head-only", "lora-r16-lr3e-3-80ep": "head-only-long",
             "lora-r16-lr3e-3-80ep-matched": "head-only-long-matched", "lora-only-r16-lr3e-3-80ep": "head-only-long"}
    by = {(r["config"], r["seed"]): r for r in rows}
    lines = ["| LoRA config - head-only config | " + " | ".join(f"Δ {k} (per seed)" for k in COLS) + " |",
             "|---|" + "---|" * len(COLS)]
    for lo, ho in pairs.items():
        seeds = sorted(s for (c, s) in by if c == lo and (ho, s) in by)
        if not seeds:
            continue
        cells = []
        for k in COLS.values():
            d = [by[(lo, s)][k] - by[(ho, s)][k] for s in seeds if by[(lo, s)].get(k) is not None]
            cells.append(f"{np.mean(d):+.3f} ({', '.join(f'{x:+.3f}' for x in d)})" if d else "n/a")
        lines.append(f"| {lo} - {ho} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", choices=list(CONFIGS), help=f"default: {', '.join(DEFAULT)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--data", default="../shared/data/chest4/labels.csv")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("vlm.adapt").setLevel(logging.WARNING)
    t_start, load_start = time.time(), os.getloadavg()
    guard.ENABLED = False  # measure the adapters themselves: no per-label fallback, no dropped LoRA update
    backbone = load_model("vlm-xray-starter-unseen", device="cpu")
    ls = load_label_set("chest4")
    pool, held, split = pretrain_val_split(backbone, load_labelled_csv(args.data, ls))
    x = held_out_tensors(backbone, held)
    ev = {"x": x, "t": held.targets, "sources": held.column("source")}
    base_emb = encode_tensors(backbone.module, x)
    zs_head = PromptHead.from_classifier(text_classifier(backbone, ls)).eval()
    with torch.no_grad():
        zs = metrics(ev["t"], zs_head(base_emb[:, None]).mean((1, 2)).numpy(), ls, ev["sources"])
    logger.info(f"held-out {len(held)} images ({split}); zero-shot macro {zs['macro_auc']:.4f}, "
                f"COVID19@covidqu {zs['within:COVID19@covidqu']:.4f}")
    rows = [run_one(backbone, ls, pool, c, s, args.shots, ev, base_emb)
            for c in (args.config or DEFAULT) for s in range(args.first_seed, args.first_seed + args.seeds)]
    meta = {"command": " ".join(["python"] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "load_average_start": [round(v, 2) for v in load_start],
            "load_average_end": [round(v, 2) for v in os.getloadavg()], "seconds": round(time.time() - t_start, 1),
            "model": backbone.name, "model_fingerprint": backbone.fingerprint, "label_set": ls.name,
            "data": args.data, "held_out": split, "n_held_out": len(held), "n_pool": len(pool), "shots": args.shots,
            "seeds": list(range(args.first_seed, args.first_seed + args.seeds)), "per_label_guard": "off (vlm.adapt.guard.ENABLED = False)",
            "configs": {c: {"method": m, "settings": o, "shots": s} for c, (m, o, s) in CONFIGS.items()},
            "default_settings": LoraSettings().to_dict()}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "zero_shot": zs, "rows": rows}, indent=2))
    tables = markdown(rows, zs, meta) + "\n\n" + paired(rows)
    args.out.with_suffix(".md").write_text(
        f"# LoRA vs head-only within source: {meta['model']} on chest4, {args.shots} shots\n\n"
        f"`{meta['command']}` (run under the heavy lock), {meta['date_utc']} UTC, load average "
        f"{meta['load_average_start']} at the start, {meta['load_average_end']} at the end, {meta['seconds']} s. "
        f"Held-out: {split}, {len(held)} images; seeds {meta['seeds']}; per-label guard off. "
        f"Mean ± sd over seeds; kept epoch 0 = the macro never-worse check kept zero-shot.\n\n{tables}\n")
    logger.info("\n" + tables)
    logger.info(f"wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')} in {meta['seconds']} s")


if __name__ == "__main__":
    main()
