"""``hfl-jax`` command line: run, resume, report, partition, sweep (also ``python -m hfl_jax``)."""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path

EPILOG = "Config reference: README.md (section 'Configuration') and experiments/configs/*.yaml."


def _progress(stream=None):
    """``progress(event, info)`` for the driver: on a terminal a rich display (set-up spinner,
    compilation notice, round bar with ETA and the latest accuracy); elsewhere nothing
    (metrics.jsonl has every round). Returns ``(progress, stop)``; ``progress`` is None off a terminal."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return None, lambda: None
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
        TimeElapsedColumn, TimeRemainingColumn

    console = Console(file=stream)
    logger = logging.getLogger("hfl_jax")
    handler = RichHandler(console=console, show_time=False, show_path=False, show_level=False)
    logger.addHandler(handler)
    logger.propagate = False   # our lines go through rich, above the live display
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=console, transient=False)
    task = bar.add_task("set-up", total=None, acc="")
    bar.start()

    def show(event: str, info: dict) -> None:
        if event == "setup":
            bar.update(task, description=f"set-up: {info['what']}")
        elif event == "compile":
            bar.update(task, description="compiling the rounds' programs ahead of time",
                       total=info["total"], completed=info["done"])
        elif event == "round_start":
            what = f"round {info['round']}/{info['total']}"
            if info["compiling"]:   # the first group that draws a depth compiles it
                what += f": compiling the group round for depth {', '.join(map(str, info['compiling']))} (first use)"
            bar.update(task, description=what, total=info["total"], completed=info["round"] - 1)
        elif event == "round":
            rec = info["record"]
            acc = rec.get("eval_accuracy")
            bar.update(task, completed=rec["round"], description=f"round {rec['round']}/{info['total']}",
                       acc=f"acc {acc:.4f}" if acc is not None else "")

    def stop() -> None:
        bar.stop()
        logger.removeHandler(handler)
        logger.propagate = True
    return show, stop


def _fail(msg: str, code: int = 2) -> int:
    print(f"hfl-jax: error: {msg}", file=sys.stderr)
    return code


def _load(args, out=None):
    """The validated, preflighted config of ``args.config`` + ``--set`` overrides (and ``--out``
    ``out``), or an exit code after a one-line error."""
    from hfl_jax.config import ConfigError, load_config, preflight

    try:
        cfg = load_config(args.config, args.set or [])
        return preflight(cfg, out(cfg) if out else None)
    except ConfigError as e:
        return _fail(str(e))


def summary_table(summary: dict) -> str:
    """A readable end-of-run table of ``summary.json``."""
    from rich.console import Console
    from rich.table import Table

    def num(k, fmt):
        v = summary.get(k)
        return "-" if v is None else format(v, fmt)
    t = Table(title=f"{summary['name']} ({summary['algorithm']}, seed {summary['seed']})", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    rows = [("rounds", f"{summary['rounds']} (stop: {summary.get('stop_reason')})"),
            ("final accuracy", num("final_accuracy", ".4f")), ("best accuracy", num("best_accuracy", ".4f")),
            ("final eval loss", num("final_loss", ".4f")),
            ("simulated time", f"{summary['sim_time']:.2f} s"),
            ("traffic up / down", f"{summary['bytes_up'] / 1e6:.2f} / {summary['bytes_down'] / 1e6:.2f} MB"),
            ("dropped device updates", f"{summary.get('dropped_updates', 0)} of {summary.get('device_updates', 0)}"),
            ("wall time", f"{summary['wall_time']:.1f} s (rounds {summary.get('rounds_wall_time', 0):.1f} s)")]
    if "target_accuracy" in summary:
        rows.append(("rounds to target", f"{summary['rounds_to_target']} (target {summary['target_accuracy']})"))
    for r in rows:
        t.add_row(*r)
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(t)
    return console.export_text().rstrip()


def _report(summary: dict, out: Path, as_json: bool) -> None:
    print(json.dumps(summary, indent=2) if as_json else summary_table(summary))
    print(f"done: final accuracy {summary.get('final_accuracy', float('nan')):.4f}, "
          f"{summary.get('dropped_updates', 0)} of {summary.get('device_updates', 0)} device updates dropped "
          f"as non-finite, {summary['wall_time']:.1f} s; run directory: {out}")


def _train(args, fn, out: Path) -> int:
    from hfl_jax.driver import TrainingHealthError, is_main_process

    args.run_dir = out   # for the interrupt hint
    progress, stop = (None, lambda: None) if args.quiet else _progress()
    try:
        summary = fn(progress)
    except TrainingHealthError as e:
        return _fail(str(e), code=1)
    finally:
        stop()
    if is_main_process():   # one report per run, not one per process
        _report(summary, out, args.json)
    return 0


def cmd_run(args) -> int:
    from hfl_jax import driver

    cfg = _load(args, out=lambda cfg: Path(args.out) if args.out else Path("runs") / cfg.name)
    if isinstance(cfg, int):
        return cfg
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    return _train(args, lambda progress: driver.run(cfg, out, progress=progress, plots=not args.no_plots), out)


def cmd_resume(args) -> int:
    from hfl_jax import driver

    out = Path(args.dir)
    if not (out / "config.yaml").is_file():
        return _fail(f"{out} has no config.yaml: not a hfl-jax run directory")
    return _train(args, lambda progress: driver.resume(out, progress=progress, plots=not args.no_plots), out)


def cmd_sweep(args) -> int:
    from hfl_jax import study_report, sweep
    from hfl_jax.config import ConfigError

    try:
        study = sweep.load_study(args.study)
    except ConfigError as e:
        return _fail(str(e))

    def notify(status, run, i, n):
        verb = {"done": "skip  ", "partial": "resume", "new": "run   "}[status]
        what = f"{run.stage} {i + 1}/{n}: {run.setting} / {run.method} / seed {run.seed}"
        value = "" if run.value is None else f" / {study.tune.key}={run.value}"
        print(f"{verb} {what}{value}  ({run.out.relative_to(study.out)})", flush=True)

    try:
        shard = sweep.parse_shard(args.shard) if args.shard else (0, 1)
    except ValueError as e:
        return _fail(f"--shard: {e}")
    if not args.report_only:
        planned = sweep.sweep(study, notify=notify, dry_run=args.dry_run, shard=shard, plots=not args.no_plots)
        if args.dry_run:
            counts = {k: sum(1 for _, s in planned if s == k) for k in ("done", "partial", "new")}
            seconds, based_on = sweep.remaining_time(planned)
            eta = (f"; about {seconds / 3600:.1f} run-hours left (each unfinished run at the median wall time of "
                   f"its finished peers, {based_on} finished runs; shards running side by side share them)"
                   if seconds is not None else "")
            print(f"{counts['done']} done, {counts['partial']} partial, {counts['new']} new of {len(planned)}"
                  f"{' (this shard)' if shard[1] > 1 else ''}{eta}", flush=True)
        if shard[1] > 1 and not args.dry_run and not sweep.tuning_finished(study):
            print(f"shard {shard[0]}/{shard[1]}: tuning runs of other shards are unfinished; "
                  "rerun this command once they are to run this shard's final runs", flush=True)
    if args.dry_run:
        return 0
    text = study_report.study_report(study)
    path = study.out / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    from hfl_jax.files import write_atomic

    write_atomic(path, lambda f: f.write(text.encode()))   # shards finishing together never mix a file
    print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from hfl_jax import report

    try:
        print(report.report_table(args.dirs, target=args.target))
        paths = report.plot_runs(args.dirs, Path(args.out), target=args.target)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_partition(args) -> int:
    from hfl_jax import driver

    cfg = _load(args)
    if isinstance(cfg, int):
        return cfg
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-partition"
    if out.exists() and not out.is_dir():
        return _fail(f"--out: {out} is a file, not a directory")
    exp = driver.build(cfg)
    out.mkdir(parents=True, exist_ok=True)
    info = driver.write_partition(exp, out)
    dev, groups = info["devices"], info["groups"]
    print(f"{len(exp.parts)} devices, {len(exp.label_names)} classes {list(exp.label_names)}; "
          f"mean device KL to global {dev['mean_kl']:.4f}")
    print("group  devices  samples  KL")
    for k, (size, samples, kl) in enumerate(zip(groups["sizes"], groups["samples"], groups["kl"])):
        print(f"{k:5d}  {int(size):7d}  {int(samples):7d}  {kl:.5f}")
    print(f"wrote {out / 'partition.png'} and {out / 'partition.json'}")
    return 0


def _launch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-host", "Start the same command once per process (host), each with its own --process-id; with none "
        "of these (and HFL_DISTRIBUTED unset) the run is one process. README.md, 'Runs on several hosts'.")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address, reachable from every process (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1 (env JAX_PROCESS_ID)")
    g.add_argument("--coordinator-timeout", type=float, metavar="SECONDS",
                   help="how long every process waits for all of them to join (env HFL_COORDINATOR_TIMEOUT; "
                        "default 300)")


def start_processes(args, environ) -> int:
    """Joins the run's other processes (``jax.distributed.initialize``) when ``run``/``resume``
    was given a multi-host option or variable, or ``HFL_DISTRIBUTED=1`` (values missing: JAX's
    cluster auto-detection). 0, or 2 after a one-line error naming the option."""
    from hfl_jax import multihost

    try:
        launch = multihost.from_options(args.coordinator, args.num_processes, args.process_id,
                                        args.coordinator_timeout, environ)
        given = any(v is not None for v in (launch.coordinator, launch.num_processes, launch.process_id))
        if given or environ.get("HFL_DISTRIBUTED") == "1":
            multihost.initialize(launch)
    except multihost.LaunchError as e:
        return _fail(str(e))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfl-jax", description="HierFedLoRA federated fine-tuning simulator (JAX).",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run an experiment from a YAML config", epilog=EPILOG,
                       description="Run an experiment. Writes config.yaml, metrics.jsonl, summary.json, plots, "
                                   "partition.png/json and orbax checkpoints into the run directory.")
    r.add_argument("config", help="experiment YAML file (e.g. experiments/configs/smoke.yaml)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.rounds=4 --set lora.targets=[query,value] "
                        "(repeatable; values are parsed as YAML)")
    r.add_argument("--out", help="run directory (default: runs/<config name>); must not hold another run")
    r.add_argument("--quiet", action="store_true", help="no progress display (there is none off a terminal)")
    r.add_argument("--no-plots", action="store_true", help="draw no PNGs (hfl-jax report RUN --out RUN draws the run's plots later)")
    r.add_argument("--json", action="store_true", help="print the final summary as JSON instead of a table")
    _launch_options(r)
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint",
                       description="Continue the run in DIR from its last complete checkpoint; the result is "
                                   "bit-identical to an uninterrupted run.")
    s.add_argument("dir", help="run directory written by `hfl-jax run`")
    s.add_argument("--quiet", action="store_true", help="no progress display (there is none off a terminal)")
    s.add_argument("--no-plots", action="store_true", help="draw no PNGs (hfl-jax report RUN --out RUN draws the run's plots later)")
    s.add_argument("--json", action="store_true", help="print the final summary as JSON instead of a table")
    _launch_options(s)
    s.set_defaults(fn=cmd_resume)

    t = sub.add_parser("report", help="compare runs: table and plots",
                       description="Print a comparison table (final/best accuracy, simulated time and rounds to a "
                                   "target accuracy, traffic) and save plots.")
    t.add_argument("dirs", nargs="+", help="run directories")
    t.add_argument("--target", type=float, default=None,
                   help="target accuracy for time/rounds-to-target (default: the best accuracy every run reaches)")
    t.add_argument("--out", default=".", help="directory for the PNG plots (default: current directory)")
    t.set_defaults(fn=cmd_report)

    w = sub.add_parser("sweep", help="run a study (methods x settings x seeds, tuned on a validation split)",
                       description="Run every run of a study file that is not finished (finished runs are "
                                   "skipped, interrupted ones resumed), then write <out>/report.md. See README, "
                                   "'Studies'.")
    w.add_argument("study", help="study YAML file (e.g. experiments/studies/fidelity.yaml)")
    w.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    w.add_argument("--report-only", action="store_true", help="write the report from the finished runs only")
    w.add_argument("--no-plots", action="store_true", help="the runs draw no PNGs (the report needs none)")
    w.add_argument("--shard", metavar="I/N", help="run only this process's share of the runs (positions I, I+N, ...; "
                   "0 <= I < N): N processes sharing the study folder run it together; run --report-only once all "
                   "have finished for the complete report")
    w.set_defaults(fn=cmd_sweep)

    q = sub.add_parser("partition", help="show and save the data partition and groups without training",
                       description="Build the partition and groups of a config; print per-group KL and sizes; "
                                   "save partition.png (label heat map, KL per device) and partition.json.")
    q.add_argument("config", help="experiment YAML file")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    q.add_argument("--out", help="output directory (default: runs/<config name>-partition)")
    q.set_defaults(fn=cmd_partition)
    return p


def enable_compilation_cache() -> None:
    """Persist compiled XLA executables across runs (``$HFL_JAX_CACHE``, default
    ``~/.cache/hfl_jax/xla``; ``HFL_JAX_CACHE=off`` disables). Results are unchanged:
    the cache only skips recompiling the same programs."""
    import os

    import jax

    path = os.environ.get("HFL_JAX_CACHE", str(Path.home() / ".cache" / "hfl_jax" / "xla"))
    if path.lower() in ("off", "0", "none", ""):
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("hfl_jax").setLevel(logging.INFO)   # our progress lines; libraries stay at WARNING
    args = build_parser().parse_args(argv)
    import os

    if args.command in ("run", "resume"):   # multi-host: the same command on every process
        code = start_processes(args, os.environ)
        if code:
            return code
    if args.command in ("run", "resume", "partition", "sweep"):
        enable_compilation_cache()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        run_dir = getattr(args, "run_dir", None)
        hint = f"`hfl-jax resume {run_dir}` continues from the last checkpoint" if run_dir else "nothing was written"
        return _fail(f"interrupted; {hint}", code=130)
    except Exception as e:  # one line for users; HFL_DEBUG=1 shows the traceback
        if os.environ.get("HFL_DEBUG") == "1":
            raise
        from hfl_jax.data.tasks import DataError, DataNotFoundError
        first = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, (DataError, DataNotFoundError)):   # the message names the file and row
            return _fail(first)
        return _fail(f"{type(e).__name__}: {first} (HFL_DEBUG=1 shows the traceback)")


if __name__ == "__main__":
    sys.exit(main())
