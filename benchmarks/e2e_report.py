"""The table of an end-to-end comparison written by ``benchmarks/e2e.sh``: whole-command wall time
(``<run>.time``), mean round wall time, accuracy per round and final, and the speed ratio.

    python benchmarks/e2e_report.py benchmarks/results/e2e_<date>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: Path, name: str) -> dict:
    recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    wall = float((out / f"{name}.time").read_text().split()[2])
    rounds = [r["wall_time"] for r in recs]
    return {"name": name, "wall": wall, "round": sum(rounds) / len(rounds), "rounds": len(recs),
            "acc": [r["eval_accuracy"] for r in recs]}


def main(out: str) -> int:
    out = Path(out)
    runs = [load(out, n) for n in ("peft", "jax_cold", "jax_warm") if (out / n / "metrics.jsonl").is_file()]
    peft = next(r for r in runs if r["name"] == "peft")
    print("| command | wall s | speed vs PEFT loop | mean round s | final acc | acc per round |")
    print("|---|---:|---:|---:|---:|---|")
    for r in runs:
        acc = " ".join(f"{a:.3f}" for a in r["acc"])
        print(f"| {r['name']} | {r['wall']:.1f} | {peft['wall'] / r['wall']:.2f}x | {r['round']:.1f} | "
              f"{r['acc'][-1]:.4f} | {acc} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
