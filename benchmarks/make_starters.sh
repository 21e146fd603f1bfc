#!/usr/bin/env bash
# How the bundled v2 starters are made (issue 10), on an otherwise idle machine (about 70 min on 2 CPU cores,
# 25 min when the stage-1b folders exist already):
#   1b. the v1 starters' bodies (128 px, from scratch) fine-tuned end-to-end at 192 px (progressive resizing),
#       10 epochs each into S1/s1-<model>-192 (skipped when that folder holds a finished run);
#   2.  stage 2 on those bodies (two transformer blocks over the 6x6 feature-map tokens);
#   then calibrations on the training patients, OOD statistics, shipped prompt embeddings and the
#   within-source evaluation into the cards.
#
#   V1=path/to/v1 bash benchmarks/make_starters.sh            (OUT=DIR: build there instead of the bundled folder)
#
# V1 holds the v1 release's bundled folders vlm-xray-starter and vlm-xray-starter-unseen (stage 1a,
# `vlm-xray pretrain` from scratch; e.g. `git worktree add /tmp/v1 4041823` and V1=/tmp/v1/vlm/models/bundled).
# Extra stage-2 options can be passed in STAGE2_OPTS.
set -euo pipefail
: "${V1:?set V1 to the folder holding the v1 vlm-xray-starter and vlm-xray-starter-unseen}"
D=../shared/data
B=${OUT:-vlm/models/bundled}
CACHE=${CACHE:-../models-v2/cache}
COMMON="--data $D/nih14 --data $D/chest4 --data $D/skin --train-only-data $D/nih14-lowres --cache-dir $CACHE ${STAGE2_OPTS:-}"

S1=${S1:-../models-v2/s1}
WITHHELD="--withhold TUBERCULOSIS --withhold COVID19"

[ "$(realpath "$V1")" != "$(realpath $B)" ] || { echo "V1 must not be $B (it is replaced)"; exit 2; }
for m in vlm-xray-starter vlm-xray-starter-unseen; do
  w=""; [ $m = vlm-xray-starter ] || w=$WITHHELD
  [ -f "$S1/s1-$m-192/metrics.json" ] || vlm-xray pretrain --data $D/nih14 --data $D/chest4 --data $D/skin $w \
    --init-from "$V1/$m" --image-tower edgenext_xx_small --image-size 192 --epochs 10 --batch-size 128 --lr 1e-3 \
    --seed 0 --prompt-weight 0 --cache-dir $CACHE --no-progress --resume --out "$S1/s1-$m-192"
done
rm -rf "$B/vlm-xray-starter" "$B/vlm-xray-starter-unseen"  # no stale calibration / OOD files of an earlier build
vlm-xray pretrain-stage2 --base "$S1/s1-vlm-xray-starter-192" $COMMON --out "$B/vlm-xray-starter"
vlm-xray pretrain-stage2 --base "$S1/s1-vlm-xray-starter-unseen-192" $WITHHELD $COMMON --out "$B/vlm-xray-starter-unseen"

# calibrations on the models' TRAINING patients (their validation patients stay clean for reporting)
for m in vlm-xray-starter vlm-xray-starter-unseen; do
  vlm-xray calibrate --model $B/$m --labels chestxray14 --data $D/nih14/labels.csv --group-split 0.15:train \
    --calibration none --out $B/$m/calibration-chestxray14.json
done
vlm-xray calibrate --model $B/vlm-xray-starter --labels chest4 --data $D/chest4/labels.csv --group-split 0.15:train \
  --calibration none --out $B/vlm-xray-starter/calibration-chest4.json
vlm-xray calibrate --model $B/vlm-xray-starter --labels skin12 --data $D/skin/labels.csv --group-split 0.15:train \
  --calibration none --out $B/vlm-xray-starter/calibration-skin12.json

for m in vlm-xray-starter vlm-xray-starter-unseen; do
  python -m vlm.ood fit --model $B/$m --domain chest=chestxray14,chest4 --data chest=$D/nih14 --data chest=$D/chest4 \
    --domain skin=skin12 --data skin=$D/skin --out $B/$m
done
python -m vlm.text_cache ship $B/vlm-xray-starter --labels chestxray14,chest4,skin12
python -m vlm.text_cache ship $B/vlm-xray-starter-unseen --labels chestxray14,chest4
python benchmarks/within_source.py --model $B/vlm-xray-starter --name vlm-xray-starter \
  --model $B/vlm-xray-starter-unseen --name vlm-xray-starter-unseen --write-card
