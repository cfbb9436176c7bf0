"""``hfl-jax`` command line: run, resume, report, partition (also ``python -m hfl_jax``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

EPILOG = "Config reference: README.md (section 'Configuration') and experiments/configs/*.yaml."


def _progress(total_rounds: int, stream=sys.stderr):
    """A one-line progress bar on a terminal; one log line per round otherwise."""
    tty = stream.isatty()
    start = time.perf_counter()

    def show(rec: dict) -> None:
        acc = rec.get("eval_accuracy")
        acc_s = f"acc {acc:.4f}" if acc is not None else "acc   -   "
        line = (f"round {rec['round']}/{total_rounds}  {acc_s}  sim {rec['sim_time']:.1f}s  "
                f"wall {time.perf_counter() - start:.0f}s")
        if tty:
            width = 20
            done = int(width * rec["round"] / max(total_rounds, 1))
            stream.write("\r[" + "#" * done + "." * (width - done) + "] " + line)
            if rec["round"] >= total_rounds:
                stream.write("\n")
            stream.flush()
        else:
            logging.getLogger("hfl_jax").info(line)
    return show


def _fail(msg: str) -> int:
    print(f"hfl-jax: error: {msg}", file=sys.stderr)
    return 2


def _load(args):
    """The validated config of ``args.config`` + ``--set`` overrides, or an exit code after a one-line error."""
    from hfl_jax.config import ConfigError, load_config

    try:
        return load_config(args.config, args.set or [])
    except ConfigError as e:
        return _fail(str(e))


def cmd_run(args) -> int:
    from hfl_jax import driver

    cfg = _load(args)
    if isinstance(cfg, int):
        return cfg
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    summary = driver.run(cfg, out, progress=None if args.quiet else _progress(cfg.train.rounds))
    print(json.dumps(summary, indent=2))
    print(f"run directory: {out}")
    return 0


def cmd_resume(args) -> int:
    from hfl_jax import driver
    from hfl_jax.config import load_config

    out = Path(args.dir)
    try:
        rounds = load_config(out / "config.yaml").train.rounds if (out / "config.yaml").is_file() else 0
        summary = driver.resume(out, progress=None if args.quiet else _progress(rounds))
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        return _fail(str(e))
    print(json.dumps(summary, indent=2))
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
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint",
                       description="Continue the run in DIR from its last complete checkpoint; the result is "
                                   "bit-identical to an uninterrupted run.")
    s.add_argument("dir", help="run directory written by `hfl-jax run`")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(fn=cmd_resume)

    t = sub.add_parser("report", help="compare runs: table and plots",
                       description="Print a comparison table (final/best accuracy, simulated time and rounds to a "
                                   "target accuracy, traffic) and save plots.")
    t.add_argument("dirs", nargs="+", help="run directories")
    t.add_argument("--target", type=float, default=None,
                   help="target accuracy for time/rounds-to-target (default: the best accuracy every run reaches)")
    t.add_argument("--out", default=".", help="directory for the PNG plots (default: current directory)")
    t.set_defaults(fn=cmd_report)

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

    if os.environ.get("HFL_DISTRIBUTED") == "1":   # multi-host: one process per host, same command
        import jax
        jax.distributed.initialize()
    if args.command in ("run", "resume", "partition"):
        enable_compilation_cache()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return _fail("interrupted; `hfl-jax resume DIR` continues from the last checkpoint")
    except Exception as e:  # one line for users; HFL_DEBUG=1 shows the traceback
        if os.environ.get("HFL_DEBUG") == "1":
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        return _fail(f"{type(e).__name__}: {first} (HFL_DEBUG=1 shows the traceback)")


if __name__ == "__main__":
    sys.exit(main())
