"""Within-source zero-shot evaluation and source probe of the bundled (or any) models.

Protocol (issue 10): held-out images = the patient split of `vlm-xray pretrain` (sha256 of
"seed:<dataset folder>/<patient>", 15 %, seed 0), i.e. the starters' own validation patients (they
chose their best epoch on them: slightly optimistic). Each label is scored one-vs-rest and
**within source** (`vlm.within_source`: only negatives of the same `source`), with
patient-bootstrap 95 % intervals. A source probe (logistic regression on the image embeddings,
grouped 5-fold) says how well the embeddings name the collection: chest = nih14 + chest4 images
(4 sources), skin = HAM10000 vs ISIC9. Scoring: the product's prompt classifier, raw
probabilities (`--calibration none`), all prompt styles, variant `original`.

    python benchmarks/within_source.py --model vlm-xray-starter --model vlm-xray-starter-unseen [--write-card]

writes benchmarks/within_source.json (one entry per model, merged with earlier runs) and
benchmarks/within_source.md; with --write-card also `evaluation.json` in the model's folder and
re-renders its card (stage-2 folders).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = ["nih14", "chest4", "skin"]
PROBES = {"chest": ("nih14", "chest4"), "skin": ("skin",)}
logger = logging.getLogger("within_source")


def heldout(data_root: Path, name: str, seed: int, val_fraction: float):
    from vlm.data import detect_label_set, load_labelled_csv
    from vlm.labels import load_label_set

    csv_path = data_root / name / "labels.csv"
    data = load_labelled_csv(csv_path, load_label_set(detect_label_set(csv_path)))
    return data.split(val_fraction, seed)[1]


def model_withheld(backbone) -> list[str]:
    mj = Path(backbone.source) / "metrics.json" if backbone.source else None
    if mj and mj.is_file():
        return list(json.loads(mj.read_text()).get("config", {}).get("withhold_labels") or [])
    return []


def evaluate_model(model: str, sets: dict, n_boot: int, seed: int) -> dict:
    from vlm.api import load_scorer
    from vlm.evaluate import encode_dataset, image_probabilities
    from vlm.within_source import source_probe, within_source

    out, emb_of = {"sets": {}}, {}
    for name, data in sets.items():
        scorer = load_scorer(model, labels=data.label_set.name, calibration="none", variants=["original"], ood="off")
        emb, ok, failures = encode_dataset(scorer.backbone, data.paths, scorer.variants, None, 32, 1)
        if failures:
            raise RuntimeError(f"{name}: {len(failures)} images could not be read, e.g. {failures[0]}")
        probs = image_probabilities(scorer, emb, len(data.label_set.labels))
        withheld = model_withheld(scorer.backbone)
        r = within_source(data.targets, probs, data.label_set, data.column("source"), data.groups, n_boot, seed,
                          exclude=withheld)
        out["sets"][name] = {"label_set": data.label_set.name, "n": len(data), **r, "withheld": withheld}
        emb_of[name] = emb.mean(1).numpy()
        out.update(model=model, fingerprint=scorer.backbone.fingerprint, withheld=withheld)
        logger.info("%s %s: %s", model, name, {k: v["auc"] for k, v in r["macro"].items()})
    out["source_probe"] = {}
    for probe, names in PROBES.items():
        names = [n for n in names if n in sets]
        if names:
            emb = np.concatenate([emb_of[n] for n in names])
            src = sum((sets[n].column("source") for n in names), [])
            groups = sum((sets[n].groups for n in names), [])
            out["source_probe"][probe] = source_probe(emb, src, groups, seed)
    return out


def _fmt(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{m['auc']:.3f}" + (f" ({m['ci95'][0]:.3f}–{m['ci95'][1]:.3f})" if m.get("ci95") else "")


def card_rows(r: dict) -> list[dict]:
    """The rows a model card shows: macros per set, then every within-source comparison."""
    rows = []
    for name, s in r["sets"].items():
        rows.append({"name": f"{name}: macro one-vs-rest", "text": _fmt(s["macro"].get("one-vs-rest"))})
        rows.append({"name": f"{name}: macro within source", "text": _fmt(s["macro"].get("within"))})
        if len({w["source"] for e in s["labels"].values() for w in e["within"]}) < 2:
            continue  # one source: within source is one-vs-rest, label by label
        for label, e in s["labels"].items():
            tag = " (withheld in pre-training)" if label in s["withheld"] else ""
            for w in e["within"]:
                rows.append({"name": f"{name}: {label}{tag} vs {w['source']} negatives ({w['n_pos']}/{w['n_neg']})",
                             "text": _fmt(w)})
            if e["cross_source_only"]:
                rows.append({"name": f"{name}: {label}{tag} (cross-source only: its source has no negatives)",
                             "text": _fmt(e["one_vs_rest"])})
    return rows


def model_markdown(key: str, r: dict) -> list[str]:
    lines = [f"## `{key}` (fingerprint `{r['fingerprint']}`)", ""]
    if r["withheld"]:
        lines += [f"Withheld from its pre-training (zero-shot transfer): {', '.join(r['withheld'])}.", ""]
    lines += ["| comparison | AUC (95% CI) |", "|---|---|"] + [f"| {x['name']} | {x['text']} |" for x in card_rows(r)]
    lines += ["", "Source probe (logistic regression on image embeddings, grouped 5-fold CV on the held-out images):", "",
              "| images | sources (n) | accuracy | balanced acc. | majority | AUC per source |", "|---|---|---|---|---|---|"]
    for probe, p in r["source_probe"].items():
        if p:
            lines.append(f"| {probe} | {', '.join(f'{k} {v}' for k, v in p['sources'].items())} | {p['accuracy']:.3f} | "
                         f"{p['balanced_accuracy']:.3f} | {p['majority']:.3f} | "
                         + ", ".join(f"{k} {v:.3f}" for k, v in p["auc_per_source"].items()) + " |")
    return lines + [""]


def write_card(model: str, r: dict, command: str) -> None:
    from vlm.models import load_model
    from vlm.pretrain.card import stage2_card

    folder = Path(load_model(model).source)
    ev = {"command": command, "rows": card_rows(r),
          "probe": {k: v for k, v in r["source_probe"].items() if v}}
    (folder / "evaluation.json").write_text(json.dumps(ev, indent=1) + "\n", encoding="utf-8")
    metrics = json.loads((folder / "metrics.json").read_text())
    if metrics.get("stage") == 2:
        stage2_card(folder, metrics)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model name or folder (repeatable)")
    ap.add_argument("--name", action="append", help="result key per --model (default: the model argument)")
    ap.add_argument("--data-root", default=str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--write-card", action="store_true", help="write evaluation.json + card into the model folder")
    ap.add_argument("--out", default=str(HERE / "within_source"), help="output stem (.json/.md)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = a.name or a.model
    if len(names) != len(a.model):
        ap.error("--name must be given once per --model")
    sets = {n: heldout(Path(a.data_root), n, a.seed, a.val_fraction) for n in DATA}
    out_json = Path(a.out).with_suffix(".json")
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    for model, key in zip(a.model, names):
        r = evaluate_model(model, sets, a.n_boot, a.seed)
        results[key] = r
        out_json.write_text(json.dumps(results, indent=1) + "\n")
        if a.write_card:
            write_card(model, r, f"python benchmarks/within_source.py --model {Path(model).name}")
    head = (__doc__ or "").split("\n\n    python")[0].strip()
    lines = ["# Within-source evaluation and source probe", "", "Produced by `benchmarks/within_source.py`.", "",
             head, ""]
    for key, r in results.items():
        lines += model_markdown(key, r)
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
