#!/usr/bin/env bash
# Paper-scale group round on one GPU (issue 14): 80 devices, RoBERTa-base shape, T=128, B=8, E=2,
# rank 8 on query+value, full depth. Each configuration is one round_speed.py process with its own limit:
#   1. full_f32  (150 s): hfl_jax float32 (vmapped round) vs the PyTorch + PEFT loop
#   2. full_bf16 (200 s): hfl_jax bf16 mixed precision (model.compute_dtype) vs the compiled PyTorch peer
#      (torch.func.vmap(grad) + functional_call + hand-written AdamW, torch.compile, bf16 autocast,
#      TORCH_CHUNK=40 devices per call)
#   EXTRA=1 adds (not in the six-minute budget): 3. depth 1 of 12 with the frozen-layer cache, 4. the
#      Python loop of jitted single-device steps, 5. the eager torch.func.vmap peer in float32.
# Budget: at most 350 s of limits for 1+2 (most of it XLA and torch.compile compilation), under six
# minutes on one H100/H200 with start-up. NOT YET MEASURED on a GPU in this form (see RESULTS.md).
# Output: stdout, and $OUT (default benchmarks/results/gpu_check_<UTC time>) gets gpu_check.log,
# round_speed_<name>.json per configuration and gpu_check.json (all rows: method, dtype, median s, memory).
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA jax (and a CUDA torch for the peers)
#   CHUNK=40 bash benchmarks/gpu_check.sh   # hfl_jax vmaps 40 devices at a time (train.chunk_size; else automatic)
#   REMAT=full bash benchmarks/gpu_check.sh # hfl_jax with a rematerialisation policy (model.remat)
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
TORCH_CHUNK="${TORCH_CHUNK:-40}"
OUT_DIR="${OUT:-benchmarks/results/gpu_check_$(date -u +%Y-%m-%dT%H%M%SZ)}"
mkdir -p "$OUT_DIR"
log() { tee -a "$OUT_DIR/gpu_check.log"; }

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
[ -n "${REMAT:-}" ] && CHUNK_FLAG+=(--remat "$REMAT")
FAILED=0
bench() {  # bench NAME LIMIT_S ARGS...
  local name="$1" limit="$2"
  shift 2
  local json_flag=(--json "$OUT_DIR/round_speed_$name.json")
  echo "## $name: round_speed.py $*" | log
  timeout "$limit" python3 benchmarks/round_speed.py --model "$MODEL" -M "$M" -B "$B" -T "$T" -E "$E" \
    -n "$REPEATS" --peak-size "$PEAK" "${CHUNK_FLAG[@]}" "${json_flag[@]}" "$@" 2>&1 | log \
    || { echo "gpu_check: $name failed or timed out after ${limit}s (rc ${PIPESTATUS[0]})" | log; FAILED=1; }
}
export PYTHONUNBUFFERED=1
bench full_f32 150 --methods vmap,torch
bench full_bf16 200 --methods vmap,torch-vmap --compute-dtype bfloat16 --torch-vmap compile \
  --torch-chunk "$TORCH_CHUNK" --torch-autocast bfloat16
if [ -n "${EXTRA:-}" ]; then
  bench depth1_cache 120 --methods vmap -d 1 --cache-frozen
  bench loop_f32 200 --methods loop
  bench eager_peer_f32 200 --methods torch-vmap --torch-vmap eager --torch-chunk "$TORCH_CHUNK" --torch-autocast none
fi
python3 - "$OUT_DIR" <<'PY' 2>&1 | log
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
rows = []
for f in sorted(out.glob("round_speed_*.json")):
    d = json.loads(f.read_text())
    for r in d["main"]:
        rows.append({"config": f.stem[len("round_speed_"):], "method": r["method"],
                     "compute_dtype": d["args"].get("compute_dtype"), "median_s": statistics.median(r["times"]),
                     "best_s": min(r["times"]), "memory_bytes": r["xla_bytes"], "compile_s": r["compile_s"],
                     "note": r["note"]})
(out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
for r in rows:
    mem = f"{r['memory_bytes'] / 2**30:.1f} GiB" if r["memory_bytes"] else "-"
    print(f"{r['config']:>14} {r['method']:>10} {r['compute_dtype']:>9} median {r['median_s']:.4f} s  memory {mem}")
print(f"wrote {out / 'gpu_check.json'}")
PY
exit "$FAILED"
