"""Studies: methods x settings x seeds, with a learning-rate search on a validation split, run
resumably, then one report (``hfl-jax sweep STUDY.yaml``).

A study file (see ``experiments/studies/*.yaml`` and README "Studies")::

    name: sst2
    base: ../configs/study/sst2.yaml      # the experiment config every run starts from
    out: ../results/study_sst2            # runs, tuning runs and report.md go here
    seeds: [0, 1, 2, 3, 4]
    reference: hierfedlora                # paired differences and speed-ups are against it
    targets: [0.70, 0.75, 0.80]           # time-to-accuracy targets (evaluation accuracy)
    tune: {key: train.lr, grid: [3.0e-4, 1.0e-3, 3.0e-3], seeds: [0], last: 3}
    settings:
      alpha0.1: {partition.alpha: 0.1}                                    # overrides of the base
      alpha1.0: {set: {partition.alpha: 1.0}, tuned_in: alpha0.1}         # reuse alpha0.1's tuned values
      agnews: {base: ../configs/study/agnews.yaml, set: {partition.alpha: 0.1}}   # another base
    methods:
      hierfedlora: {}
      fedlora: {set: {algorithm.name: fedlora}}
      fedlora_at_hier_lr: {set: {algorithm.name: fedlora}, lr_from: hierfedlora, seeds: [0, 1, 2]}

Tuning protocol: for each setting and each method without ``lr_from``, every value of the grid
is run with the tuning seeds and ``data.evaluate: validation`` (a validation set carved from the
training split; ``data.validation_size`` must be set in the base config); the value with the
highest mean validation accuracy over the last ``last`` evaluations wins (ties: the smaller
value). The final runs use it and are evaluated on the task's evaluation split, which the tuning
never reads. A setting with ``tuned_in: S`` runs no tuning of its own and takes setting S's values. A method with ``lr_from: M`` takes method M's chosen value (controls at another
method's learning rate).

Several processes can share a study folder with ``hfl-jax sweep STUDY.yaml --shard I/N`` (each runs
the runs at positions I, I+N, ... of each stage; see :func:`sweep`).

Everything here is deterministic: a finished run (``summary.json`` present, same config) is
skipped; an interrupted one is resumed from its checkpoint; the report is a pure function of
the runs' ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and ``provenance.jsonl`` files, so a rerun of a finished
study rewrites ``report.md`` byte for byte.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from hfl_jax.config import (ALGORITHM_SECTIONS, MAYBE_PATH_KEYS, PATH_KEYS, ConfigError, ExperimentConfig,
                            from_dict, load_config, parent_node, read_run_dict, to_dict)


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    key: str = "train.lr"               # the hyperparameter searched
    grid: tuple = ()                    # its values
    seeds: tuple = (0,)                 # tuning seeds (their runs read only the validation split)
    last: int = 3                       # score = mean validation accuracy of the last `last` evaluations


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    overrides: tuple = ()               # ("key=value", ...) over the base config and the setting
    seeds: Optional[tuple] = None       # None: the study's seeds
    lr_from: Optional[str] = None       # take this method's tuned value instead of searching


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    base: Path                          # experiment config every run starts from
    out: Path                           # the study's directory
    seeds: tuple
    settings: tuple                     # ((name, ("key=value", ...)), ...)
    methods: tuple                      # ((name, MethodSpec), ...)
    tune: Optional[TuneSpec] = None
    reference: Optional[str] = None
    targets: tuple = ()
    setting_bases: tuple = ()           # ((name, Path), ...): settings with their own base config
    tuned_in: tuple = ()                # ((name, other setting), ...): settings reusing another's tuning


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the plan."""
    stage: str                          # "tune" or "final"
    setting: str
    method: str
    seed: int
    value: Any                          # the tuned key's value (None: the base config's)
    out: Path


def _overrides(mapping: Any, where: str) -> tuple:
    if mapping is None:
        return ()
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: expected a mapping of config keys to values, got {mapping!r}")
    return tuple(f"{k}={json.dumps(v)}" for k, v in mapping.items())


def _seeds(value: Any, where: str) -> tuple:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and s >= 0 for s in value):
        raise ConfigError(f"{where}: expected a non-empty list of seeds (integers >= 0), got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: seeds repeat: {value}")
    return tuple(value)


