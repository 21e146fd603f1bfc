#!/usr/bin/env bash
# Few-shot studies of the v2 starters (issue 10; results in benchmarks/fewshot.md): 1/4/16 shots,
# 3 seeds, every method, held-out = the model's pre-training validation patients (never trained
# on), scored one-vs-rest and within source. Run from the repo root (about 30 min on 2 CPU cores).
set -euo pipefail
D=../shared/data
OUT=${OUT:-benchmarks/fewshot-v2}
COMMON="--shots 1 4 16 --seeds 3 --holdout pretrain-val --method lora --method head-only --method linear-probe \
  --method tip-adapter --device cpu"
vlm-xray fewshot-study --model vlm-xray-starter-unseen --labels chest4 --data $D/chest4/labels.csv $COMMON \
  --out $OUT/unseen-chest4
vlm-xray fewshot-study --model vlm-xray-starter --labels skin12 --data $D/skin/labels.csv $COMMON \
  --out $OUT/starter-skin12
