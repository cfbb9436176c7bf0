#!/usr/bin/env bash
# HetLoRA in the fidelity study (issue 13, item 6): which part of its aggregation decides whether it
# learns? The study's HetLoRA tuning run (validation split, seed 0) at its chosen learning rate, with
# one thing changed at a time:
#   zeros_update     padding zeros (the paper), weights = samples x ||A'B' - AB|| (the round's change)
#   holders_adapter  padding holders (each rank component averaged over its holders), weights as the paper
#   uniform_ranks    every device at rank 8 (no rank heterogeneity: both paddings are then the plain mean)
# The other two corners are the study's own tuning runs: zeros + adapter (tune/<setting>/hetlora) and
# holders + update (hetlora_holders/tune/<setting>, the aggregation before 2026-11-29).
#
#   bash experiments/hetlora_padding_diagnosis.sh SETTING LR     # e.g. agnews_alpha0.1 0.003
# Resumable: a finished variant (summary.json) is skipped, an interrupted one resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
SETTING=${1:?usage: hetlora_padding_diagnosis.sh SETTING LR}
LR=${2:?usage: hetlora_padding_diagnosis.sh SETTING LR}
F=experiments/results/fidelity
BASE="$F/tune/$SETTING/hetlora/train.lr=${LR}_s0/config.yaml"
[ -f "$BASE" ] || { echo "no tuning run $BASE (run the study's tuning first)" >&2; exit 2; }
for variant in zeros_update holders_adapter uniform_ranks; do
  case $variant in
    zeros_update) extra=(--set algorithm.hetlora.padding=zeros --set algorithm.hetlora.sparsity=update) ;;
    holders_adapter) extra=(--set algorithm.hetlora.padding=holders --set algorithm.hetlora.sparsity=adapter) ;;
    uniform_ranks) extra=(--set "algorithm.hetlora.ranks=[8,8,8]") ;;
  esac
  out="$F/hetlora_diagnosis/$SETTING/$variant"
  if [ -f "$out/summary.json" ]; then echo "skip   $out"; continue; fi
  if [ -f "$out/config.yaml" ]; then echo "resume $out"; python -m hfl_jax resume "$out" --quiet; continue; fi
  echo "run    $out"
  python -m hfl_jax run "$BASE" --out "$out" --quiet --set name="diag_${SETTING}_hetlora_$variant" "${extra[@]}"
done
