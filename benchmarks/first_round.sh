#!/usr/bin/env bash
# Time to first round (issue 16): whole `hfl-jax run` commands of this tree and of an earlier
# commit, side by side on the same machine (interleaved: before, after, before, after), with the
# load and the matmul peak printed around each.
#
#   bash benchmarks/first_round.sh BEFORE_REV [OUT] [REPEATS]
#
# Cases: the smoke config (15 rounds: the whole run, every repeat), the SST-2 study config's first
# round (experiments/configs/sst2_cpu/hierfedlora.yaml, 1 round; first repeat only); each cold
# (HFL_JAX_CACHE=off, empty tokenization cache) and warm (a second run with a filled persistent
# XLA cache). Writes OUT/first_round.log and OUT/times.csv (case, tree, cache, repeat, seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?usage: first_round.sh BEFORE_REV [OUT] [REPEATS]}
OUT=${2:-benchmarks/results/first_round_$(date -u +%Y-%m-%d)}
REPEATS=${3:-2}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)   # absolute: the cases run in other directories
LOG="$OUT/first_round.log"
TMP=$(mktemp -d)
git worktree add -q --detach "$TMP/before" "$BEFORE"
trap 'git worktree remove --force "$TMP/before"; rm -rf "$TMP"' EXIT
AFTER_REV=$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo "+dirty")
echo "# first_round $(date -u +%FT%TZ) before=$(git rev-parse --short "$BEFORE") after=$AFTER_REV" | tee "$LOG"
echo "case,tree,cache,repeat,seconds" > "$OUT/times.csv"

peak() {
  python - <<'PY'
import os, time
import jax, jax.numpy as jnp
n = 1024
a = jnp.ones((n, n), jnp.float32); f = jax.jit(jnp.dot); f(a, a).block_until_ready()
t = min((lambda s: (f(a, a).block_until_ready(), time.perf_counter() - s)[1])(time.perf_counter()) for _ in range(5))
print(f"load {os.getloadavg()[0]:.2f} matmul peak {2 * n**3 / t / 1e9:.1f} GFLOP/s")
PY
}

run_case() {   # run_case CASE TREE_DIR TREE_NAME CACHE REPEAT CONFIG ARGS...
  local case=$1 dir=$2 tree=$3 cache=$4 rep=$5; shift 5
  local xla="off" tok="$TMP/tok_${tree}_${case}_${rep}"
  if [ "$cache" = warm ]; then
    xla="$TMP/xla_${tree}_${case}_${rep}"
    (cd "$dir" && HFL_CACHE_DIR="$tok" HFL_JAX_CACHE="$xla" PYTHONPATH="$dir" \
       python -m hfl_jax run "$@" --out "$TMP/fill_${tree}_${case}_${rep}" --quiet > /dev/null 2>&1)
  fi
  local t0=$(date +%s.%N)
  (cd "$dir" && HFL_CACHE_DIR="$tok" HFL_JAX_CACHE="$xla" PYTHONPATH="$dir" \
     python -m hfl_jax run "$@" --out "$TMP/run_${tree}_${case}_${cache}_${rep}" --quiet > "$OUT/${case}_${tree}_${cache}_${rep}.out" 2>&1)
  local t1=$(date +%s.%N)
  local s=$(python -c "print(f'{$t1 - $t0:.1f}')")
  echo "$case,$tree,$cache,$rep,$s" >> "$OUT/times.csv"
  echo "$case $tree $cache #$rep: $s s  ($(peak))" | tee -a "$LOG"
}

SMOKE=experiments/configs/smoke.yaml
SST2=experiments/configs/sst2_cpu/hierfedlora.yaml   # the SST-2 study config when the issue was filed (in both trees)
GLUE=$(cd .. && pwd)/shared/data/glue
peak | tee -a "$LOG"
for rep in $(seq 1 "$REPEATS"); do
  for cache in off warm; do
    for tree in before after; do
      dir=$PWD; [ "$tree" = before ] && dir="$TMP/before"
      run_case smoke_whole "$dir" "$tree" "$cache" "$rep" "$dir/$SMOKE"
      # the SST-2 case once (a minute a run); its data sit beside the project, not beside a temporary tree
      if [ "$rep" = 1 ]; then
        run_case sst2_round1 "$dir" "$tree" "$cache" "$rep" "$dir/$SST2" --set train.rounds=1 --set data.data_dir="$GLUE"
      fi
    done
  done
done
python - "$OUT/times.csv" <<'PY' | tee -a "$LOG"
import csv, sys, collections
rows = list(csv.DictReader(open(sys.argv[1])))
t = collections.defaultdict(list)
for r in rows:
    t[(r["case"], r["cache"], r["tree"])].append(float(r["seconds"]))
print("| case | cache | before (s) | after (s) | after / before |")
print("|---|---|---:|---:|---:|")
for case in dict.fromkeys(r["case"] for r in rows):
    for cache in ("off", "warm"):
        b, a = t[(case, cache, "before")], t[(case, cache, "after")]
        if b and a:
            mb, ma = sum(b) / len(b), sum(a) / len(a)
            print(f"| {case} | {cache} | {mb:.1f} ({', '.join(map(str, b))}) | {ma:.1f} ({', '.join(map(str, a))}) | {ma / mb:.2f} |")
PY
