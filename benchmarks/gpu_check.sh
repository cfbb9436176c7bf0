#!/usr/bin/env bash
# Paper-scale group round on one GPU: 80 devices, RoBERTa-base shape, T=128, B=8, E=2.
# Timed configurations, each in one round_speed.py process with its own time limit:
#   1. full depth (12), float32: vmapped round vs Python loop of the jitted single-device step
#      vs PyTorch + PEFT loop (on the GPU when torch sees one; skipped when torch/peft are missing)
#   2. depth 1 of 12, float32: vmapped round, without and with the frozen-layer cache
#   3. (BF16=1 only) full depth, bfloat16 frozen matmuls (model.compute_dtype): vmapped round
# Budget: measured on one H200 (2026-11-27, benchmarks/RESULTS.md): 1. 141 s, 2. 76 s, 3. 89 s, most of it
# XLA compilation (60 s for the full-depth vmapped round); the default (1+2) takes about 4 minutes.
# Output: stdout, and $OUT/gpu_check.log + $OUT/round_speed_*.json when $OUT is set.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA jax
#   CHUNK=40 bash benchmarks/gpu_check.sh   # vmap 40 devices at a time inside the same call (less memory)
#   BF16=1 bash benchmarks/gpu_check.sh     # also the bfloat16 configuration (~1.5 min more)
#   MODEL=tiny M=2 T=16 B=2 ALLOW_CPU=1 bash benchmarks/gpu_check.sh   # dry run of the script on a CPU
#
# Needs a CUDA-enabled jax, e.g.  pip install -U "jax[cuda12]"
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="${MODEL:-roberta-base-shape}"
M="${M:-80}"
B="${B:-8}"
T="${T:-128}"
E="${E:-2}"
REPEATS="${REPEATS:-2}"
PEAK="${PEAK:-8192}"
OUT_DIR="${OUT:-}"
[ -n "$OUT_DIR" ] && mkdir -p "$OUT_DIR"
log() { if [ -n "$OUT_DIR" ]; then tee -a "$OUT_DIR/gpu_check.log"; else cat; fi; }

{
  echo "# gpu_check $(date -Iseconds) on $(hostname): $MODEL M=$M B=$B T=$T E=$E"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "# nvidia-smi not found"
} | log

if ! ALLOW_CPU="${ALLOW_CPU:-}" python3 - <<'PY' 2>&1 | log
import os
import sys
import jax
print("jax", jax.__version__, "devices:", jax.devices())
if jax.default_backend() != "gpu" and not os.environ.get("ALLOW_CPU"):
    sys.exit("no GPU visible to JAX (backend %r). Install a CUDA build: pip install -U 'jax[cuda12]'"
             % jax.default_backend())
PY
then
  echo "gpu_check: stopping, no GPU" >&2
  exit 2
fi

CHUNK_FLAG=()
[ -n "${CHUNK:-}" ] && CHUNK_FLAG=(--chunk-size "$CHUNK")
FAILED=0
bench() {  # bench NAME LIMIT_S ARGS...
  local name="$1" limit="$2"
  shift 2
  local json_flag=()
  [ -n "$OUT_DIR" ] && json_flag=(--json "$OUT_DIR/round_speed_$name.json")
  echo "## $name: round_speed.py $*" | log
  timeout "$limit" python3 benchmarks/round_speed.py --model "$MODEL" -M "$M" -B "$B" -T "$T" -E "$E" \
    -n "$REPEATS" --peak-size "$PEAK" "${CHUNK_FLAG[@]}" "${json_flag[@]}" "$@" 2>&1 | log \
    || { echo "gpu_check: $name failed or timed out after ${limit}s (rc ${PIPESTATUS[0]})" | log; FAILED=1; }
}
export PYTHONUNBUFFERED=1
bench full_f32 210 --methods vmap,loop,torch
bench depth1_cache 120 --methods vmap -d 1 --cache-frozen
[ -n "${BF16:-}" ] && bench full_bf16 120 --methods vmap --compute-dtype bfloat16
exit "$FAILED"
