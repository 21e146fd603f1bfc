"""OOD guard rates of a model's shipped statistics (and of the modality prompts) on held-out data.

    python benchmarks/bench_ood.py [--model vlm-xray-starter] [--data ../shared/data]

Must pass (false alarms): held-out-patient chest X-rays of every source (nih14 and the chest4
sources), plus nih14-lowres (64 px originals, another resolution; its patients overlap nih14's) and
the full-resolution samples/. Must be flagged: skin images sent to the chest label sets, chest X-rays
sent to skin12, natural photographs (scikit-image's sample images, originals and random crops) and
documents (text pages rendered with PIL). The shipped threshold was chosen on the same held-out
patients, so the false-alarm rate under it is in-sample; the `cross-fit` column is honest: the
threshold is re-chosen (same percentile) on one half of the held-out patients and applied to the other.

Writes ood_results.md and ood_results.json beside this script.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vlm import ood  # noqa: E402
from vlm.labels import load_label_set  # noqa: E402
from vlm.models import load_model  # noqa: E402

logger = logging.getLogger("bench_ood")

SKIMAGE_PHOTOS = ["astronaut", "camera", "cat", "coffee", "coins", "moon", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "grass", "gravel", "brick", "rough_wall", "retina", "skin", "eagle",
                  "chelsea", "motorcycle"]
USED_PHOTOS: list[str] = []
WORDS = ("patient report invoice total amount date signature page section table summary results method the "
         "of and to in is for with on by from this that which data analysis figure appendix number").split()


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def natural_photos(rng: np.random.Generator) -> list[np.ndarray]:
    """scikit-image sample photographs (+3 random crops of each, 40-80 % of the short side)."""
    from skimage import data as skdata

    out = []
    for name in SKIMAGE_PHOTOS:
        fn = getattr(skdata, name, None)
        if fn is None:
            continue
        try:
            img = fn()
        except (ModuleNotFoundError, OSError) as e:  # not in the wheel (needs a download): listed, not used
            logger.info("scikit-image sample %s not available offline (%s); not used", name, type(e).__name__)
            continue
        USED_PHOTOS.append(name)
        if name == "motorcycle":
            img = img[0]
        if img.dtype != np.uint8:
            f = img.astype(np.float64)
            img = (255 * (f - f.min()) / max(1e-9, np.ptp(f))).astype(np.uint8)
        img = np.repeat(img[:, :, None], 3, 2) if img.ndim == 2 else img[:, :, :3]
        out.append(img)
        h, w = img.shape[:2]
        for _ in range(3):
            s = int(min(h, w) * rng.uniform(0.4, 0.8))
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            out.append(np.ascontiguousarray(img[y:y + s, x:x + s]))
    return out


def documents(rng: np.random.Generator, n: int = 60) -> list[np.ndarray]:
    """Rendered text pages: random words, font sizes, margins, some with rules/tables, some inverted."""
    from PIL import Image, ImageDraw, ImageFont

    out = []
    for i in range(n):
        w, h = int(rng.integers(300, 700)), int(rng.integers(300, 900))
        bg = int(rng.integers(200, 256))
        page = Image.new("L", (w, h), bg)
        draw = ImageDraw.Draw(page)
        size = int(rng.integers(10, 28))
        font = ImageFont.load_default(size=size)
        y = int(rng.integers(10, 40))
        while y < h - size:
            line = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
            draw.text((int(rng.integers(5, 40)), y), line, fill=int(rng.integers(0, 80)), font=font)
            y += int(size * rng.uniform(1.2, 1.8))
            if rng.random() < 0.08:
                draw.line((10, y, w - 10, y), fill=0, width=1)
                y += 6
        arr = np.array(page)
        if i % 10 == 9:
            arr = 255 - arr
        out.append(np.repeat(arr[:, :, None], 3, 2))
    return out


def embed_pixels(backbone, images: list[np.ndarray], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    from vlm.transforms import model_tensors

    embs, feats = [], []
    for i in range(0, len(images), batch):
        e, f = ood.encode_with_features(backbone, model_tensors(images[i:i + batch], backbone.image_size,
                                                                backbone.mean, backbone.std))
        embs.append(e)
        feats.append(f)
    return np.concatenate(embs), np.concatenate(feats)


def cached(cache: Path, key: str, make) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, stage features), computed once per model fingerprint and set."""
    f = cache / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    if f.is_file():
        with np.load(f) as z:
            return z["emb"], z["feat"]
    emb, feat = make()
    f.parent.mkdir(parents=True, exist_ok=True)
    np.savez(f, emb=emb, feat=feat)
    return emb, feat


