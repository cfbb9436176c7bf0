# Sourced by the experiment scripts (set TIMING_LOG first).
#   log MSG                      append "TIME MSG" to $TIMING_LOG (and print it)
#   run OUTDIR CONFIG [ARGS...]  skip OUTDIR if it holds a finished run (summary.json), resume it from
#                                its checkpoint if interrupted, else `hfl-jax run CONFIG ARGS --out OUTDIR`
log() { echo "$(date -u +%FT%TZ) $*" | tee -a "$TIMING_LOG"; }
run() {
  local dir=$1; shift
  if [ -f "$dir/summary.json" ]; then log "skip $dir (done)"; return; fi
  if [ -d "$dir/checkpoints" ]; then python3 -m hfl_jax resume "$dir" --quiet >/dev/null; else
    python3 -m hfl_jax run "$@" --out "$dir" --quiet >/dev/null; fi
  log "done $dir"
}
