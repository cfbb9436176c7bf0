#!/usr/bin/env bash
# Paper-scale group round on one GPU: 80 devices, RoBERTa-base shape, T=128, B=8, E=2, depth 12 and 1.
# Vmapped round vs a Python loop of the jitted single-device step (torch is CPU-only here and skipped).
# Budget: under five minutes on one H100/H200. Output goes to $OUT (if set) as round_speed_d*.{txt,json}.
#
#   bash benchmarks/gpu_check.sh            # prints to stdout (and $OUT/ if set)
#   CHUNK=40 bash benchmarks/gpu_check.sh   # vmap 40 devices at a time inside the same call (less memory)
#
# Needs a CUDA-enabled jax, e.g.  pip install -U "jax[cuda12]"
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-}"
[ -n "$OUT_DIR" ] && mkdir -p "$OUT_DIR"
log() { if [ -n "$OUT_DIR" ]; then tee -a "$OUT_DIR/gpu_check.log"; else cat; fi; }

{
  echo "# gpu_check $(date -Iseconds) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "# nvidia-smi not found"
} | log

if ! python3 - <<'PY' 2>&1 | log
import sys
import jax
print("jax", jax.__version__, "devices:", jax.devices())
if jax.default_backend() != "gpu":
    sys.exit("no GPU visible to JAX (backend %r). Install a CUDA build: pip install -U 'jax[cuda12]'"
             % jax.default_backend())
PY
then
  echo "gpu_check: stopping, no GPU" >&2
  exit 2
fi

CHUNK_FLAG=()
[ -n "${CHUNK:-}" ] && CHUNK_FLAG=(--chunk-size "$CHUNK")
REPEATS="${REPEATS:-3}"
for d in 12 1; do
  json_flag=()
  [ -n "$OUT_DIR" ] && json_flag=(--json "$OUT_DIR/round_speed_d$d.json")
  # each configuration gets at most 140 s (compile + 1 warm-up + $REPEATS timed rounds, both methods)
  timeout 140 python3 benchmarks/round_speed.py --model roberta-base-shape -M 80 -B 8 -T 128 -E 2 -d "$d" \
    --methods vmap,loop -n "$REPEATS" --peak-size 8192 "${CHUNK_FLAG[@]}" "${json_flag[@]}" 2>&1 | log \
    || echo "gpu_check: depth $d failed or timed out (rc ${PIPESTATUS[0]})" | log
done
