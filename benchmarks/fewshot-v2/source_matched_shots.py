"""Does a source-matched training signal move COVID19 within COVID-QU? The 16-shot study of
`vlm-xray-starter-unseen` on chest4 with shots from `vlm.adapt.guard.source_matched_sample`: K per
class plus, for each label, same-source negatives until each source of its positives holds K
(COVID19: K COVID-QU normals; PNEUMONIA: K Kermany normals), everything else as in
benchmarks/fewshot_v2.sh. Run from the repo root; compare with benchmarks/fewshot-v2/unseen-chest4.

    python benchmarks/fewshot-v2/source_matched_shots.py [--shots 16] [--out DIR]
"""
from __future__ import annotations

import argparse
import logging
import sys

from vlm.adapt.study import run_study
from vlm.data import load_labelled_csv
from vlm.labels import load_label_set
from vlm.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, nargs="+", default=[16])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--data", default="../shared/data/chest4/labels.csv")
    ap.add_argument("--out", default="benchmarks/fewshot-v2/unseen-chest4-source-matched-shots")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backbone = load_model("vlm-xray-starter-unseen", device="cpu")
    ls = load_label_set("chest4")
    run_study(backbone, ls, load_labelled_csv(args.data, ls), None, shots=args.shots, seeds=args.seeds,
              methods=["lora", "head-only", "linear-probe", "tip-adapter"], out_dir=args.out,
              holdout="pretrain-val", source_matched_shots=True, command=" ".join(["python"] + sys.argv))


if __name__ == "__main__":
    main()
