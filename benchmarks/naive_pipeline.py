"""The naive notebook pipeline, the baseline of benchmarks/bench_perf.py (b). Written against the loaded
model directly, none of the engine: one image at a time, every variant its own forward pass, every prompt
re-encoded for every image, one report (HTML + JSON) per image and a findings.csv - the outputs a batch
writes. Same model, label set, variants and prompt styles as `vlm-xray batch --calibration none`.

    python benchmarks/naive_pipeline.py LIST.csv --variants original,clahe --out DIR
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from vlm.images import load_image
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.report import model_info, render_report
from vlm.results import Finding, ImageResult
from vlm.transforms import model_transform
from vlm.variants import get_variant


def encode_prompts(backbone, texts):
    e = backbone.encode_texts(list(texts))
    return torch.nn.functional.normalize(e.mean(0), dim=-1)


def score_image(backbone, label_set, path, variants, threshold):
    image = load_image(path)
    # every prompt of every label and style, encoded again for this image (as a notebook loop does)
    prompts = {(style, lab.name): (encode_prompts(backbone, lab.prompts[style].positive),
                                   encode_prompts(backbone, lab.prompts[style].negative))
               for style in label_set.styles() for lab in label_set.labels}
    per_variant, probs = {}, []
    for v in variants:
        x = model_transform(get_variant(v)(image.pixels), backbone.image_size, backbone.mean, backbone.std)
        emb = backbone.encode_images(x[None])[0]  # one forward pass per variant
        per_variant[v] = {}
        for style in label_set.styles():
            per_variant[v][style] = {}
            for lab in label_set.labels:
                pos, neg = prompts[(style, lab.name)]
                logits = backbone.logit_scale * torch.stack([emb @ pos, emb @ neg])
                p = float(logits.softmax(0)[0])
                per_variant[v][style][lab.name] = p
                probs.append((lab.name, p))
    findings = []
    for lab in label_set.labels:
        ps = torch.tensor([p for n, p in probs if n == lab.name], dtype=torch.float64)
        mean = float(ps.mean())
        findings.append(Finding(label=lab.name, probability=mean, uncertainty=float(ps.std(unbiased=False)),
                                positive=mean >= threshold, threshold=threshold, display=lab.display,
                                category=lab.category, severity=lab.severity))
    return ImageResult(image=str(path), image_id=image.id, model=backbone.name, label_set=label_set.name,
                       threshold=threshold, variants=list(variants), prompt_styles=label_set.styles(),
                       findings=findings, per_variant=per_variant, view=image.view, size=image.size)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("list_csv")
    ap.add_argument("--variants", default="original")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    backbone = load_model("vlm-xray-starter", device="cpu")
    backbone.module.eval()
    label_set = load_label_set("chestxray14")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(args.list_csv, newline="") as f:
        paths = [Path(args.list_csv).parent / r["filename"] for r in csv.DictReader(f)]
    with torch.no_grad():
        for path in paths:
            r = score_image(backbone, label_set, path, args.variants.split(","), args.threshold)
            (out / f"{r.image_id}.html").write_text(render_report(r, model_info(backbone)))
            (out / f"{r.image_id}.json").write_text(json.dumps(r.to_dict()))
            rows += [{"image": r.image, "label": f.label, "probability": f.probability} for f in r.findings]
    with open(out / "findings.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "label", "probability"])
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
