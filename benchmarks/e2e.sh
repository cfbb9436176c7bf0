#!/usr/bin/env bash
# Whole commands side by side: `hfl-jax run` (cold caches, then warm) vs the PyTorch + PEFT FedAvg
# loop (benchmarks/e2e_peft.py) on the same experiment, same machine, one after another, with the
# load and both frameworks' matmul peaks (float32 and bf16) printed before and after. Writes results under $OUT.
#
#   bash benchmarks/e2e.sh [CONFIG] [OUT] [extra --set overrides for both ...]
#   default: the SST-2 FedLoRA study config at Dirichlet alpha 1.0, benchmarks/results/e2e_<date>
#
# cold: empty token ($HFL_CACHE_DIR) and XLA ($HFL_JAX_CACHE) caches, so tokenization and every
# compilation are paid (the run fills both, as a first run does); warm: the same command again
# (WARM=0 skips it). Repeat the script for more pairs; `e2e_report.py DIR...` gives the paired ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-experiments/configs/sst2_cpu/fedlora.yaml}
OUT=${2:-benchmarks/results/e2e_$(date -u +%Y-%m-%d)}
shift $(( $# > 2 ? 2 : $# )) || true
SETS=(--set partition.alpha=1.0)
for s in "$@"; do SETS+=(--set "$s"); done
mkdir -p "$OUT"
LOG="$OUT/e2e.log"
TMP=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

peaks() {   # one line: load and the matmul peaks of JAX and PyTorch, float32 and bf16 (GFLOP/s, 1024^3, best of 5)
  python - <<'EOF'
import os, time
import jax, jax.numpy as jnp, torch
torch.set_num_threads(os.cpu_count())
n = 1024

def peak(call):   # GFLOP/s of the best of 5 calls, after one warm-up call
    call()
    best = min((lambda t: (call(), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
    return f"{2 * n**3 / best / 1e9:.1f}"

f = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
a = jnp.ones((n, n), jnp.float32); ab = a.astype(jnp.bfloat16)
b = torch.ones(n, n); bb = b.bfloat16()
print(f"load {os.getloadavg()[0]:.2f} matmul peak float32 jax {peak(lambda: f(a, a).block_until_ready())} "
      f"torch {peak(lambda: torch.mm(b, b))}, bf16 jax {peak(lambda: f(ab, ab).block_until_ready())} "
      f"torch {peak(lambda: torch.mm(bb, bb))} GFLOP/s")
EOF
}

timed() {   # timed NAME CMD...: wall seconds of the whole command into $OUT/NAME.time
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG"
  peaks | tee -a "$LOG"
  local t0=$(date +%s.%N)
  "$@" > "$OUT/$name.out" 2>&1
  local t1=$(date +%s.%N)
  python -c "print(f'$name wall {($t1 - $t0):.1f} s')" | tee -a "$LOG" "$OUT/$name.time"
  peaks | tee -a "$LOG"
}

echo "# e2e $(date -u +%FT%TZ) $(git rev-parse --short HEAD) config=$CONFIG sets=${SETS[*]}" | tee "$LOG"
timed peft python benchmarks/e2e_peft.py "$CONFIG" --out "$TMP/peft" "${SETS[@]}"
export HFL_CACHE_DIR="$TMP/tok" HFL_JAX_CACHE="$TMP/xla"
timed jax_cold python -m hfl_jax.cli run "$CONFIG" --out "$TMP/jax_cold" --quiet "${SETS[@]}"
RUNS=(peft jax_cold)
if [ "${WARM:-1}" != 0 ]; then
  timed jax_warm python -m hfl_jax.cli run "$CONFIG" --out "$TMP/jax_warm" --quiet "${SETS[@]}"
  RUNS+=(jax_warm)
fi
for r in "${RUNS[@]}"; do
  mkdir -p "$OUT/$r"
  cp "$TMP/$r/metrics.jsonl" "$TMP/$r/summary.json" "$OUT/$r/"
done
python benchmarks/e2e_report.py "$OUT" | tee -a "$LOG"
rm -rf "$TMP"
