#!/usr/bin/env bash
# Issue 16's accelerator bar, prepared for a session that is lent one H100/H200 (never run on a CPU
# machine: ALLOW_CPU=1 with SMALL=1 is a dry run). The paper-shaped HierFedLoRA run of
# experiments/configs/paper/roberta_base_sst2.yaml (80 devices in 8 groups, E=10, B=16, T=128,
# depths 1/2/4/8/12, taus 1-4) on a random encoder of RoBERTa-base's shape (12 layers, 768 wide, BERT
# layout, the packaged tokenizer: no download), SST-2 from DATA, cold XLA cache:
#   - time to the end of round 1 = the whole command with train.rounds=1 (bar: at most 90 s);
#   - a 4-round run's per-round wall times (later rounds compile nothing: no round far above the rest);
# for train.depth_program per_depth (one program per depth) and shared (one for every depth).
#
#   DATA=/path/to/glue bash benchmarks/first_round_gpu.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/first_round_gpu_$(date -u +%Y-%m-%d)}
DATA=${DATA:-$(cd .. && pwd)/shared/data/glue}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
python -c "import jax; print(jax.devices())" | tee "$OUT/devices.txt"
if ! python -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" && [ "${ALLOW_CPU:-0}" != 1 ]; then
  echo "no accelerator: JAX sees only the CPU (ALLOW_CPU=1 SMALL=1 for a dry run)"; exit 2
fi
SHAPE=(--set model.name=tiny --set model.tiny.hidden_size=768 --set model.tiny.num_layers=12
       --set model.tiny.num_heads=12 --set model.tiny.intermediate_size=3072)
if [ "${SMALL:-0}" = 1 ]; then   # dry run: a small encoder, 8 devices in 2 groups, short sequences
  SHAPE=(--set model.name=tiny --set model.tiny.num_layers=2 --set partition.num_devices=8
         --set algorithm.num_groups=2 --set algorithm.depths=[1,2] --set data.max_length=16
         --set data.train_subset=400 --set data.eval_subset=64 --set train.local_steps=2)
fi
CONFIG=experiments/configs/paper/roberta_base_sst2.yaml
for program in per_depth shared; do
  for rounds in 1 4; do
    dir="$OUT/run_${program}_${rounds}"
    rm -rf "$dir"
    t0=$(date +%s.%N)
    HFL_JAX_CACHE=off HFL_CACHE_DIR=$(mktemp -d) python -m hfl_jax run "$CONFIG" "${SHAPE[@]}" \
      --set train.rounds=$rounds --set train.eval_every=1 --set data.data_dir="$DATA" \
      --set train.depth_program=$program --out "$dir" --quiet --no-plots > "$dir.log" 2>&1
    t1=$(date +%s.%N)
    python - "$dir" "$program" "$rounds" "$t0" "$t1" <<'PY' | tee -a "$OUT/first_round_gpu.txt"
import json, sys
d, program, rounds, t0, t1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
recs = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
walls = ", ".join(f"{r['wall_time']:.1f}" for r in recs)
depths = [sorted({g["depth"] for g in r["groups"] if not g.get("skipped")}) for r in recs]
print(f"{program:9s} rounds={rounds}: whole command {t1 - t0:.1f} s; per-round wall s [{walls}]; depths {depths}")
PY
  done
done
