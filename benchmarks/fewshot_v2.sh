#!/usr/bin/env bash
# Few-shot studies of the v2 starters (issue 10; results in benchmarks/fewshot.md): 1/4/16 shots,
# 3 seeds, every method, held-out = the model's pre-training validation patients (never trained
# on), scored one-vs-rest and within source; every adapter goes through the per-label never-worse
# guard (vlm.adapt.guard). Then the source-matched-shots variant (16 shots) and the tables.
# Run from the repo root (about 30-40 min on 2 CPU cores).
set -euo pipefail
D=../shared/data
OUT=${OUT:-benchmarks/fewshot-v2}
COMMON="--shots 1 4 16 --seeds 3 --holdout pretrain-val --method lora --method head-only --method linear-probe \
  --method tip-adapter --device cpu"
vlm-xray fewshot-study --model vlm-xray-starter-unseen --labels chest4 --data $D/chest4/labels.csv $COMMON \
  --out $OUT/unseen-chest4
python benchmarks/fewshot-v2/source_matched_shots.py --shots 16 --out $OUT/unseen-chest4-source-matched-shots
vlm-xray fewshot-study --model vlm-xray-starter --labels skin12 --data $D/skin/labels.csv $COMMON \
  --out $OUT/starter-skin12
CHEST="--col TUBERCULOSIS=auc:TUBERCULOSIS --col COVID19-within-COVID-QU=within:COVID19@covidqu"
python benchmarks/fewshot-v2/table.py $OUT/unseen-chest4 $CHEST
python benchmarks/fewshot-v2/table.py $OUT/unseen-chest4-source-matched-shots $CHEST
python benchmarks/fewshot-v2/table.py $OUT/starter-skin12
# guard strictness / unguarded adapters / source-matched shots (frozen-feature methods, a few minutes), and
# whether COVID-vs-normal within COVID-QU is learnable from the frozen features at all
python benchmarks/fewshot-v2/guard_settings.py
python benchmarks/fewshot-v2/within_source_probe.py
