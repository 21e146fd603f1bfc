"""Heatmap cost and sanity on CPU.

    python benchmarks/bench_explain.py [--images 8] [--calls 500]

- time per image per method (3 labels per call) on the bundled starter (EdgeNeXt conv tower, 128 px)
  and on an open_clip ViT-B/16 at 224 px with random weights (its cost does not depend on training);
- resident memory over `--calls` consecutive heatmap calls on the starter (hooks must be released);
- the model-randomisation check (Adebayo et al. 2018): Spearman rank correlation between the
  starter's maps and those of the same model with its image tower re-initialised.

Writes explain_results.md and explain_results.json beside this script.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vlm import explain as E  # noqa: E402
from vlm.labels import load_label_set  # noqa: E402
from vlm.models import load_model  # noqa: E402
from vlm.models.base import Backbone  # noqa: E402

LABELS = ["Cardiomegaly", "Effusion", "Pneumonia"]


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def time_methods(backbone, label_set, images, classifier) -> dict[str, float]:
    out = {}
    for method in E.methods_for(backbone):
        E.explain(backbone, label_set, images[0], LABELS, method=method, classifier=classifier)  # warm-up
        t = time.perf_counter()
        for img in images:
            E.explain(backbone, label_set, img, LABELS, method=method, classifier=classifier)
        out[method] = (time.perf_counter() - t) / len(images)
    return out


def vit_b16_timing(n: int) -> dict[str, float]:
    from vlm.models import build_open_clip

    cfg = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 1}}
    torch.manual_seed(0)
    module = build_open_clip(cfg).eval()
    backbone = Backbone("ViT-B-16 (random weights)", module, None, 224)
    d = torch.nn.functional.normalize(torch.randn(len(LABELS), 512), dim=-1) * 100
    out = {}
    for method in E.methods_for(backbone):
        x = torch.randn(1, 3, 224, 224)
        E.explain_tensor(backbone, x, d, method)
        t = time.perf_counter()
        for _ in range(n):
            E.explain_tensor(backbone, torch.randn(1, 3, 224, 224), d, method)
        out[method] = (time.perf_counter() - t) / n
    return out


def memory_over_calls(backbone, label_set, image, classifier, calls: int) -> dict:
    for _ in range(10):
        E.explain(backbone, label_set, image, LABELS[:1], classifier=classifier)
    gc.collect()
    start = rss_mb()
    samples = []
    for i in range(calls):
        E.explain(backbone, label_set, image, LABELS[:1], classifier=classifier)
        if (i + 1) % 100 == 0:
            gc.collect()
            samples.append(round(rss_mb() - start, 1))
    return {"calls": calls, "rss_start_mb": round(start, 1), "growth_mb_every_100": samples,
            "growth_mb": samples[-1] if samples else 0.0}


def randomisation(images, label_set) -> dict:
    from scipy.stats import spearmanr

    trained = load_model("vlm-xray-starter")
    randomised = load_model("vlm-xray-starter")
    torch.manual_seed(123)
    for m in randomised.module.visual.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    rhos = []
    for img in images:
        for a, b in zip(E.explain(trained, label_set, img, LABELS), E.explain(randomised, label_set, img, LABELS)):
            rho = spearmanr(a.map.ravel(), b.map.ravel()).statistic
            rhos.append(0.0 if np.isnan(rho) else float(rho))
    return {"n_maps": len(rhos), "mean_spearman": round(float(np.mean(rhos)), 3),
            "max_spearman": round(float(np.max(rhos)), 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "nih14"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    images = [str(p) for p in sorted(Path(args.data).glob("*.jpg"))[: args.images]]
    if not images:
        raise SystemExit(f"no .jpg images in {args.data}")
    backbone = load_model("vlm-xray-starter")
    ls = load_label_set("chestxray14")
    from vlm.prompt_classifier import text_classifier

    clf = text_classifier(backbone, ls)
    res = {"torch_threads": torch.get_num_threads(), "images": len(images), "labels_per_call": len(LABELS),
           "starter_s_per_image": time_methods(backbone, ls, images, clf),
           "vit_b16_s_per_image": vit_b16_timing(3),
           "memory": memory_over_calls(backbone, ls, images[0], clf, args.calls),
           "randomisation": randomisation(images, ls)}
    (HERE / "explain_results.json").write_text(json.dumps(res, indent=2))
    lines = ["# Heatmap cost and sanity (CPU)", "",
             f"Command: `python benchmarks/bench_explain.py --images {args.images} --calls {args.calls}` "
             f"({res['torch_threads']} torch threads; on a shared machine times are upper bounds).", "",
             f"Seconds per image for {len(LABELS)} labels ({', '.join(LABELS)}), original variant:", "",
             "| model | method | s / image |", "|---|---|---|"]
    lines += [f"| vlm-xray-starter (EdgeNeXt, 128 px) | {m} | {t:.3f} |" for m, t in res["starter_s_per_image"].items()]
    lines += [f"| open_clip ViT-B/16, 224 px (random weights) | {m} | {t:.3f} |"
              for m, t in res["vit_b16_s_per_image"].items()]
    mem = res["memory"]
    rnd = res["randomisation"]
    lines += ["", f"Memory: {mem['calls']} consecutive `explain` calls (Grad-CAM, starter): resident memory grew "
                  f"{mem['growth_mb']} MB (every 100 calls: {mem['growth_mb_every_100']} MB; start {mem['rss_start_mb']} MB).",
              "", f"Model randomisation (Adebayo et al.): mean Spearman {rnd['mean_spearman']} (max {rnd['max_spearman']}) "
                  f"between the starter's Grad-CAM maps and those with its image tower re-initialised, over "
                  f"{rnd['n_maps']} maps ({len(images)} nih14 images x {len(LABELS)} labels). Low = the maps depend on "
                  f"the trained weights.", ""]
    (HERE / "explain_results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
