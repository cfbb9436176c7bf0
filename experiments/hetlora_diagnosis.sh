#!/usr/bin/env bash
# Why HetLoRA diverges in the SST-2 CPU study (issue 7): the same runs as the study's HetLoRA
# (lr from lr.json, seed 0, both alphas) with one mechanism changed at a time:
#   sparsity_none     aggregation weights = sample counts (no sparsity weighting)
#   sparsity_adapter  weights = samples x ||A'B'||_F of the whole adapter (instead of the round's change)
#   uniform_ranks     every device at rank 8 (no rank heterogeneity; sparsity weights as in the study)
# Called by experiments/sst2_cpu.sh after the main runs; resumable like it.
set -euo pipefail
OUT=experiments/results/sst2_cpu
CFG=experiments/configs/sst2_cpu
D="$OUT/hetlora_diagnosis"
mkdir -p "$D"
TIMING_LOG="$OUT/timing.log"
source experiments/common.sh
lr=$(python3 -c "import json; print(json.load(open('$OUT/lr.json'))['hetlora'])")
for alpha in 0.1 1.0; do
  for variant in sparsity_none sparsity_adapter uniform_ranks; do
    case $variant in
      sparsity_none) extra=(--set algorithm.hetlora.sparsity=none) ;;
      sparsity_adapter) extra=(--set algorithm.hetlora.sparsity=adapter) ;;
      uniform_ranks) extra=(--set "algorithm.hetlora.ranks=[8,8,8]") ;;
    esac
    run "$D/alpha$alpha/hetlora_${variant}_s0" "$CFG/hetlora.yaml" --set partition.alpha=$alpha --set seed=0 \
      --set train.lr=$lr --set name=sst2_cpu_hetlora_$variant "${extra[@]}"
  done
  python3 -m hfl_jax report "$OUT/runs/alpha$alpha/hetlora_s0" "$OUT/runs/alpha$alpha/fedlora_s0" "$D/alpha$alpha"/* \
    --out "$D/plots_alpha$alpha" > "$D/report_alpha$alpha.md"
done
log "hetlora diagnosis done"
