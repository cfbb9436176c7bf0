"""Comparing finished (or running) runs: load a run directory, a markdown table, and plots.

A run directory is what :func:`hfl_jax.driver.run` writes: ``config.yaml``,
``metrics.jsonl`` (one record per global round, see :func:`hfl_jax.algos.stages.finish_round`
plus ``eval_loss``/``eval_accuracy``/``wall_time``) and, once the run has ended,
``summary.json``. Everything here is computed from the per-round records, so a
run that is still going (no ``summary.json`` yet) can be reported too.

Library code: nothing is printed; functions return strings and paths.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hfl_jax.fed.tiers import TIER_BYTES, TIER_TIMES   # noqa: F401  (re-exported; the fields' owner is fed)

MB = 1e6   # traffic is reported in decimal megabytes

RunLike = str | os.PathLike | Mapping


# --- loading -----------------------------------------------------------------------------------------

def load_run(run_dir: str | os.PathLike) -> dict:
    """Reads one run directory.

    Returns:
      ``{"dir": Path, "config": dict (config.yaml as written), "records": list of per-round
      dicts (metrics.jsonl), "summary": dict}``. ``summary`` is ``summary.json`` when the run
      has ended; otherwise a summary computed from the records with ``stop_reason: None``.

    Raises:
      FileNotFoundError: ``run_dir`` is not a run directory (no ``config.yaml`` or no ``metrics.jsonl``).
      ValueError: a line of ``metrics.jsonl`` is not JSON.
    """
    d = Path(run_dir)
    missing = [f for f in ("config.yaml", "metrics.jsonl") if not (d / f).is_file()]
    if missing:
        what = "does not exist" if not d.exists() else f"has no {' and no '.join(missing)}"
        raise FileNotFoundError(f"{d} is not a hfl-jax run directory: it {what} "
                                "(written by `hfl_jax.driver.run`)")
    config = yaml.safe_load((d / "config.yaml").read_text()) or {}
    records = []
    for i, line in enumerate((d / "metrics.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{d / 'metrics.jsonl'}:{i}: not a JSON record ({e.msg})") from None
    summary_path = d / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        summary = _summary_from(config, records)
    return {"dir": d, "config": config, "records": records, "summary": summary}




def tier_totals(records: Sequence[Mapping]) -> dict:
    """Traffic per tier (bytes, summed over rounds) and the simulated clock split into compute,
    device-edge and cloud seconds (summed over rounds' critical paths), from round records.
    Records written before the two-tier model have none of these fields: ``{}``."""
    if not records or any(k not in records[0] for k in TIER_BYTES + TIER_TIMES):
        return {}
    return {k: float(sum(r[k] for r in records)) for k in TIER_BYTES + TIER_TIMES}


def record_totals(records: Sequence[Mapping]) -> dict:
    """What a run's summary sums over its round records: rounds, the simulated clock, traffic (total
    and per tier: :func:`tier_totals`), rounds' wall time, and the final and best evaluation accuracy."""
    evals = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    out = {"rounds": len(records), "sim_time": records[-1]["sim_time"] if records else 0.0,
           "bytes_up": float(sum(r.get("bytes_up", 0.0) for r in records)),
           "bytes_down": float(sum(r.get("bytes_down", 0.0) for r in records)),
           **tier_totals(records),
           "wall_time": float(sum(r.get("wall_time", 0.0) for r in records))}
    if evals:
        out["final_accuracy"], out["best_accuracy"] = evals[-1], max(evals)
    return out


def _summary_from(config: Mapping, records: list) -> dict:
    """A summary for a run without summary.json (still running, or killed) from its records."""
    return {"name": config.get("name"), "algorithm": (config.get("algorithm") or {}).get("name"),
            "seed": config.get("seed"), **record_totals(records), "stop_reason": None}


def _as_run(run: RunLike) -> dict:
    return dict(run) if isinstance(run, Mapping) else load_run(run)


def _runs(dirs: RunLike | Sequence[RunLike]) -> list[dict]:
    if isinstance(dirs, (str, os.PathLike, Mapping)):
        dirs = [dirs]
    runs = [_as_run(d) for d in dirs]
    if not runs:
        raise ValueError("no run directories given")
    return runs


# --- per-run numbers ---------------------------------------------------------------------------------

def run_identity(run: Mapping) -> tuple[str, str, Any]:
    """``(name, algorithm, seed)`` of a loaded run (config first, then summary, then the folder name)."""
    cfg, summ = run["config"], run["summary"]
    name = cfg.get("name") or summ.get("name") or Path(run["dir"]).name
    algorithm = (cfg.get("algorithm") or {}).get("name") or summ.get("algorithm") or "?"
    seed = cfg.get("seed", summ.get("seed"))
    return str(name), str(algorithm), seed


