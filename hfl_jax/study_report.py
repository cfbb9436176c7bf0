"""The report of a study (:mod:`hfl_jax.sweep`): markdown tables with 95% confidence intervals.

A pure function of the runs' files: the same runs give the same bytes. Per setting:

* **tuning**: each tuned method's mean validation score per grid value, and the value chosen;
* **results**: per method, over its seeds, mean [95% CI] of the final test accuracy and of the mean
  of the last k evaluations (k = the tuning's ``last``, else 3: less sensitive to one round's swing), the
  simulated seconds to each target (over the seeds that reach it, ``k/n``), the accuracy at
  equal simulated time (the shortest run's total simulated time, so every run has reached it),
  and the traffic per tier (device-edge, cloud) in MB;
* **paired with the reference** (by seed): the difference in final accuracy and in the last-k mean, the ratio of times
  to each target (method / reference: above 1 means the reference is faster; geometric mean,
  CI on the logs, over seeds where both reach it) and the ratio of total traffic;
* **bandit**: how often each (depth, tau) arm was pulled, the rounds in which a time budget
  excluded arms, and the pulls that fell back to the cheapest arm.

Intervals: Student's t, ``mean ± t(0.975, n-1) * sd / sqrt(n)``; a single value has none ("n=1").
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hfl_jax import provenance
from hfl_jax import report as run_report
from hfl_jax.sweep import Run, Study, choose, final_runs, last_mean, tuning_runs

MB = 1e6


def ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, half width)`` of the 95% Student-t interval (half width None for one value)."""
    from scipy.stats import t as student_t

    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return float(x.mean()), None
    return float(x.mean()), float(student_t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def _cell(values: Sequence[float | None], digits: int, of: int | None = None, scale: float = 1.0) -> str:
    have = [v * scale for v in values if v is not None]
    if not have:
        return "not reached" if of else "n/a"
    mean, half = ci95(have)
    text = f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if half is not None else "")
    if of is not None and len(have) < of:
        text += f" ({len(have)}/{of})"
    return text


def _ratio_cell(ratios: Sequence[float]) -> str:
    """Geometric mean [95% CI] of positive ratios, as ``g (lo-hi), n=k``."""
    if not ratios:
        return "n/a"
    logs = np.log(np.asarray(ratios, np.float64))
    mean, half = ci95(logs)
    if half is None:
        return f"{math.exp(mean):.2f} (n=1)"
    return f"{math.exp(mean):.2f} [{math.exp(mean - half):.2f}, {math.exp(mean + half):.2f}] (n={len(ratios)})"


def time_to(run: dict, target: float) -> float | None:
    """Simulated seconds at the first evaluation with accuracy >= ``target`` (None: never)."""
    ev = run_report.evaluations(run)
    hit = np.flatnonzero(ev[:, 2] >= target)
    return float(ev[hit[0], 1]) if len(hit) else None


def accuracy_at(run: dict, seconds: float) -> float | None:
    """Accuracy of the last evaluation at simulated time <= ``seconds`` (None: none yet)."""
    ev = run_report.evaluations(run)
    ok = np.flatnonzero(ev[:, 1] <= seconds + 1e-9)
    return float(ev[ok[-1], 2]) if len(ok) else None


def _final_accuracy(run: dict) -> float | None:
    ev = run_report.evaluations(run)
    return float(ev[-1, 2]) if len(ev) else None


def _last_mean(run: dict, k: int) -> float | None:
    """Mean accuracy of the run's last ``k`` evaluations (the tuning's score, on the reported split)."""
    return last_mean(run["records"], k)


def _last_k(study: Study) -> int:
    return study.tune.last if study.tune else 3


def _paired_diffs(pairs: Sequence[tuple[dict, dict]], value) -> list[float]:
    """``value(a) - value(b)`` for each pair (method run, reference run) where both have a value."""
    values = [(value(a), value(b)) for a, b in pairs]
    return [x - y for x, y in values if x is not None and y is not None]


def _traffic(run: dict) -> dict:
    tiers = run_report.tier_totals(run["records"])
    total = sum(r.get("bytes_up", 0.0) + r.get("bytes_down", 0.0) for r in run["records"])
    if not tiers:
        return {"edge": None, "cloud": None, "total": total}
    return {"edge": tiers["edge_bytes_up"] + tiers["edge_bytes_down"],
            "cloud": tiers["cloud_bytes_up"] + tiers["cloud_bytes_down"], "total": total}


