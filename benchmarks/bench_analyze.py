"""Throughput of the scoring path behind `vlm-xray analyze`, and proof that a repeated run does
no text-encoder work.

    python benchmarks/bench_analyze.py --images '../shared/data/nih14/*.jpg' --limit 200

Run 1 uses an empty cache folder (text embeddings computed), run 2 the same folder (text
embeddings read from disk). Image embeddings are NOT cached here (analyze does not cache
them), so both runs pay the full image cost. Prints a Markdown table; results are kept in
benchmarks/analyze.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

from vlm.images import find_images
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.scoring import Scorer
from vlm.text_cache import TextEmbeddingCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="../shared/data/nih14/*.jpg")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--model", default=None)
    ap.add_argument("--labels", default="chestxray14")
    ap.add_argument("--variants", default="original,clahe,equalize,gamma,hflip")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    paths = find_images([args.images])[: args.limit]
    if not paths:
        sys.exit(f"no images match {args.images}")
    backbone = load_model(args.model, device=args.device)
    ls = load_label_set(args.labels)
    cache_dir = tempfile.mkdtemp(prefix="vlm-bench-text-")
    rows = []
    for run in (1, 2):
        cache = TextEmbeddingCache(cache_dir)
        t0 = time.perf_counter()
        scorer = Scorer(backbone, ls, variants=args.variants, batch_size=args.batch_size, text_cache=cache)
        t_text = time.perf_counter() - t0
        n_ok = sum(1 for r in scorer.score(paths, 0.5) if hasattr(r, "findings"))
        total = time.perf_counter() - t0
        rows.append((run, cache.encoded, cache.hits, t_text, n_ok, total, n_ok / total))
    print(f"model {backbone.name} ({backbone.layout}), {len(paths)} images x {len(scorer.variants)} variants, "
          f"{len(scorer.styles)} prompt styles, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}\n")
    print("| run | texts encoded | texts from cache | text time (s) | images | total (s) | images/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]} | {r[5]:.1f} | {r[6]:.1f} |")


if __name__ == "__main__":
    main()