def run_label(run: Mapping) -> str:
    """``"name / algorithm / seed s"``, the legend entry of a run."""
    name, algorithm, seed = run_identity(run)
    return f"{name} / {algorithm} / seed {seed}"


def evaluations(run: Mapping) -> np.ndarray:
    """``[n_eval, 3]`` float array of ``(round, sim_time, eval_accuracy)`` for the evaluated rounds."""
    rows = [(r["round"], r["sim_time"], r["eval_accuracy"]) for r in run["records"] if "eval_accuracy" in r]
    return np.asarray(rows, np.float64).reshape(-1, 3)


def run_stats(run: Mapping, target: float | None = None) -> dict:
    """Numbers of one run: ``final_accuracy``, ``best_accuracy`` (None without evaluation),
    ``rounds_to_target`` / ``time_to_target`` (the global round and cumulative simulated
    seconds of the first evaluation with accuracy >= ``target``; None if never reached or
    no target), ``traffic_mb`` ((up + down) bytes / 1e6, all levels), ``edge_mb`` / ``cloud_mb``
    (the device-edge and cloud tiers' share; None for runs recorded before the two-tier model),
    ``wall_time`` (s), ``rounds`` and ``sim_time``."""
    recs, ev = run["records"], evaluations(run)
    tiers = tier_totals(recs)
    out = {"final_accuracy": None, "best_accuracy": None, "rounds_to_target": None, "time_to_target": None,
           "traffic_mb": sum(r.get("bytes_up", 0.0) + r.get("bytes_down", 0.0) for r in recs) / MB,
           "wall_time": float(sum(r.get("wall_time", 0.0) for r in recs)), "rounds": len(recs),
           "sim_time": float(recs[-1]["sim_time"]) if recs else 0.0,
           "edge_mb": (tiers["edge_bytes_up"] + tiers["edge_bytes_down"]) / MB if tiers else None,
           "cloud_mb": (tiers["cloud_bytes_up"] + tiers["cloud_bytes_down"]) / MB if tiers else None}
    if len(ev):
        out["final_accuracy"], out["best_accuracy"] = float(ev[-1, 2]), float(ev[:, 2].max())
        if target is not None:
            hit = np.flatnonzero(ev[:, 2] >= target)
            if len(hit):
                out["rounds_to_target"], out["time_to_target"] = int(ev[hit[0], 0]), float(ev[hit[0], 1])
    return out


def default_target(runs: Sequence[Mapping]) -> float | None:
    """The highest accuracy every evaluated run reaches: ``min`` over runs of their best accuracy
    (runs without any evaluation are left out; None if no run has one)."""
    bests = [run_stats(r)["best_accuracy"] for r in runs]
    bests = [b for b in bests if b is not None]
    return min(bests) if bests else None


# --- grouping ----------------------------------------------------------------------------------------