def _load(runs: Sequence[Run]) -> dict:
    """``{(setting, method): {seed: loaded run}}`` of the finished runs among ``runs``."""
    out: dict = {}
    for r in runs:
        if (r.out / "summary.json").is_file():
            out.setdefault((r.setting, r.method), {})[r.seed] = run_report.load_run(r.out)
    return out


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]


def _tuning_section(study: Study, setting: str, scores: dict, chosen: dict) -> list[str]:
    t = study.tune
    head = ["method"] + [f"{t.key}={v:g}" if isinstance(v, float) else f"{t.key}={v}" for v in t.grid] + ["chosen"]
    rows = []
    for m, spec in study.methods:
        if spec.lr_from is not None:
            continue
        by = scores.get((setting, m), {})
        rows.append([m] + [f"{by[v]:.4f}" if v in by else "pending" for v in t.grid]
                    + [f"{chosen[(setting, m)]:g}" if (setting, m) in chosen else "pending"])
    return ([f"### Tuning ({t.key}; mean validation accuracy of the last {t.last} evaluations, seeds "
             f"{', '.join(map(str, t.seeds))})", ""] + _table(head, rows) + [""])


def _bandit_cell(runs: Sequence[dict]) -> tuple[str, str, str] | None:
    pulls, budget_rounds, rounds, fallbacks = Counter(), 0, 0, 0
    for run in runs:
        for rec in run["records"]:
            groups = [g for g in rec.get("groups", []) if not g.get("skipped") and "arm" in g]
            rounds += 1
            budget_rounds += any(g.get("over_budget", 0) > 0 for g in groups)
            fallbacks += sum(bool(g.get("infeasible_fallback")) for g in groups)
            pulls.update((g["depth"], g["tau"]) for g in groups)
    if len(pulls) < 2 and not budget_rounds:
        return None
    total = sum(pulls.values())
    arms = ", ".join(f"({d},{t}) {100 * c / total:.0f}%" for (d, t), c in sorted(pulls.items()))
    return arms, f"{budget_rounds}/{rounds}", str(fallbacks)


def setting_section(study: Study, setting: str, runs: dict, scores: dict, chosen: dict) -> list[str]:
    """The markdown of one setting."""
    own = dict(study.setting_bases).get(setting)
    what = ([f"base `{own.name}`"] if own else []) + list(dict(study.settings)[setting])
    lines = [f"## Setting `{setting}`: " + (", ".join(what) or "the base config"), ""]
    tuned_in = dict(study.tuned_in).get(setting)
    if study.tune and tuned_in:
        lines += [f"Learning rates: those tuned in setting `{tuned_in}`.", ""]
    elif study.tune:
        lines += _tuning_section(study, setting, scores, chosen)
    methods = [(m, spec) for m, spec in study.methods if (setting, m) in runs]
    if not methods:
        return lines + ["No finished final run yet.", ""]
    all_runs = [r for m, _ in methods for r in runs[(setting, m)].values()]
    t_eq = min(float(r["records"][-1]["sim_time"]) for r in all_runs)
    last_k = _last_k(study)
    head = ["method", "seeds", "value", "final acc", f"last-{last_k} mean acc"] + \
        [f"time to {t:.2f} (s)" for t in study.targets] + \
        [f"acc at {t_eq:.3g} s", "device-edge (MB)", "cloud (MB)", "total (MB)"]
    rows = []
    for m, spec in methods:
        by_seed = runs[(setting, m)]
        rs = [by_seed[s] for s in sorted(by_seed)]
        expected = len(spec.seeds or study.seeds)
        value = chosen.get((tuned_in or setting, spec.lr_from or m)) if study.tune else None
        traffic = [_traffic(r) for r in rs]
        seeds = ", ".join(map(str, sorted(by_seed))) + (f" ({len(rs)}/{expected})" if len(rs) < expected else "")
        rows.append([m, seeds, "base" if value is None else f"{value:g}", _cell([_final_accuracy(r) for r in rs], 4),
                     _cell([_last_mean(r, last_k) for r in rs], 4)]
                    + [_cell([time_to(r, t) for r in rs], 1, of=len(rs)) for t in study.targets]
                    + [_cell([accuracy_at(r, t_eq) for r in rs], 4)]
                    + [_cell([x[k] for x in traffic], 1, scale=1 / MB) for k in ("edge", "cloud", "total")])
    lines += ["### Results (mean ± 95% CI half-width over seeds; times: over the seeds that reach the target)", ""]
    lines += _table(head, rows) + [""]
    ref = study.reference
    if ref and (setting, ref) in runs:
        lines += _paired_section(study, setting, runs, methods, ref)
    bandit_rows = []
    for m, _ in methods:
        cell = _bandit_cell(list(runs[(setting, m)].values()))
        if cell:
            bandit_rows.append([m, *cell])
    if bandit_rows:
        lines += ["### Arm choices (all seeds' pulls), rounds where a time budget excluded arms, fallbacks", ""]
        lines += _table(["method", "(depth, tau) share of pulls", "budget binding", "cheapest-arm fallbacks"],
                        bandit_rows) + [""]
    return lines