def load_study(path: str | Path) -> Study:
    """A study file as a :class:`Study` (paths relative to the file); bad input raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    known = {"name", "base", "out", "seeds", "settings", "methods", "tune", "reference", "targets"}
    if not isinstance(raw, dict) or set(raw) - known:
        raise ConfigError(f"{path}: unknown keys {sorted(set(raw) - known) if isinstance(raw, dict) else raw!r} "
                          f"(known: {', '.join(sorted(known))})")
    for key in ("name", "base", "out", "methods"):
        if key not in raw:
            raise ConfigError(f"{path}: '{key}' is missing")
    base = (path.parent / raw["base"]).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base: {base} does not exist")
    methods = []
    for name, spec in (raw["methods"] or {}).items():
        spec = spec or {}
        extra = set(spec) - {"set", "seeds", "lr_from"}
        if extra:
            raise ConfigError(f"{path}: methods.{name}: unknown keys {sorted(extra)} (known: set, seeds, lr_from)")
        methods.append((str(name), MethodSpec(_overrides(spec.get("set"), f"methods.{name}.set"),
                                              _seeds(spec["seeds"], f"methods.{name}.seeds") if "seeds" in spec
                                              else None, spec.get("lr_from"))))
    if not methods:
        raise ConfigError(f"{path}: methods: no method given")
    names = [m for m, _ in methods]
    for m, spec in methods:
        if spec.lr_from is not None and (spec.lr_from not in names or dict(methods)[spec.lr_from].lr_from):
            raise ConfigError(f"methods.{m}.lr_from: {spec.lr_from!r} is not a tuned method of this study")
    tune = None
    if raw.get("tune"):
        t = dict(raw["tune"])
        extra = set(t) - {"key", "grid", "seeds", "last"}
        if extra:
            raise ConfigError(f"{path}: tune: unknown keys {sorted(extra)}")
        if not isinstance(t.get("grid"), list) or not t["grid"]:
            raise ConfigError(f"{path}: tune.grid: expected a non-empty list of values")
        tune = TuneSpec(t.get("key", "train.lr"), tuple(t["grid"]), _seeds(t.get("seeds", [0]), "tune.seeds"),
                        int(t.get("last", 3)))
    reference = raw.get("reference")
    if reference is not None and reference not in names:
        raise ConfigError(f"{path}: reference: {reference!r} is not one of the methods ({', '.join(names)})")
    settings, bases, tuned_in = [], [], []
    raw_settings = raw.get("settings") or {"all": {}}
    for k, v in raw_settings.items():
        if isinstance(v, Mapping) and ("base" in v or "set" in v or "tuned_in" in v):   # structured form
            extra = set(v) - {"base", "set", "tuned_in"}
            if extra:
                raise ConfigError(f"{path}: settings.{k}: unknown keys {sorted(extra)} (known: base, set, tuned_in)")
            if "base" in v:
                own = (path.parent / v["base"]).resolve()
                if not own.is_file():
                    raise ConfigError(f"{path}: settings.{k}.base: {own} does not exist")
                bases.append((str(k), own))
            if "tuned_in" in v:
                src = v["tuned_in"]
                if src not in raw_settings or (isinstance(raw_settings[src], Mapping) and "tuned_in" in raw_settings[src]):
                    raise ConfigError(f"{path}: settings.{k}.tuned_in: {src!r} is not a setting with its own tuning")
                tuned_in.append((str(k), str(src)))
            v = v.get("set")
        settings.append((str(k), _overrides(v, f"settings.{k}")))
    targets = tuple(float(x) for x in raw.get("targets") or ())
    return Study(str(raw["name"]), base, (path.parent / raw["out"]).resolve(), _seeds(raw.get("seeds"), "seeds"),
                 tuple(settings), tuple(methods), tune, reference, targets, tuple(bases), tuple(tuned_in))


# --- the plan ------------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def tuning_runs(study: Study) -> list[Run]:
    """The learning-rate search: every (setting, tuned method, grid value, tuning seed)."""
    if study.tune is None:
        return []
    t = study.tune
    return [Run("tune", s, m, seed, v, study.out / "tune" / s / m / f"{t.key}={_fmt(v)}_s{seed}")
            for s, _ in study.settings if s not in dict(study.tuned_in)
            for m, spec in study.methods if spec.lr_from is None
            for v in t.grid for seed in t.seeds]


def final_runs(study: Study, chosen: Mapping[tuple, Any]) -> list[Run]:
    """The reported runs: every (setting, method, seed) at its chosen value (``chosen[(setting,
    method)]``; methods with ``lr_from`` read their source's). Ordered setting, then seed, then method,
    so that an interrupted study has the same seeds of every method (paired comparisons) so far."""
    out = []
    for s, _ in study.settings:
        all_seeds = sorted({seed for _, spec in study.methods for seed in (spec.seeds or study.seeds)})
        for seed in all_seeds:
            for m, spec in study.methods:
                if seed not in (spec.seeds or study.seeds):
                    continue
                value = chosen.get((dict(study.tuned_in).get(s, s), spec.lr_from or m)) if study.tune else None
                out.append(Run("final", s, m, seed, value, study.out / "runs" / s / m / f"s{seed}"))
    return out


def run_config(study: Study, run: Run) -> ExperimentConfig:
    """The run's experiment config: base, then the setting's and the method's overrides, the seed,
    the tuned value, and for tuning runs ``data.evaluate: validation``."""
    setting = dict(study.settings)[run.setting]
    method = dict(study.methods)[run.method]
    over = [*setting, *method.overrides, f"seed={run.seed}", f"name={study.name}_{run.setting}_{run.method}"]
    if run.value is not None:
        over.append(f"{study.tune.key}={json.dumps(run.value)}")
    if run.stage == "tune":
        over.append("data.evaluate=validation")
    return load_config(dict(study.setting_bases).get(run.setting, study.base), over)


def _comparable(cfg: Mapping) -> dict:
    """A config dict with its file paths cut to their last two parts (a study moved to another
    checkout still recognises its runs) and without the algorithm sections the run's algorithm does
    not read (:data:`~hfl_jax.config.ALGORITHM_SECTIONS`)."""
    cfg = json.loads(json.dumps(cfg))
    algo = cfg.get("algorithm")
    if isinstance(algo, dict):   # a section only another algorithm reads does not make another run
        for section, owner in ALGORITHM_SECTIONS.items():
            if algo.get("name") != owner:
                algo.pop(section, None)
    for keys in PATH_KEYS + MAYBE_PATH_KEYS:
        node = parent_node(cfg, keys)
        if node is not None and isinstance(node.get(keys[-1]), str) and "/" in node[keys[-1]]:
            node[keys[-1]] = "/".join(Path(node[keys[-1]]).parts[-2:])
    return cfg


def run_status(run: Run, cfg: ExperimentConfig) -> str:
    """``"done"`` (summary.json and the same config), ``"partial"`` (started, no summary) or ``"new"``.
    A run directory holding another config raises: the study file changed under a finished run. A
    config field added to hfl_jax after the run was written is compared at its default value."""
    cfg_path = run.out / "config.yaml"
    if not cfg_path.is_file():
        return "new"
    # through the dataclasses, so a field added since the run was written compares at its default
    # (or at the behaviour the run had, where a default changed: config.RUN_LEGACY_DEFAULTS)
    try:
        have = to_dict(from_dict(ExperimentConfig, read_run_dict(run.out)))
    except ConfigError as e:
        raise ConfigError(f"{run.out}: its config.yaml no longer reads ({e}); move the run away") from None
    if _comparable(have) != _comparable(to_dict(cfg)):
        raise ConfigError(f"{run.out} holds a run of another config than the study now asks for; "
                          "move it away or restore the study file")
    return "done" if (run.out / "summary.json").is_file() else "partial"


def execute(run: Run, cfg: ExperimentConfig, status: str, plots: bool = True) -> None:
    """Runs (``new``) or resumes (``partial``) one run; a finished one is left alone. ``plots``:
    whether the run draws its PNGs (the study report needs none of them)."""
    from hfl_jax import driver

    if status == "new":
        if run.out.exists() and any(run.out.iterdir()):
            # started but killed before its config was written: nothing to keep
            import shutil
            shutil.rmtree(run.out)
        driver.run(cfg, run.out, plots=plots)
    elif status == "partial":
        driver.resume(run.out, plots=plots)


# --- tuning ----------------------------------------------------------------------------------------------

def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def last_mean(records: list[dict], last: int) -> float | None:
    """Mean evaluation accuracy of the last ``last`` evaluated rounds of ``records`` (a run's
    ``metrics.jsonl`` lines); None if no round was evaluated. The tuning's score, and the study
    report's last-k column on the reported split."""
    accs = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    return float(np.mean(accs[-last:])) if accs else None


def tuning_score(out: Path, last: int) -> float:
    """Mean evaluation (validation) accuracy of a tuning run's last ``last`` evaluations."""
    score = last_mean(_records(out), last)
    if score is None:
        raise ValueError(f"{out}: no evaluation recorded; a tuning run must evaluate (train.eval_every)")
    return score


def choose(study: Study, *, finished_only: bool = False) -> tuple[dict, dict]:
    """``(chosen, scores)``: per (setting, method) the grid value with the best mean tuning score
    over the tuning seeds (ties: the smaller value), and every ``scores[(setting, method)][value]``.
    Needs every tuning run finished, unless ``finished_only``: then unfinished runs are left out of
    the scores and a (setting, method) is chosen only once all of its runs have finished."""
    scores: dict = {}
    complete: dict = {}
    for run in tuning_runs(study):
        key = (run.setting, run.method)
        if finished_only and not (run.out / "summary.json").is_file():
            complete[key] = False
            continue
        complete.setdefault(key, True)
        scores.setdefault(key, {}).setdefault(run.value, []).append(tuning_score(run.out, study.tune.last))
    chosen = {}
    for key, by_value in scores.items():
        means = {v: float(np.mean(s)) for v, s in by_value.items()}
        if complete[key]:
            chosen[key] = min(means, key=lambda v: (-means[v], v))
        scores[key] = means
    return chosen, scores


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``; ``ValueError`` unless ``0 <= I < N``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = 0, 0
    _check_shard((i, n), text)
    return i, n


def _check_shard(shard: tuple[int, int], shown: Any) -> None:
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"expected I/N with 0 <= I < N, got {shown!r}")


