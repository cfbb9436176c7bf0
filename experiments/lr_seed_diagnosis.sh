#!/usr/bin/env bash
# Is the fidelity study's learning-rate choice robust to the tuning seed? (issue 13, follow-up)
# The study tunes on seed 0 only; on AG News it chose 3e-4 for HierFedLoRA (the grid's lowest) and 1e-3
# for FedLoRA. This reruns a method's tuning runs at those two learning rates with seeds 1 and 2 (another
# partition and training randomness; the same validation split, never the test set).
#
#   bash experiments/lr_seed_diagnosis.sh SETTING METHOD    # e.g. agnews_alpha0.1 hierfedlora
# Runs go to experiments/results/fidelity/lr_seed_diagnosis/SETTING/METHOD/train.lr=LR_sSEED.
# Resumable: a finished run (summary.json) is skipped, an interrupted one resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
SETTING=${1:?usage: lr_seed_diagnosis.sh SETTING METHOD}
METHOD=${2:?usage: lr_seed_diagnosis.sh SETTING METHOD}
F=experiments/results/fidelity
TIMING_LOG=$F/lr_seed_diagnosis/timing.log
mkdir -p "$(dirname "$TIMING_LOG")"
source experiments/common.sh
for seed in 1 2; do
  for lr in 0.0003 0.001; do
    base="$F/tune/$SETTING/$METHOD/train.lr=${lr}_s0/config.yaml"
    [ -f "$base" ] || { echo "no tuning run $base (run the study's tuning first)" >&2; exit 2; }
    run "$F/lr_seed_diagnosis/$SETTING/$METHOD/train.lr=${lr}_s$seed" "$base" --no-plots --set seed=$seed \
      --set name="diag_${SETTING}_${METHOD}_lr${lr}_s$seed"
  done
done
