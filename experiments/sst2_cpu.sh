#!/usr/bin/env bash
# Regenerates experiments/results/sst2_cpu/ (issue 7): learning-rate search, then every method at
# Dirichlet alpha 0.1 and 1.0 with seeds 0 and 1, then the report tables and plots.
# Run from the project root:  bash experiments/sst2_cpu.sh   (wall times are logged in timing.log)
set -euo pipefail
OUT=experiments/results/sst2_cpu
CFG=experiments/configs/sst2_cpu
mkdir -p "$OUT/lr_search" "$OUT/runs"
log() { echo "$(date -u +%FT%TZ) $*" | tee -a "$OUT/timing.log"; }
run() {  # run OUTDIR CONFIG [--set ...]
  local dir=$1; shift
  if [ -f "$dir/summary.json" ]; then log "skip $dir (done)"; return; fi
  if [ -d "$dir/checkpoints" ]; then hfl-jax resume "$dir" --quiet >/dev/null; else
    local start=$SECONDS; hfl-jax run "$@" --out "$dir" --quiet >/dev/null; fi
  log "done $dir"
}

# 1. Learning-rate search: the same three values for each main method, alpha 0.1, seed 0, 9 rounds.
#    Ablations reuse HierFedLoRA's choice. Criterion: best validation accuracy within the 9 rounds.
for m in hierfedlora fedlora hetlora; do
  for lr in 0.0003 0.001 0.003; do
    run "$OUT/lr_search/${m}_lr$lr" "$CFG/$m.yaml" --set train.lr=$lr --set train.rounds=9
  done
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
best = {}
for m in ("hierfedlora", "fedlora", "hetlora"):
    scores = {float(p.name.split("_lr")[1]): json.loads((p / "summary.json").read_text())["best_accuracy"]
              for p in (out / "lr_search").glob(f"{m}_lr*")}
    best[m] = max(sorted(scores), key=lambda lr: scores[lr])
    print(m, scores, "->", best[m])
for m in ("hierfedlora_random_groups", "hierfedlora_fixed"):
    best[m] = best["hierfedlora"]
(out / "lr.json").write_text(json.dumps(best, indent=1))
PY

# 2. Main runs.
for alpha in 0.1 1.0; do
  for m in hierfedlora fedlora hetlora hierfedlora_random_groups hierfedlora_fixed; do
    lr=$(python3 -c "import json; print(json.load(open('$OUT/lr.json'))['$m'])")
    for seed in 0 1; do
      run "$OUT/runs/alpha$alpha/${m}_s$seed" "$CFG/$m.yaml" --set partition.alpha=$alpha --set seed=$seed \
        --set train.lr=$lr
    done
  done
done

# 3. Tables and plots (one per alpha).
for alpha in 0.1 1.0; do
  hfl-jax report "$OUT"/runs/alpha$alpha/* --out "$OUT/plots_alpha$alpha" > "$OUT/report_alpha$alpha.md"
done
log "all done"