def tuning_finished(study: Study) -> bool:
    """Whether every tuning run of the study has finished (its ``summary.json`` is there)."""
    return all((run.out / "summary.json").is_file() for run in tuning_runs(study))


def remaining_time(planned: list[tuple[Run, str]]) -> tuple[float | None, int]:
    """Estimated wall seconds of the unfinished runs among ``planned`` (``[(run, status)]``, as
    :func:`sweep` returns), and how many finished runs the estimate rests on (``None`` seconds: none).

    Each unfinished run counts the median ``wall_time`` (its ``summary.json``) of the finished runs of its
    (setting, method), else of its setting, else of all of them; a partial run only the share of rounds
    it has left (its ``metrics.jsonl`` lines against those runs' median ``rounds``). Runs that ran side
    by side took longer each, so the estimate is per process at the concurrency they had."""
    finished = {}
    for run, _ in planned:
        path = run.out / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            finished[run] = (float(summary["wall_time"]), int(summary["rounds"]))
    if not finished:
        return None, 0
    total = 0.0
    for run, status in planned:
        if run in finished:
            continue
        pool = ([v for r, v in finished.items() if (r.setting, r.method) == (run.setting, run.method)]
                or [v for r, v in finished.items() if r.setting == run.setting] or list(finished.values()))
        wall, rounds = float(np.median([w for w, _ in pool])), float(np.median([n for _, n in pool]))
        left = 1.0
        metrics = run.out / "metrics.jsonl"
        if status == "partial" and metrics.is_file():
            done_rounds = sum(1 for line in metrics.read_text().splitlines() if line.strip())
            left = max(0.0, 1.0 - done_rounds / max(rounds, 1.0))
        total += wall * left
    return total, len(finished)


