#!/usr/bin/env bash
# How the bundled v2 starters are made (issue 10): stage 2 on the v1 bodies, calibrations on the
# training patients, OOD statistics, within-source evaluation into the cards. Run from the repo root
# on an otherwise idle machine (about 25 min on 2 CPU cores):
#
#   V1=path/to/v1 bash benchmarks/make_starters.sh            (OUT=DIR: build there instead of the bundled folder)
#
# V1 holds the previous release's bundled folders vlm-xray-starter and vlm-xray-starter-unseen
# (stage 1, `vlm-xray pretrain`; e.g. `git worktree add /tmp/v1 4041823` and
# V1=/tmp/v1/vlm/models/bundled). Extra stage-2 options can be passed in STAGE2_OPTS.
set -euo pipefail
: "${V1:?set V1 to the folder holding the v1 vlm-xray-starter and vlm-xray-starter-unseen}"
D=../shared/data
B=${OUT:-vlm/models/bundled}
CACHE=${CACHE:-../models-v2/cache}
COMMON="--data $D/nih14 --data $D/chest4 --data $D/skin --train-only-data $D/nih14-lowres --cache-dir $CACHE ${STAGE2_OPTS:-}"

[ "$(realpath "$V1")" != "$(realpath $B)" ] || { echo "V1 must not be $B (it is replaced)"; exit 2; }
rm -rf "$B/vlm-xray-starter" "$B/vlm-xray-starter-unseen"  # no stale calibration / OOD files of v1
vlm-xray pretrain-stage2 --base "$V1/vlm-xray-starter" $COMMON --out "$B/vlm-xray-starter"
vlm-xray pretrain-stage2 --base "$V1/vlm-xray-starter-unseen" --withhold TUBERCULOSIS --withhold COVID19 $COMMON \
  --out "$B/vlm-xray-starter-unseen"

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
