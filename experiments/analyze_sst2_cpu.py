"""Where HierFedLoRA's simulated time and traffic go, from the committed SST-2 metrics (issue 7).

    python3 experiments/analyze_sst2_cpu.py [experiments/results/sst2_cpu/runs]

Prints, per alpha and method (mean over seeds and rounds): global-round time, the bandit's mean
tau and depth, time per intra-group round, traffic per global round, and the share of rounds whose
arm was chosen while exploring.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def main(root: Path) -> None:
    print("| alpha | method | round time (s) | mean tau | mean depth | time per intra-round (s) | MB per round | explore share |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for alpha_dir in sorted(root.glob("alpha*")):
        stats = defaultdict(lambda: defaultdict(list))
        for run in sorted(alpha_dir.iterdir()):
            if not (run / "metrics.jsonl").is_file():
                continue
            method = run.name.rsplit("_s", 1)[0]
            for line in (run / "metrics.jsonl").read_text().splitlines():
                r = json.loads(line)
                s = stats[method]
                s["round_time"].append(r["round_time"])
                s["mb"].append((r["bytes_up"] + r["bytes_down"]) / 1e6)
                for g in r["groups"]:
                    if g.get("skipped"):
                        continue
                    s["tau"].append(g["tau"])
                    s["depth"].append(g["depth"])
                    s["intra"].append(g["time"] / g["tau"])
                    if "explore" in g:
                        s["explore"].append(float(g["explore"]))
        for method, s in sorted(stats.items()):
            explore = f"{np.mean(s['explore']):.2f}" if s["explore"] else "-"
            print(f"| {alpha_dir.name[5:]} | {method} | {np.mean(s['round_time']):.2f} | {np.mean(s['tau']):.2f} | "
                  f"{np.mean(s['depth']):.2f} | {np.mean(s['intra']):.2f} | {np.mean(s['mb']):.1f} | {explore} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/sst2_cpu/runs"))