def sweep(study: Study, *, notify: Callable[[str, Run, int, int], None] = lambda *a: None,
          dry_run: bool = False, shard: tuple[int, int] = (0, 1), plots: bool = True) -> list[tuple[Run, str]]:
    """Runs the study's tuning runs, then its final runs (each skipped when finished, resumed when
    interrupted), and returns ``[(run, status before)]``. ``notify(status, run, i, n)`` is called before
    each run. ``dry_run``: statuses only (needs the tuning runs finished to plan the final ones).

    ``shard=(i, n)``: this process takes the runs at positions ``i, i + n, i + 2n, ...`` of each stage,
    so ``n`` processes (cores, accelerators or hosts sharing the study's folder) run a study together,
    none touching another's runs. A shard whose tuning share is done waits for no one: it runs its
    final share only once every tuning run has finished (rerun it then); the report is a pure
    function of the finished runs, whichever process writes it. ``plots=False``: the runs draw no
    PNGs (seconds each; the report needs none)."""
    _check_shard(shard, shard)
    i_shard, n_shard = shard
    done = []

    def stage(runs: list) -> None:
        for i, run in enumerate(runs):
            if i % n_shard != i_shard:
                continue
            cfg = run_config(study, run)
            status = run_status(run, cfg)
            notify(status, run, i, len(runs))
            if not dry_run:
                execute(run, cfg, status, plots)
            done.append((run, status))

    stage(tuning_runs(study))
    if dry_run and any(s != "done" for _, s in done):
        return done
    if n_shard > 1 and not tuning_finished(study):
        return done   # another shard's tuning runs are unfinished: the final runs cannot be planned yet
    stage(final_runs(study, choose(study)[0] if study.tune else {}))
    return done
