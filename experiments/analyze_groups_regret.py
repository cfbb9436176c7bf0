"""Two analyses the study report does not make (issue 29): how near-IID the groups were, and what the bandit
gave up against the best fixed arm in hindsight.

    python experiments/analyze_groups_regret.py experiments/studies/scale.yaml [--out FILE.md]

Per setting of the study, over its finished final runs:

* **Group KL**: each run's mean KL divergence of its groups' pooled label distributions from the global one
  (``partition.json``: ``groups.mean_kl``, computed on the *true* histograms whatever the grouping was built
  from), per method: mean and 95% t-interval over seeds. Lower = groups closer to IID.
* **Regret of a bandit method** (every method whose runs pulled more than one arm) against the fixed arms
  (methods ``hierfedlora_fixed``): the best fixed arm in hindsight is the one with the highest mean, over
  its seeds, of the mean evaluation accuracy of the last ``k`` rounds (the study's tuning ``last``). Regret
  per round = the best arm's mean accuracy at round ``r`` minus the bandit's (same seeds' means), averaged
  over rounds; also at equal simulated time (the accuracy each reaches by the bandit run's evaluation
  times, :func:`hfl_jax.study_report.accuracy_at`). Positive: the fixed arm did better.

Pure functions of the run directories; prints markdown (and writes it with ``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfl_jax import report as run_report  # noqa: E402
from hfl_jax.study_report import accuracy_at, ci95  # noqa: E402
from hfl_jax.sweep import choose, final_runs, load_study  # noqa: E402


def _fmt(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "- (one group)"
    mean, half = ci95(values)
    return f"{mean:.4f}" + (f" ± {half:.4f}" if half is not None else "") + f" (n={len(values)})"


def group_kl(run_dir: Path) -> float | None:
    p = run_dir / "partition.json"
    if not p.is_file():
        return None
    groups = json.loads(p.read_text())["groups"]
    return None if len(groups["sizes"]) < 2 else float(groups["mean_kl"])   # one group: a flat method


def accuracies(run: dict) -> np.ndarray:
    return np.array([r["eval_accuracy"] for r in run["records"] if "eval_accuracy" in r], float)


def pulled_arms(run: dict) -> set:
    return {(g["depth"], g["tau"]) for r in run["records"] for g in r.get("groups", [])
            if not g.get("skipped") and "depth" in g}


def regret_rows(bandit: dict, fixed: dict, last: int) -> list[list[str]]:
    """``bandit``/``fixed``: ``{method: {seed: run}}``; one row per bandit method."""
    def last_mean(runs):
        return float(np.mean([accuracies(r)[-last:].mean() for r in runs.values()]))
    best = max(fixed, key=lambda m: last_mean(fixed[m]))
    best_curve = np.mean([accuracies(r) for r in fixed[best].values()], axis=0)
    rows = []
    for m, runs in bandit.items():
        curves = [accuracies(r) for r in runs.values()]
        n = min(len(best_curve), *(len(c) for c in curves))
        per_round = best_curve[:n] - np.mean([c[:n] for c in curves], axis=0)
        by_time = []
        for r in runs.values():
            times = [rec["sim_time"] for rec in r["records"] if "eval_accuracy" in rec]
            own = accuracies(r)
            ref = [np.mean([accuracy_at(f, t) or 0.0 for f in fixed[best].values()]) for t in times]
            by_time.append(float(np.mean(np.array(ref) - own)))
        rows.append([m, best, f"{last_mean(fixed[best]):.4f}", f"{last_mean(runs):.4f}",
                     f"{per_round.mean():+.4f}", f"{per_round[n // 2:].mean():+.4f}", _fmt(by_time)])
    return rows


def analyze(study_path: str) -> str:
    study = load_study(study_path)
    chosen, _ = choose(study, finished_only=True)
    runs = [r for r in final_runs(study, chosen) if (r.out / "summary.json").is_file()]
    last = study.tune.last if study.tune else 3
    lines = [f"# Group KL and bandit regret: `{study_path}` ({len(runs)} finished final runs)", ""]
    for setting, _ in study.settings:
        mine = [r for r in runs if r.setting == setting]
        if not mine:
            continue
        by_method: dict = {}
        for r in mine:
            by_method.setdefault(r.method, {})[r.seed] = r
        lines += [f"## `{setting}`", "", "### Mean group KL from the global label distribution (true histograms)", "",
                  "| method | group KL (mean ± 95% CI half-width) |", "|---|---:|"]
        for m, seeds in by_method.items():
            lines.append(f"| {m} | {_fmt([group_kl(r.out) for r in seeds.values()])} |")
        loaded = {m: {s: run_report.load_run(r.out) for s, r in seeds.items()} for m, seeds in by_method.items()}
        fixed = {m: rs for m, rs in loaded.items()
                 if all(r["config"]["algorithm"]["name"] == "hierfedlora_fixed" for r in rs.values())}
        bandit = {m: rs for m, rs in loaded.items() if m not in fixed
                  and any(len(pulled_arms(r)) > 1 for r in rs.values())}
        if fixed and bandit:
            lines += ["", f"### Regret against the best fixed arm in hindsight (by the mean of the last {last} "
                      "evaluations)", "",
                      "| bandit method | best fixed arm | its last-k acc | bandit's last-k acc | regret per round "
                      "(all rounds) | (second half) | regret at equal simulated time (per seed) |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            lines += ["| " + " | ".join(row) + " |" for row in regret_rows(bandit, fixed, last)]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    text = analyze(a.study)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