def _flatten(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def group_runs(runs: Sequence[Mapping], group_by: str | Sequence[str] | None = None) -> list[tuple[str, list]]:
    """Rows of the comparison table: ``[(label, runs)]`` in order of first appearance.

    ``group_by=None`` (default): runs whose ``config.yaml`` is identical except for ``seed``
    share a row, labelled ``"name (algorithm)"``; when two different settings would get
    the same label, the config keys in which they differ are appended (``key=value``).
    ``group_by`` given (dotted config keys, a list or one comma-separated string, e.g.
    ``"partition.alpha"``; the CLI's ``--group-by``): runs share a row when they have the
    same ``algorithm.name`` and the same values of those keys, whatever else differs;
    ``group_by=()`` groups by algorithm alone.
    """
    flat = [_flatten(r["config"]) for r in runs]
    if group_by is not None:
        keys = [k.strip() for k in group_by.split(",") if k.strip()] if isinstance(group_by, str) else list(group_by)
        rows: dict = {}
        for r, f in zip(runs, flat):
            _, algorithm, _ = run_identity(r)
            rows.setdefault((algorithm, *[json.dumps(f.get(k), sort_keys=True) for k in keys]), []).append(r)
        return [(", ".join([key[0]] + [f"{k}={json.loads(v)}" for k, v in zip(keys, key[1:])]), rs)
                for key, rs in rows.items()]
    rows, configs = {}, {}
    for r, f in zip(runs, flat):
        setting = {k: v for k, v in f.items() if k != "seed"}
        key = json.dumps(setting, sort_keys=True, default=str)
        rows.setdefault(key, []).append(r)
        configs[key] = setting
    labels = {}
    for key, rs in rows.items():
        name, algorithm, _ = run_identity(rs[0])
        labels[key] = f"{name} ({algorithm})"
    out = []
    for key, rs in rows.items():
        twins = [k for k in rows if labels[k] == labels[key]]
        label = labels[key]
        if len(twins) > 1:
            all_keys = sorted(set().union(*(configs[k] for k in twins)))
            diff = [k for k in all_keys if len({json.dumps(configs[t].get(k), default=str) for t in twins}) > 1]
            label += ", " + ", ".join(f"{k}={configs[key].get(k)}" for k in diff)
        out.append((label, rs))
    return out


# --- the table ---------------------------------------------------------------------------------------

def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def _seconds_digits(values: Sequence[float | None]) -> int:
    """Decimals showing about 3 significant digits of the largest value (at least 1): simulated
    rounds of a tiny model take milliseconds, real ones minutes."""
    top = max([abs(v) for v in values if v is not None] + [0.0])
    return 1 if top == 0 else max(1, 2 - int(np.floor(np.log10(top))))


def _cell(values: Sequence[float | None], digits: int, integer: bool = False) -> str:
    """``mean ± std`` (sample std, ddof=1) of the non-None values; a single value alone
    (without decimals if ``integer`` and it is the only run); with some values None, the
    count that has one is appended; all None -> ``not reached``."""
    have = [float(v) for v in values if v is not None]
    if not have:
        return "not reached"
    if len(have) == 1:
        v = have[0]
        text = str(int(v)) if integer and len(values) == 1 else _num(v, digits)
    else:
        text = f"{_num(np.mean(have), digits)} ± {_num(np.std(have, ddof=1), digits)}"
    if len(have) < len(values):
        text += f" ({len(have)}/{len(values)} reached)"
    return text


def report_table(dirs: RunLike | Sequence[RunLike], target: float | None = None,
                 group_by: str | Sequence[str] | None = None) -> str:
    """A markdown table comparing runs, one row per setting (see :func:`group_runs`).

    Columns: seeds, final and best evaluation accuracy, global rounds and simulated
    seconds until the first evaluation with accuracy >= ``target`` ("not reached" if
    never; when only some seeds reach it, the mean over those and ``(k/n reached)``),
    traffic (total MB up + down, all levels, 1 MB = 1e6 bytes), wall time (s), and the traffic's
    device-edge and cloud tiers (MB; "n/a" for runs recorded before the two-tier model).
    A row of several runs shows ``mean ± std`` with the sample standard deviation (ddof=1).

    Args:
      dirs: run directories (or :func:`load_run` dicts); one directory is accepted too.
      target: accuracy target in [0, 1]; default: the highest accuracy that every run
        reaches, ``min`` over runs of their best accuracy (:func:`default_target`).
      group_by: see :func:`group_runs`.

    Returns:
      The table followed by lines saying which target was used and how cells are averaged.
    """
    runs = _runs(dirs)
    given = target is not None
    if not given:
        target = default_target(runs)
    head = ["run", "seeds", "final acc", "best acc", "rounds to target", "sim time to target (s)",
            "traffic (MB)", "wall time (s)", "device-edge (MB)", "cloud (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, rs in group_runs(runs, group_by):
        stats = [run_stats(r, target) for r in rs]
        evaluated = [s for s in stats if s["best_accuracy"] is not None]
        col = lambda k: [s[k] for s in evaluated]
        reach = evaluated and target is not None
        walls = [s["wall_time"] for s in stats]
        cells = [label.replace("|", "\\|"), ", ".join(str(run_identity(r)[2]) for r in rs),
                 _cell(col("final_accuracy"), 4) if evaluated else "n/a",
                 _cell(col("best_accuracy"), 4) if evaluated else "n/a",
                 _cell(col("rounds_to_target"), 1, integer=True) if reach else "n/a",
                 _cell(col("time_to_target"), _seconds_digits(col("time_to_target"))) if reach else "n/a",
                 _cell([s["traffic_mb"] for s in stats], 3), _cell(walls, _seconds_digits(walls)),
                 *[_cell([s[k] for s in stats], 3) if all(s[k] is not None for s in stats) else "n/a"
                   for k in ("edge_mb", "cloud_mb")]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if target is None:
        lines.append("Target accuracy: none (no run has an evaluation).")
    elif given:
        lines.append(f"Target accuracy: {target:.4f} (given).")
    else:
        lines.append(f"Target accuracy: {target:.4f} (default: the highest accuracy every run reaches, "
                     "min over runs of their best accuracy).")
    lines.append("Rows with several runs: mean ± sample std (ddof=1) over the runs; rounds and time to "
                 "target average over the runs that reached it.")
    return "\n".join(lines) + "\n"


# --- plots -------------------------------------------------------------------------------------------

def _figure(*args, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(*args, **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _labels(runs: Sequence[Mapping]) -> list[str]:
    labels = [run_label(r) for r in runs]
    return [f"{lab} [{Path(r['dir']).name}]" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def bandit_choices(run: Mapping) -> dict:
    """``{group: [(round, depth, tau, explore)]}`` for the groups whose arm a bandit chose
    (records with a ``reward``); empty for fixed-arm algorithms."""
    out: dict = {}
    for rec in run["records"]:
        for g in rec.get("groups", []):
            if not g.get("skipped") and "reward" in g:
                out.setdefault(g["group"], []).append((rec["round"], g["depth"], g["tau"], bool(g.get("explore"))))
    return out


def _plot_arms(run: Mapping, path: Path, label: str) -> Path:
    choices = bandit_choices(run)
    fig = _figure(figsize=(7.0, 5.0), dpi=100, layout="constrained")
    ax_d, ax_t = fig.subplots(2, 1, sharex=True)
    k_all = sorted(choices)
    for i, k in enumerate(k_all):
        c = np.asarray([row[:3] for row in choices[k]], np.float64)
        explore = np.asarray([row[3] for row in choices[k]], bool)
        # small vertical offsets keep groups that chose the same arm apart
        off = 0.06 * (i - (len(k_all) - 1) / 2)
        for ax, col in ((ax_d, 1), (ax_t, 2)):
            line, = ax.plot(c[:, 0], c[:, col] + off, drawstyle="steps-mid", alpha=0.5, label=f"group {k}")
            ax.scatter(c[~explore, 0], c[~explore, col] + off, color=line.get_color(), s=18)
            ax.scatter(c[explore, 0], c[explore, col] + off, facecolors="none", edgecolors=line.get_color(), s=18)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_d, ax_t):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_d.set_ylabel("depth (layers)")
    ax_t.set_ylabel("tau (intra-group rounds)")
    ax_t.set_xlabel("global round")
    ax_d.legend(fontsize="small", title="hollow: exploration", title_fontsize="small")
    fig.suptitle(f"bandit arm choices: {label}")
    return _save(fig, path)


def plot_runs(dirs: RunLike | Sequence[RunLike], out_dir: str | os.PathLike,
              target: float | None = None) -> list[Path]:
    """Writes PNG plots of runs into ``out_dir`` and returns their paths.

    * ``accuracy_vs_time.png``: evaluation accuracy against cumulative simulated seconds,
      one line per run (labelled ``name / algorithm / seed``), a dashed line at ``target`` if given;
    * ``accuracy_vs_rounds.png``: the same against global rounds;
    * per run with bandit-chosen arms: the depth and tau each group chose per round
      (``arms.png`` for a single run, else ``arms_<name>_<algorithm>_seed<s>.png``).

    Accuracy plots are skipped when no run has an evaluation, arm plots for fixed-arm
    algorithms. ``hfl_jax.driver`` calls ``plot_runs([run_dir], run_dir)`` after each run.
    """
    runs, out = _runs(dirs), Path(out_dir)
    labels = _labels(runs)
    written = []
    evs = [evaluations(r) for r in runs]
    if any(len(e) for e in evs):
        for fname, col, xlabel in (("accuracy_vs_time.png", 1, "simulated time (s)"),
                                   ("accuracy_vs_rounds.png", 0, "global round")):
            fig = _figure(figsize=(7.0, 4.5), dpi=100, layout="constrained")
            ax = fig.subplots()
            for ev, lab in zip(evs, labels):
                if len(ev):
                    ax.plot(ev[:, col], ev[:, 2], marker="o" if len(ev) < 30 else None, markersize=3, label=lab)
            if target is not None:
                ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.3f}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("evaluation accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            written.append(_save(fig, out / fname))
    bandit_runs = [(r, lab) for r, lab in zip(runs, labels) if bandit_choices(r)]
    used: set = set()
    for r, lab in bandit_runs:
        if len(runs) == 1:
            fname = "arms.png"
        else:
            name, algorithm, seed = run_identity(r)
            fname = f"arms_{_slug(f'{name}_{algorithm}_seed{seed}')}.png"
            stem, n = fname[:-4], 1
            while fname in used:
                n += 1
                fname = f"{stem}_{n}.png"
        used.add(fname)
        written.append(_plot_arms(r, out / fname, lab))
    return written


__all__ = ["MB", "bandit_choices", "default_target", "evaluations", "group_runs", "load_run", "plot_runs",
           "report_table", "run_identity", "run_label", "run_stats"]
