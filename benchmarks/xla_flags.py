"""Which XLA:CPU flags shorten a cold run without changing its results (issue 16)?

Runs the same ``hfl-jax run CONFIG`` command once per flag set and repeat, interleaved (flag sets
in turn, then the next repeat), each in a fresh process with a cold XLA cache
(``HFL_JAX_CACHE=off``), and compares every run's per-round metrics (eval accuracy and loss,
simulated time) with the default flags' run, bit for bit::

    python benchmarks/xla_flags.py [--config experiments/configs/smoke.yaml] [--repeats 2] [--out DIR]

Prints one line per run (seconds, load, identical or not) and a table of medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLAG_SETS = {   # flags this jaxlib (0.10.2) accepts; unknown ones abort the process
    "default": "",
    "no_expensive_llvm": "--xla_llvm_disable_expensive_passes=true",
    "opt_level_1": "--xla_backend_optimization_level=1",
    "legacy_emitters": "--xla_cpu_use_fusion_emitters=false",
    "codegen_split_2": "--xla_cpu_parallel_codegen_split_count=2",
    "concurrency_sched": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
}


def metrics(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r.get("eval_accuracy"), r.get("eval_loss"), r["sim_time"]) for r in rows]


def run(config: str, flags: str, out: Path, extra: list[str]) -> float:
    env = dict(os.environ, HFL_JAX_CACHE="off", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), flags) if x)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hfl_jax", "run", config, "--out", str(out), "--quiet", *extra],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/configs/smoke.yaml")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sets", default=",".join(FLAG_SETS), help="comma-separated names of FLAG_SETS")
    ap.add_argument("--set", action="append", default=[], help="config override passed to hfl-jax run")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    names = args.sets.split(",")
    base = Path(args.out or tempfile.mkdtemp(prefix="xla_flags_"))
    extra = [x for s in args.set for x in ("--set", s)]
    times: dict[str, list[float]] = {n: [] for n in names}
    same: dict[str, bool] = {n: True for n in names}
    ref = None
    print(f"# {args.config}, cold XLA cache, {args.repeats} repeats, load {os.getloadavg()[0]:.2f}", flush=True)
    for rep in range(args.repeats):
        for name in names:
            out = base / f"{name}_{rep}"
            t = run(args.config, FLAG_SETS[name], out, extra)
            m = metrics(out)
            ref = m if ref is None else ref
            same[name] &= m == ref
            times[name].append(t)
            print(f"{name:18s} #{rep}: {t:6.1f} s  load {os.getloadavg()[0]:.2f}  "
                  f"{'identical' if m == ref else 'DIFFERENT'} (final acc {m[-1][1]})", flush=True)
    d = statistics.median(times[names[0]])
    print("\n| flags | median s | vs " + names[0] + " | metrics identical |\n|---|---:|---:|---|")
    for n in names:
        t = statistics.median(times[n])
        print(f"| `{FLAG_SETS[n] or '(none)'}` | {t:.1f} | {t / d:.2f} | {'yes' if same[n] else 'no'} |")


if __name__ == "__main__":
    main()
