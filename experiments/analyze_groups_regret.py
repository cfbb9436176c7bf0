"""Two analyses the study report does not make (issue 29): how near-IID the groups were, and what the bandit
gave up against the best fixed arm in hindsight.

    python experiments/analyze_groups_regret.py experiments/studies/scale.yaml [--out FILE.md] [--pair A:B ...]

Per setting of the study, over its finished final runs:

* **Group KL**: each run's mean KL divergence of its groups' pooled label distributions from the global one
  (``partition.json``: ``groups.mean_kl``, computed on the *true* histograms whatever the grouping was built
  from), per method: mean and 95% t-interval over seeds. Lower = groups closer to IID.
* **Regret of the bandit** -- a method whose runs pulled more than one arm and whose config is a fixed
  arm's but for being the bandit (``hierfedlora``; not ``random_groups`` or another layer policy) --
  against the fixed arms of its grid (``hierfedlora_fixed`` with the top layers; arms with other layer sets
  are compared with ``--pair``), on the seeds that the bandit and every fixed arm share (same partitions).
  The best fixed arm in hindsight has the highest mean, over those seeds, of the mean accuracy of the last
  ``k`` evaluations (the study's tuning ``last``). Per seed, regret = the best arm's accuracy minus the
  bandit's, averaged over all rounds and over the second half, and at equal simulated time (the accuracy
  each has reached by the bandit's evaluation times, :func:`hfl_jax.study_report.accuracy_at`, only at
  times between the fixed run's first evaluation and its end); mean and 95% t-interval over the seeds.
  Positive: the fixed arm did better.
* **Paired comparisons** (``--pair A:B``): method A against method B by seed -- the difference in the
  last-k mean (with the paired t-test's p-value, Holm-adjusted over the setting's pairs) and in the mean of
  the second half of the evaluations (mean and 95% t-interval over the common seeds), per target how many
  seeds reach it and A's time over B's, A's traffic over B's, and the difference in group KL.

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
from hfl_jax.study_report import _ratio_cell, _traffic, accuracy_at, ci95, time_to  # noqa: E402
from hfl_jax.sweep import choose, final_runs, last_mean, load_study  # noqa: E402


def _fmt(values, empty: str = "n/a") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return empty
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


def _same_length(a: dict, b: dict, what: str) -> None:
    """Paired measures line the runs up by evaluation: they must have the same number (a run stopped early by
    a target or a time budget would compare its middle with the other's end)."""
    na, nb = len(accuracies(a)), len(accuracies(b))
    if na != nb:
        raise ValueError(f"{what}: the runs have {na} and {nb} evaluations; paired measures need equal lengths")


def _core(config: dict) -> dict:
    """A run's config without what tells a fixed arm from the bandit run it is compared with: the run's name
    and seed, the fixed depth and tau, and ``hierfedlora_fixed`` read as ``hierfedlora``."""
    core = {k: v for k, v in config.items() if k not in ("name", "seed")}
    algo = {k: v for k, v in config.get("algorithm", {}).items() if k not in ("fixed_depth", "fixed_tau")}
    algo["name"] = {"hierfedlora_fixed": "hierfedlora"}.get(algo.get("name"), algo.get("name"))
    core["algorithm"] = algo
    return core


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None stays None and does not count in the family)."""
    idx = [i for i, v in enumerate(pvalues) if v is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        out[i] = running
    return out


def paired_p(diffs: list[float]) -> float | None:
    """Two-sided p-value of the paired t-test that the mean difference is 0 (None below 2 pairs)."""
    from scipy.stats import t as student_t

    x = np.asarray(diffs, np.float64)
    if len(x) < 2:
        return None
    sd = x.std(ddof=1)
    if sd == 0:
        return 0.0 if x.mean() != 0 else 1.0
    return float(2 * student_t.sf(abs(x.mean()) / (sd / np.sqrt(len(x))), len(x) - 1))


def regret_rows(bandit: dict, fixed: dict, last: int) -> list[list[str]]:
    """``bandit``/``fixed``: ``{method: {seed: run}}``; one row per bandit method, over the seeds that it and
    every fixed arm have (so the best arm is chosen, and compared, on the same partitions). Per seed: the best
    arm's accuracy minus the bandit's, averaged over all rounds and over the second half; and at equal
    simulated time, at the bandit's evaluation times that fall inside the fixed run (after its first
    evaluation, before its end: outside, its accuracy is unknown). Mean ± 95% CI over the seeds."""
    rows = []
    for m, runs in bandit.items():
        seeds = sorted(set(runs).intersection(*(set(f) for f in fixed.values())))
        if not seeds:
            rows.append([m, "no seed run by every fixed arm yet"] + ["-"] * 5)
            continue
        def seeds_mean(rs):
            return float(np.mean([last_mean(rs[s]["records"], last) for s in seeds]))
        best = max(fixed, key=lambda f: seeds_mean(fixed[f]))
        all_rounds, second_half, by_time = [], [], []
        for s in seeds:
            r, f = runs[s], fixed[best][s]
            _same_length(f, r, f"regret of {m} against {best}, seed {s}")
            d = accuracies(f) - accuracies(r)
            all_rounds.append(float(d.mean()))
            second_half.append(float(d[len(d) // 2:].mean()))
            f_end = f["records"][-1]["sim_time"]
            times = [rec["sim_time"] for rec in r["records"] if "eval_accuracy" in rec]
            diffs = [a - o for t, o in zip(times, accuracies(r)) if t <= f_end + 1e-9
                     for a in [accuracy_at(f, t)] if a is not None]
            if diffs:
                by_time.append(float(np.mean(diffs)))
        rows.append([m, best + f" (seeds {', '.join(map(str, seeds))})", f"{seeds_mean(fixed[best]):.4f}",
                     f"{seeds_mean(runs):.4f}", _fmt(all_rounds), _fmt(second_half),
                     _fmt(by_time, empty="no common time")])
    return rows


def paired_rows(a: dict, b: dict, last: int, targets=(), a_dirs: dict | None = None,
                b_dirs: dict | None = None) -> tuple[list[str], float | None]:
    """Method ``a`` against method ``b`` (``{seed: run}`` each), paired by seed (the same partition and
    initial adapters), over their common seeds: mean ± 95% CI of a - b in the mean accuracy of the last
    ``last`` evaluations (with the paired t-test's p-value, returned for the Holm adjustment) and of the
    second half of the evaluations; per target, how many seeds reach it (``a/b``) and a's simulated time
    over b's (geometric mean [95% CI], n = seeds where both reach it); a's total traffic over b's; and, given
    the run directories, a - b in group KL."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return ["no common seed"] + ["-"] * (3 + len(targets) + (a_dirs is not None)), None
    for s in seeds:
        _same_length(a[s], b[s], f"seed {s}")

    def half(r):
        acc = accuracies(r)
        return float(acc[len(acc) // 2:].mean())
    last_diffs = [last_mean(a[s]["records"], last) - last_mean(b[s]["records"], last) for s in seeds]
    p = paired_p(last_diffs)
    cells = [_fmt(last_diffs), _fmt([half(a[s]) - half(b[s]) for s in seeds])]
    for t in targets:
        ta = [time_to(a[s], t) for s in seeds]
        tb = [time_to(b[s], t) for s in seeds]
        both = [x / y for x, y in zip(ta, tb) if x is not None and y is not None and y > 0]
        reach = f"{sum(x is not None for x in ta)}/{sum(y is not None for y in tb)}"
        cells.append(reach + (f", {_ratio_cell(both)}" if both else ""))
    traffic = [(_traffic(a[s])["total"], _traffic(b[s])["total"]) for s in seeds]
    cells.append(_ratio_cell([x / y for x, y in traffic if y > 0]))
    if a_dirs is not None and b_dirs is not None:
        kl = [(group_kl(a_dirs[s]), group_kl(b_dirs[s])) for s in seeds]
        cells.append(_fmt([x - y for x, y in kl if x is not None and y is not None], empty="- (one group)"))
    return cells, p


def analyze(study_path: str, pairs=()) -> str:
    study = load_study(study_path)
    names = [m for m, _ in study.methods]
    for name in {x for pair in pairs for x in pair}:
        if name not in names:
            raise ValueError(f"--pair: the study has no method {name!r} (it has {', '.join(names)})")
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
                  "Each method over its own seeds (seeds fix the partitions, so rows with other seeds are not "
                  "paired; the pairs below are).", "",
                  "| method | group KL (mean ± 95% CI half-width) |", "|---|---:|"]
        for m, seeds in by_method.items():
            lines.append(f"| {m} | {_fmt([group_kl(r.out) for r in seeds.values()], empty='- (one group)')} |")
        loaded = {m: {s: run_report.load_run(r.out) for s, r in seeds.items()} for m, seeds in by_method.items()}
        fixed = {m: rs for m, rs in loaded.items()
                 if all(r["config"]["algorithm"]["name"] == "hierfedlora_fixed"
                        and r["config"]["algorithm"].get("layer_policy", "top") == "top" for r in rs.values())}
        # the bandit: runs that pulled more than one arm and differ from the fixed arms only in being a bandit
        cores = [_core(r["config"]) for rs in fixed.values() for r in rs.values()]
        bandit = {m: rs for m, rs in loaded.items() if m not in fixed
                  and any(len(pulled_arms(r)) > 1 for r in rs.values())
                  and all(_core(r["config"]) in cores for r in rs.values())}
        if fixed and bandit:
            lines += ["", f"### Regret against the best fixed top-layer arm in hindsight (by the mean of the last "
                      f"{last} evaluations; mean ± 95% CI over seeds)", "",
                      "| bandit method | best fixed arm | its last-k acc | bandit's last-k acc | regret per round "
                      "(all rounds) | (second half) | regret at equal simulated time |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            lines += ["| " + " | ".join(row) + " |" for row in regret_rows(bandit, fixed, last)]
        todo = [(x, y) for x, y in pairs if x in loaded and y in loaded]
        if todo:
            head = ["method", "against", f"Δ last-{last} mean acc", "p (Holm)", "Δ second-half mean acc"] + \
                [f"reach {t:.2f} (seeds a/b), time a/b" for t in study.targets] + ["traffic a/b", "Δ group KL"]
            got = [paired_rows(loaded[x], loaded[y], last, study.targets,
                               {s: r.out for s, r in by_method[x].items()},
                               {s: r.out for s, r in by_method[y].items()}) for x, y in todo]
            adjusted = holm([p for _, p in got])
            lines += ["", "### Paired by seed (a - b: mean ± 95% CI half-width over the common seeds; p: paired "
                      f"t-test on the last-{last} difference, Holm-adjusted over the {len(todo)} pairs of this "
                      "setting)", "",
                      "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
            lines += ["| " + " | ".join([x, y, cells[0], "n/a" if q is None else f"{q:.3f}"] + cells[1:]) + " |"
                      for (x, y), (cells, _), q in zip(todo, got, adjusted)]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--pair", action="append", default=[], metavar="A:B",
                    help="also compare method A with method B, paired by seed (repeatable)")
    a = ap.parse_args(argv)
    pairs = []
    for p in a.pair:
        x, sep, y = p.partition(":")
        if not (sep and x and y):
            ap.error(f"--pair takes METHOD:METHOD, got {p!r}")
        pairs.append((x, y))
    try:
        text = analyze(a.study, pairs)
    except ValueError as e:
        ap.error(str(e))
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
