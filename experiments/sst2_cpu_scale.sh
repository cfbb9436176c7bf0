#!/usr/bin/env bash
# Scale check for the SST-2 CPU study (issue 7): HierFedLoRA vs FedLoRA at twice the devices, twice
# the data and twice the rounds of the main study (32 devices, 16,000 sentences, 8 groups, 30 rounds),
# Dirichlet alpha 0.1 and 1.0, seed 0, the searched learning rates (lr.json).
# Everything else as experiments/configs/sst2_cpu/base.yaml. Resumable. ~45 min on 2 cores.
set -euo pipefail
OUT=experiments/results/sst2_cpu
CFG=experiments/configs/sst2_cpu
D="$OUT/scale32"
mkdir -p "$D"
TIMING_LOG="$OUT/timing.log"
source experiments/common.sh
for alpha in 0.1 1.0; do
  for m in hierfedlora fedlora; do
    lr=$(python3 -c "import json; print(json.load(open('$OUT/lr.json'))['$m'])")
    run "$D/alpha$alpha/${m}_s0" "$CFG/$m.yaml" --set partition.num_devices=32 --set data.train_subset=16000 \
      --set algorithm.num_groups=8 --set train.rounds=30 --set partition.alpha=$alpha --set seed=0 \
      --set train.lr=$lr --set name=sst2_cpu32_$m
  done
  python3 -m hfl_jax report "$D/alpha$alpha"/* --out "$D/plots_alpha$alpha" > "$D/report_alpha$alpha.md"
  python3 -m hfl_jax report "$D/alpha$alpha"/* --target 0.7 --out "$D/plots_alpha${alpha}_target0.7" \
    > "$D/report_alpha${alpha}_target0.7.md"
done
python3 experiments/analyze_sst2_cpu.py "$D" > "$D/analysis.md"
log "scale check done"