def collect(backbone, data: Path, cache: Path) -> dict[str, dict]:
    """name -> {"emb", "domain" (the domain it belongs to, or None for other modalities), "note"}."""
    rng = np.random.default_rng(0)
    sets: dict[str, dict] = {}

    def paths_set(name, paths, domain, note=""):
        emb, feat = cached(cache, f"{backbone.fingerprint}|{name}|{len(paths)}",
                           lambda: ood.embed_paths(backbone, paths, with_features=True)[:2])
        sets[name] = {"emb": emb, "feat": feat, "domain": domain, "note": note, "paths": paths}

    for folder, domain in (("nih14", "chest"), ("chest4", "chest"), ("skin", "skin")):
        for src, paths in ood.split_csv(data / folder / "labels.csv")["held_out"].items():
            paths_set(f"{src} (held-out patients)", paths, domain)
    lowres = data / "nih14-lowres" / "labels.csv"
    if lowres.is_file():
        paths_set("nih14-lowres (64 px originals)", [str(p) for p in sorted((data / "nih14-lowres").glob("*.jpg"))],
                  "chest", "another resolution; patients overlap nih14 training patients")
    samples = data / "samples"
    if samples.is_dir():
        paths_set("samples (full-res PNG + DICOM)", [str(p) for p in sorted(samples.iterdir())
                                                     if p.suffix.lower() in (".png", ".dcm")], "chest")
    photos = natural_photos(rng)
    emb, feat = cached(cache, f"{backbone.fingerprint}|photos|{len(photos)}", lambda: embed_pixels(backbone, photos))
    sets["natural photographs (scikit-image, +crops)"] = {
        "emb": emb, "feat": feat, "domain": None, "note": f"{len(USED_PHOTOS)} originals x (1 + 3 crops): {', '.join(USED_PHOTOS)}"}
    docs = documents(rng)
    emb, feat = cached(cache, f"{backbone.fingerprint}|docs|{len(docs)}", lambda: embed_pixels(backbone, docs))
    sets["documents (rendered text pages)"] = {
        "emb": emb, "feat": feat, "domain": None, "note": "PIL-rendered, 1 in 10 inverted"}
    return sets


def cross_fit_rate(guard: ood.OODGuard, sets: dict[str, dict], name: str) -> float:
    """False-alarm rate of `name` (embedding and stage-feature tests together) when each half of the
    held-out patients gets thresholds chosen on the other half (same percentile, all held-out sources
    of the domain pooled)."""
    members = {k: v for k, v in sets.items() if v["domain"] == guard.stats.name and "held-out" in k}
    spaces = [(guard.stats, "emb")] + ([(guard.feature_stats, "feat")] if guard.feature_stats is not None else [])
    flagged = total = 0
    for half in (0, 1):
        flags = None
        for stats, key in spaces:
            choose, apply_ = [], None
            for k, v in members.items():
                side = np.array([int(hashlib.sha256(p.encode()).hexdigest()[:2], 16) % 2 for p in v["paths"]])
                d = stats.distance(v[key])
                choose.append(d[side != half])
                if k == name:
                    apply_ = d[side == half]
            f = apply_ > np.percentile(np.concatenate(choose), stats.info["percentile"])
            flags = f if flags is None else flags | f
        flagged += int(flags.sum())
        total += len(flags)
    return flagged / total


