"""The table of an end-to-end comparison written by ``benchmarks/e2e.sh``: whole-command wall time
(``<run>.time``), mean round wall time, accuracy per round and final, and the speed ratio.

    python benchmarks/e2e_report.py benchmarks/results/e2e_<date>
    python benchmarks/e2e_report.py DIR1 DIR2 DIR3     # several pairs: each table, then the paired ratios

Each directory is one invocation of ``e2e.sh``, so it holds one interleaved pair (the PEFT loop, then
hfl_jax cold); with several, the ratio PEFT wall / hfl_jax wall is reported per pair and as
median [min, max].
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(out: Path, name: str) -> dict:
    recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    wall = float((out / f"{name}.time").read_text().split()[2])
    rounds = [r["wall_time"] for r in recs]
    return {"name": name, "wall": wall, "round": sum(rounds) / len(rounds), "rounds": len(recs),
            "acc": [r["eval_accuracy"] for r in recs]}


def runs_of(out: Path) -> list[dict]:
    return [load(out, n) for n in ("peft", "jax_cold", "jax_warm") if (out / n / "metrics.jsonl").is_file()]


def table(runs: list[dict]) -> str:
    peft = next(r for r in runs if r["name"] == "peft")
    lines = ["| command | wall s | speed vs PEFT loop | mean round s | final acc | acc per round |",
             "|---|---:|---:|---:|---:|---|"]
    for r in runs:
        acc = " ".join(f"{a:.3f}" for a in r["acc"])
        lines.append(f"| {r['name']} | {r['wall']:.1f} | {peft['wall'] / r['wall']:.2f}x | {r['round']:.1f} | "
                     f"{r['acc'][-1]:.4f} | {acc} |")
    return "\n".join(lines)


def paired(pairs: list[list[dict]], name: str = "jax_cold") -> dict:
    """PEFT wall / ``name`` wall per pair (``runs_of`` of one directory each): the ratios, median, min, max."""
    ratios = []
    for runs in pairs:
        by_name = {r["name"]: r for r in runs}
        ratios.append(by_name["peft"]["wall"] / by_name[name]["wall"])
    return {"ratios": ratios, "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv]
    pairs = [runs_of(d) for d in dirs]
    for d, runs in zip(dirs, pairs):
        if len(dirs) > 1:
            print(f"\n{d}")
        print(table(runs))
    if len(dirs) > 1:
        p = paired(pairs)
        print(f"\nhfl_jax cold vs PEFT loop, {len(dirs)} pairs: median {p['median']:.2f}x "
              f"[{p['min']:.2f}, {p['max']:.2f}]; pairs " + " ".join(f"{r:.2f}" for r in p["ratios"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
