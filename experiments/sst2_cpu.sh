#!/usr/bin/env bash
# Regenerates experiments/results/sst2_cpu/ (issue 7): learning-rate search, then every method at
# Dirichlet alpha 0.1 and 1.0 with seeds 0 and 1, then the report tables and plots.
# Run from the project root:  bash experiments/sst2_cpu.sh   (wall times are logged in timing.log)
set -euo pipefail
OUT=experiments/results/sst2_cpu
CFG=experiments/configs/sst2_cpu
mkdir -p "$OUT/lr_search" "$OUT/runs"
TIMING_LOG="$OUT/timing.log"
source experiments/common.sh

# 1. Learning-rate search: the same three values for each main method, alpha 0.1, seed 0, 6 rounds.
#    Ablations reuse HierFedLoRA's choice. Criterion: best validation accuracy within the 6 rounds (ties: lower final loss).
for m in hierfedlora fedlora hetlora; do
  for lr in 0.0003 0.001 0.003; do
    run "$OUT/lr_search/${m}_lr$lr" "$CFG/$m.yaml" --set train.lr=$lr --set train.rounds=6
  done
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
best = {}
for m in ("hierfedlora", "fedlora", "hetlora"):
    summaries = {float(p.name.split("_lr")[1]): json.loads((p / "summary.json").read_text())
                 for p in (out / "lr_search").glob(f"{m}_lr*")}
    scores = {lr: (s["best_accuracy"], -s["final_loss"]) for lr, s in summaries.items()}
    best[m] = max(sorted(scores), key=lambda lr: scores[lr])
    print(m, scores, "->", best[m])
for m in ("hierfedlora_random_groups", "hierfedlora_fixed"):
    best[m] = best["hierfedlora"]
(out / "lr.json").write_text(json.dumps(best, indent=1))
PY

# 2. Main runs.
#    Order: the three main methods first (both alphas, both seeds), then the two ablations.
main() {  # main METHOD ALPHA SEED
  local lr; lr=$(python3 -c "import json; print(json.load(open('$OUT/lr.json'))['$1'])")
  run "$OUT/runs/alpha$2/${1}_s$3" "$CFG/$1.yaml" --set partition.alpha=$2 --set seed=$3 --set train.lr=$lr
}
for alpha in 0.1 1.0; do for seed in 0 1; do for m in hierfedlora fedlora hetlora; do
  main $m $alpha $seed; done; done; done
for alpha in 0.1 1.0; do for seed in 0 1; do for m in hierfedlora_random_groups hierfedlora_fixed; do
  main $m $alpha $seed; done; done; done

# 3. Tables and plots (one per alpha; default target and 0.70), and the time/traffic breakdown.
for alpha in 0.1 1.0; do
  python3 -m hfl_jax report "$OUT"/runs/alpha$alpha/* --out "$OUT/plots_alpha$alpha" > "$OUT/report_alpha$alpha.md"
  python3 -m hfl_jax report "$OUT"/runs/alpha$alpha/* --target 0.7 --out "$OUT/plots_alpha${alpha}_target0.7" \
    > "$OUT/report_alpha${alpha}_target0.7.md"
done
python3 experiments/analyze_sst2_cpu.py "$OUT/runs" > "$OUT/analysis.md"

# 4. Follow-ups (each resumable on its own): HetLoRA with one mechanism changed at a time, and a
#    twice-as-large HierFedLoRA vs FedLoRA check at both alphas.
bash experiments/hetlora_diagnosis.sh
bash experiments/sst2_cpu_scale.sh
log "all done"