def rates(backbone, sets: dict[str, dict]) -> list[dict]:
    rows = []
    for ls_name in ("chestxray14", "skin12"):
        ls = load_label_set(ls_name)
        default = ood.OODGuard.for_model(backbone, ls)
        stats = default.stats
        prompts = ood.OODGuard.for_model(backbone, ls, use_prompts=True).modality
        guards = {"default": (default, True), "embedding only": (ood.OODGuard(ls_name, stats), False),
                  "modality prompts": (ood.OODGuard(ls_name, None, prompts), False),
                  "default + prompts": (ood.OODGuard.for_model(backbone, ls, use_prompts=True), True)}
        for set_name, s in sets.items():
            expected_in = s["domain"] == stats.name
            row = {"label_set": ls_name, "set": set_name, "n": int(len(s["emb"])), "should_pass": expected_in,
                   "note": s["note"]}
            for method, (guard, with_features) in guards.items():
                verdicts = guard.check_batch(s["emb"], s["feat"] if with_features else None)
                flagged = sum(not v.in_distribution for v in verdicts)
                row[method] = {"flagged": flagged, "rate": flagged / len(s["emb"]),
                               "ci95": [round(v, 4) for v in wilson(flagged, len(s["emb"]))]}
            if expected_in and "held-out" in set_name:
                row["cross_fit_false_alarm"] = round(cross_fit_rate(default, sets, set_name), 4)
            rows.append(row)
    return rows


def markdown(rows: list[dict], backbone, elapsed: float, meta: dict) -> str:
    lines = [f"# OOD guard rates: `{backbone.name}` (fingerprint `{backbone.fingerprint}`)", "",
             "Command: `python benchmarks/bench_ood.py --model " + backbone.name + "` "
             f"({elapsed:.0f} s on CPU incl. embedding; cached embeddings reused).", "",
             "Default guard: Mahalanobis distance of the embedding **and** of the image tower's stage features "
             "(per-stage channel mean/std) to the model's training-patient images of the domain; flagged when either "
             "exceeds its threshold. Shipped statistics: " + ", ".join(
                 f"{k}: threshold {v['threshold']:.2f} ({v['threshold_rule']}; fitted on {v['n_fit']} training-patient "
                 f"images, threshold from {v['n_threshold']})" for k, v in meta["domains"].items()) + ".", "",
             "Rate = share of images flagged out-of-distribution (95% Wilson interval). For in-distribution sets "
             "this is the false-alarm rate (target <= 5%); for the others the detection rate (target >= 95%). "
             "`cross-fit` = false alarms with the threshold chosen on the other half of the held-out patients "
             "(the shipped-threshold column is in-sample for held-out sets).", "",
             "| label set | images | n | should | **default** (embedding + stage features) | default, cross-fit | "
             "embedding only | modality prompts | default + prompts |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r: f"{r['rate']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]"  # noqa: E731
    for r in rows:
        cf = r.get("cross_fit_false_alarm")
        lines.append(f"| {r['label_set']} | {r['set']} | {r['n']} | {'pass' if r['should_pass'] else 'flag'} | "
                     f"**{fmt(r['default'])}** | {'' if cf is None else f'{cf:.1%}'} | {fmt(r['embedding only'])} | "
                     f"{fmt(r['modality prompts'])} | {fmt(r['default + prompts'])} |")
    lines += ["", "Notes: " + "; ".join(sorted({f"{r['set']}: {r['note']}" for r in rows if r["note"]})) + ".",
              "chest4 and chestxray14 share the `chest` statistics, so the chest4 guard gives the same verdicts.",
              "Modality prompts are shown for comparison only: with the starter's locked MiniLM text tower (never "
              "trained on modality captions) they call most chest X-rays something else, so a model that ships "
              "statistics is guarded by the two distances alone (`OODGuard.for_model(..., use_prompts=None)`); "
              "prompts are the fallback for models without statistics (e.g. BiomedCLIP), unmeasured here.",
              "Embedding-only (`guard.check(embeddings)` without features) misses grey photographs (moon, camera, "
              "brick) and text pages: callers should use `guard.check_image` or pass `features=`.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vlm-xray-starter")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--cache", default=os.path.join(os.environ.get("VLM_XRAY_CACHE", "~/.cache/vlm-xray"), "bench_ood"))
    ap.add_argument("--suffix", default="", help="results file suffix, e.g. -unseen")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    backbone = load_model(args.model)
    sets = collect(backbone, Path(args.data), Path(args.cache).expanduser())
    rows = rates(backbone, sets)
    meta, _ = ood.load_stats(ood.stats_path_for(backbone))
    elapsed = time.time() - t0
    (HERE / f"ood_results{args.suffix}.json").write_text(json.dumps(
        {"model": backbone.name, "fingerprint": backbone.fingerprint, "rows": rows, "stats": meta}, indent=2))
    (HERE / f"ood_results{args.suffix}.md").write_text(markdown(rows, backbone, elapsed, meta))
    print((HERE / f"ood_results{args.suffix}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