def _paired_section(study: Study, setting: str, runs: dict, methods: list, ref: str) -> list[str]:
    base = runs[(setting, ref)]
    last_k = _last_k(study)
    head = ["method", f"Δ final acc vs {ref}", f"Δ last-{last_k} mean acc"] + \
        [f"time to {t:.2f}: method / {ref}" for t in study.targets] + \
        [f"traffic: method / {ref}"]
    rows = []
    for m, _ in methods:
        if m == ref:
            continue
        pairs = [(runs[(setting, m)][s], base[s]) for s in sorted(runs[(setting, m)]) if s in base]
        if not pairs:
            continue
        diffs = _paired_diffs(pairs, _final_accuracy)
        last = _paired_diffs(pairs, lambda r: _last_mean(r, last_k))
        row = [m, _cell(diffs, 4) + f" (n={len(diffs)})", _cell(last, 4)]
        for t in study.targets:
            ratios = [time_to(a, t) / time_to(b, t) for a, b in pairs
                      if time_to(a, t) is not None and time_to(b, t) is not None and time_to(b, t) > 0]
            row.append(_ratio_cell(ratios))
        row.append(_ratio_cell([_traffic(a)["total"] / _traffic(b)["total"] for a, b in pairs
                                if _traffic(b)["total"] > 0]))
        rows.append(row)
    return ([f"### Paired by seed with `{ref}` (difference: mean ± 95% CI; ratios: geometric mean "
             "[95% CI]; a time ratio above 1 means the reference reaches the target sooner)", ""]
            + _table(head, rows) + [""])


def code_line(run_dirs: Sequence[Path]) -> str:
    """Which code made the finished runs among ``run_dirs`` (their ``provenance.jsonl``): each commit (with
    ``+dirty`` for uncommitted changes) and package source hash with jax version and run count, runs resumed
    under other code than their first record, and runs whose start predates the record."""
    versions, mixed, unrecorded = {}, 0, 0
    for d in run_dirs:
        if not (Path(d) / "summary.json").is_file():
            continue
        lines = provenance.read(d)
        if not lines or lines[0].get("event") != "start":
            unrecorded += 1   # its first rounds ran before runs recorded their code
        if not lines:
            continue
        mixed += any(provenance.changes(lines[0], x) for x in lines[1:])
        for key in {(str(x.get("git"))[:7] + ("+dirty" if x.get("dirty") else ""), x.get("source"), x.get("jax"))
                    for x in lines}:
            versions[key] = versions.get(key, 0) + 1
    parts = [f"`{git}` (source `{src}`) with jax {jax} ({n} run{'s' * (n != 1)})"
             for (git, src, jax), n in sorted(versions.items(), key=str)]
    if mixed:
        parts.append(f"**{mixed} run{'s' * (mixed != 1)} resumed under other code than {'they' if mixed != 1 else 'it'} "
                     f"first recorded**")
    if unrecorded:
        parts.append(f"{unrecorded} run{'s' * (unrecorded != 1)} started before runs recorded their code")
    return "Code (provenance.jsonl): " + ("; ".join(parts) or "no finished run") + "."


def study_report(study: Study) -> str:
    """The study's report (markdown); pending runs are marked, never guessed."""
    tune = tuning_runs(study)
    tune_done = all((r.out / "summary.json").is_file() for r in tune)
    chosen, scores = choose(study, finished_only=True) if study.tune else ({}, {})
    finals = final_runs(study, chosen) if (tune_done or not study.tune) else None   # None: wait for the tuning
    runs = _load(finals) if finals is not None else {}
    n_final = len(finals) if finals is not None else None
    lines = [f"# Study `{study.name}`", "",
             f"Runs: {len(tune)} tuning" + (f", {sum(len(v) for v in runs.values())} of {n_final} final finished"
                                            if n_final is not None else ", final runs wait for the tuning") + ".",
             f"Seeds: {', '.join(map(str, study.seeds))} (methods may use fewer, as listed). "
             f"Targets: {', '.join(f'{t:.2f}' for t in study.targets) or 'none'}.",
             code_line([r.out for r in tune + (finals or [])]), ""]
    for s, _ in study.settings:
        lines += setting_section(study, s, runs, scores, chosen)
    return "\n".join(lines).rstrip() + "\n"
