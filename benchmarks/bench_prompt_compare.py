"""Benchmark: `prompts compare` encodes each image once, whatever the number of prompt styles.

Counts real image-encoder work (images through `Backbone.encode_images`) and wall time for
  1. prompts compare, 2 styles, cold image cache (every image encoded once, for all styles),
  2. prompts compare again with another style set + a prompt file, warm cache (no image encoding),
  3. the naive way: one `Scorer` per style with no image cache (every style re-encodes every image).

    python benchmarks/bench_prompt_compare.py                       # tiny random model, generated images
    python benchmarks/bench_prompt_compare.py --model vlm-xray-starter \\
        --data ../shared/data/nih14/labels.csv --limit 300            # real model and data

Prints a markdown report (saved as benchmarks/prompt_compare.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def tiny_model_dir(d: Path) -> str:
    from safetensors.torch import save_file

    from conftest import TINY_CLIP_CFG, tiny_open_clip

    d.mkdir(parents=True, exist_ok=True)
    (d / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3, "size": 32}}))
    save_file({k: v.contiguous() for k, v in tiny_open_clip().state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return str(d)


def generated_csv(d: Path, n: int) -> Path:
    from test_evaluate import make_labelled

    return make_labelled(d, n=n)


class CountingBackbone:
    """Counts images (tensors / variants) that go through the image encoder."""

    def __init__(self, backbone, n_variants: int):
        self.backbone, self.n_variants, self.tensors = backbone, n_variants, 0
        self._orig = backbone.encode_images

        def counted(x):
            self.tensors += len(x)
            return self._orig(x)

        backbone.encode_images = counted

    @property
    def images(self) -> float:
        return self.tensors / self.n_variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model name/path (default: a tiny random open_clip model)")
    ap.add_argument("--data", default=None, help="labelled CSV (default: generated images)")
    ap.add_argument("--limit", type=int, default=200, help="use the first N rows / generate N images")
    ap.add_argument("--labels", default="chestxray14")
    ap.add_argument("--variants", default="original,clahe,equalize,gamma,hflip")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_prompt_compare_"))
    os.environ["VLM_XRAY_CACHE"] = str(tmp / "cache")  # cold caches, nothing shared with other runs
    from vlm.data import load_labelled_csv
    from vlm.labels import load_label_set
    from vlm.models import load_model
    from vlm.prompt_experiments import compare_prompts
    from vlm.scoring import ImageEmbeddingCache, Scorer
    from vlm.text_cache import TextEmbeddingCache
    from vlm.variants import resolve_variants

    model = args.model or tiny_model_dir(tmp / "tiny")
    csv_path = Path(args.data) if args.data else generated_csv(tmp / "data", args.limit)
    ls = load_label_set(args.labels)
    data = load_labelled_csv(csv_path, ls)
    data = data.subset(range(min(args.limit, len(data))))
    variants = resolve_variants(args.variants)
    backbone = load_model(model, device="cpu")
    counter = CountingBackbone(backbone, len(variants))
    prompt_file = tmp / "terse.yaml"
    prompt_file.write_text("prompt_styles: {terse: one word}\nlabels:\n" + "".join(
        f"  - name: {n}\n    prompts:\n      terse: {{positive: [\"{n.lower()}\"], negative: [\"normal\"]}}\n"
        for n in ls.names))
    rows = []

    def run(label, fn):
        counter.tensors = 0
        t0 = time.perf_counter()
        out = fn()
        rows.append((label, counter.images, time.perf_counter() - t0, out))
        return out

    styles = list(ls.prompt_styles)[:2]
    cache = ImageEmbeddingCache()
    r1 = run(f"compare {' + '.join(styles)}, cold cache",
             lambda: compare_prompts(backbone, ls, data, styles, variants=variants, image_cache=cache,
                                     text_cache=TextEmbeddingCache()))
    cache2 = ImageEmbeddingCache()
    r2 = run(f"compare {styles[-1]} + prompt file, warm cache",
             lambda: compare_prompts(backbone, ls, data, styles[-1:], [prompt_file], variants=variants,
                                     image_cache=cache2, text_cache=TextEmbeddingCache()))

    def naive():
        for s in styles:
            sc = Scorer(backbone, ls, [s], variants, text_cache=TextEmbeddingCache())
            list(sc.score(data.paths, 0.5))
        return None

    run(f"naive: one Scorer per style ({len(styles)}), no image cache", naive)

    print("# `prompts compare`: image embeddings computed once\n")
    print(f"`python benchmarks/bench_prompt_compare.py {' '.join(sys.argv[1:])}`".rstrip() + "\n")
    print(f"- model: `{backbone.name}` ({'tiny random open_clip, 32 px' if not args.model else model}); "
          f"data: {len(data)} images from `{csv_path if args.data else 'generated 48 px PNGs'}`; "
          f"label set {ls.name}; variants: {', '.join(variants)}")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared), "
          f"torch threads {__import__('torch').get_num_threads()}, CPU only\n")
    print("| run | images through the image encoder | log line | wall s |")
    print("|---|---:|---|---:|")
    for label, imgs, secs, out in rows:
        line = out["cache_line"] if out else "-"
        print(f"| {label} | {imgs:.0f} | `{line}` | {secs:.1f} |")
    print()
    print(f"- cold run: {r1['seconds']['images']:.1f} s for images, {r1['seconds']['text_and_scoring']:.2f} s for "
          f"all prompt styles and {len(r1['ranking'])} candidates ({r1['texts_encoded']} prompt texts encoded).")
    print(f"- warm run: {r2['seconds']['images']:.1f} s reading {len(data)} cached embeddings "
          f"(file hashing + .npz reads), {r2['seconds']['text_and_scoring']:.2f} s for prompts.")
    print(f"- naive: {len(styles)} x {len(data)} = {len(styles) * len(data)} images encoded for {len(styles)} styles.")
    best = r1["ranking"][0]
    print(f"- best candidate in the cold run: {best['candidate']} (mean AUC "
          f"{best['mean_auc'] if best['mean_auc'] is None else round(best['mean_auc'], 3)})")
    assert rows[0][1] == len(data) and rows[1][1] == 0 and rows[2][1] == len(styles) * len(data)
    assert np.isfinite(best["mean_auc"] or 0)


if __name__ == "__main__":
    main()
