"""The hfl-jax command line and driver: smoke run, exact resume after SIGKILL, config errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "smoke.yaml"
ROUNDS = 15   # smoke.yaml's train.rounds


def hfl(*args, env=None, timeout=600, cwd=ROOT):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "hfl_jax", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The README's smoke command, run from another working directory (config-relative data paths)."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    out = tmp_path_factory.mktemp("runs") / "smoke"
    r = hfl("run", SMOKE, "--out", out, "--quiet", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert "done: final accuracy" in r.stdout and "dropped" in r.stdout
    return out


def _records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _final_adapters(run_dir):
    from hfl_jax import checkpoint as ckpt
    mgr = ckpt.manager(run_dir / "checkpoints", 10)
    step = mgr.latest_step()
    restored = mgr.restore(step)   # raw restore: nested dict of numpy arrays
    return step, restored


def test_smoke_run_writes_the_run_directory(smoke_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "partition.png", "partition.json"):
        assert (smoke_run / name).is_file(), name
    records = _records(smoke_run)
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    for r in records:
        assert r["sim_time"] > 0 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert 0 <= r["eval_accuracy"] <= 1 and np.isfinite(r["eval_loss"])
        for g in r["groups"]:
            assert g["skipped"] or (g["depth"] in (1, 2) and g["tau"] in (1, 2) and g["time"] > 0)
    assert all(b > a for a, b in zip([r["sim_time"] for r in records], [r["sim_time"] for r in records][1:]))
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and summary["final_accuracy"] == records[-1]["eval_accuracy"]
    assert summary["dropped_updates"] == 0 and summary["device_updates"] == 8 * ROUNDS
    assert summary["wall_time"] > summary["rounds_wall_time"] > 0   # the whole command, set-up included
    from hfl_jax import __version__, provenance
    (line,) = provenance.read(smoke_run)   # which code ran it: one line per start/resume
    assert line["event"] == "start" and line["round"] == 0 and line["hfl_jax"] == __version__
    import jax
    assert set(provenance.CODE_KEYS) <= set(line) and line["backend"] == jax.default_backend()
    assert line["git"] is None or len(line["git"]) == 40
    steps = sorted(int(p.name) for p in (smoke_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [ROUNDS - 1, ROUNDS]   # keep: 2


def test_smoke_run_learns(smoke_run):
    """The first run shows learning: accuracy clearly above always predicting the eval set's majority class."""
    import csv
    rows = list(csv.DictReader(open(ROOT / "experiments" / "data" / "tiny_sentiment_validation.csv")))
    majority = max(sum(r["sentiment"] == c for r in rows) for c in {r["sentiment"] for r in rows}) / len(rows)
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["final_accuracy"] >= majority + 0.15, (summary["final_accuracy"], majority)


def _assert_same_run(reference, run_dir):
    """Same metrics (wall times aside) and bit-identical final adapters."""
    strip = lambda recs: [{k: v for k, v in rec.items() if k != "wall_time"} for rec in recs]
    assert strip(_records(run_dir)) == strip(_records(reference))
    import jax
    (s1, a), (s2, b) = _final_adapters(reference), _final_adapters(run_dir)
    assert s1 == s2 == ROUNDS
    la, lb = jax.tree_util.tree_leaves_with_path(a["trainable"]), jax.tree_util.tree_leaves_with_path(b["trainable"])
    assert len(la) == len(lb) > 0
    for (pa, xa), (pb, xb) in zip(la, lb):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))


# Files of each kind in the latest checkpoint: array data (every data file of the OCDBT store:
# which of them orbax reads depends on how it merged the per-process stores), the OCDBT manifest,
# our meta JSON, orbax's tree metadata JSON.
CORRUPTIONS = {
    "array_data": lambda step: sorted((step / "trainable").glob("d/*"))
                               + sorted((step / "trainable").glob("ocdbt.process_*/d/*")),
    "manifest": lambda step: [step / "trainable" / "manifest.ocdbt"],
    "meta_json": lambda step: [step / "meta" / "metadata"],
    "tree_metadata_json": lambda step: [step / "trainable" / "_METADATA"],
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(smoke_run, tmp_path, kind):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    step = run / "checkpoints" / str(ROUNDS)
    bad = CORRUPTIONS[kind](step)
    assert bad
    for f in bad:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])   # truncated, as by a full disk
    r = hfl("resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    skipped = [line for line in r.stderr.splitlines() if line.startswith(f"skipped checkpoint {ROUNDS}")]
    assert len(skipped) == 1 and any(f.name in skipped[0] for f in bad), r.stderr   # one line naming the file
    moved = run / "checkpoints.corrupt" / str(ROUNDS)
    assert moved.is_dir() and all((moved / f.relative_to(step)).is_file() for f in bad)
    assert f"from checkpoint {ROUNDS - 1}" in r.stderr
    _assert_same_run(smoke_run, run)


def test_resume_without_checkpoint_says_it_starts_from_round_0(smoke_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    shutil.rmtree(run / "checkpoints")
    r = hfl("resume", run, "--quiet", env={"HFL_FAULT_KILL_ROUND": "1"})   # one round is enough
    assert "no usable checkpoint" in r.stderr and "starting from round 0" in r.stderr, r.stderr
    from hfl_jax import provenance
    assert [(x["event"], x["round"]) for x in provenance.read(run)] == [("resume", 0)]   # starts over: fresh


def test_resume_after_a_config_edit_moves_no_good_checkpoint_aside(smoke_run, tmp_path):
    import shutil

    import yaml
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["lora"]["rank"] = 2   # every checkpoint now holds other shapes than the config builds
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    r = hfl("resume", run, "--quiet")
    assert r.returncode != 0
    # one error message; orbax/tensorstore threads may print "Event loop is closed" tracebacks at exit,
    # interleaved with it on stderr, so look for the message anywhere rather than at a line start
    assert r.stderr.count("hfl-jax: error:") == 1, r.stderr
    message = r.stderr[r.stderr.index("hfl-jax: error:"):]
    assert "no checkpoint" in message and "config.yaml" in message, r.stderr
    assert not (run / "checkpoints.corrupt").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == \
        sorted(p.name for p in (smoke_run / "checkpoints").iterdir() if p.name.isdigit())


def test_diverging_run_stops_with_one_line_naming_the_learning_rate(tmp_path):
    out = tmp_path / "diverged"
    r = hfl("run", SMOKE, "--set", "train.lr=1e30", "--set", "train.rounds=3", "--out", out, "--quiet")
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("hfl-jax")]
    assert len(lines) == 1 and "non-finite" in lines[0] and "train.lr" in lines[0], r.stderr
    assert len(_records(out)) == 2   # train.max_nonfinite_rounds: 2


def test_killed_run_resumes_bit_identically(smoke_run, tmp_path):
    out = tmp_path / "killed"
    # SIGKILL right after round 3's metrics line is written, before its checkpoint
    r = hfl("run", SMOKE, "--out", out, "--quiet", env={"HFL_FAULT_KILL_ROUND": "3"})
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert len(_records(out)) == 3
    r = hfl("resume", out, "--quiet")
    assert r.returncode == 0, r.stderr
    _assert_same_run(smoke_run, out)
    from hfl_jax import provenance
    start, again = provenance.read(out)
    resumed_from = int(r.stderr.split("from checkpoint ")[1].split()[0])
    assert (start["event"], start["round"], again["event"], again["round"]) == ("start", 0, "resume", resumed_from)
    assert provenance.changes(start, again) == [] and "under other code" not in r.stderr


@pytest.mark.parametrize("override, key", [
    ("train.bogus=1", "train.bogus"),
    ("train.rounds=ten", "train.rounds"),
    ("algorithm.depths=[1,99]", "algorithm.depths"),
    ("train.rounds=-3", "train.rounds"),
    ("algorithm.num_groups=50", "algorithm.num_groups"),
])
def test_invalid_config_exits_naming_the_key_and_creates_nothing(tmp_path, override, key):
    out = tmp_path / "never"
    r = hfl("run", SMOKE, "--set", override, "--out", out)
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and key in lines[0], r.stderr
    assert not out.exists()


def test_help_explains_every_command():
    for cmd in ("run", "resume", "report", "partition"):
        r = hfl(cmd, "--help")
        assert r.returncode == 0 and "usage: hfl-jax " + cmd in r.stdout


def test_partition_command(tmp_path):
    r = hfl("partition", SMOKE, "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p" / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((tmp_path / "p" / "partition.json").read_text())
    assert len(info["assignment"]) == 8 and set(info["assignment"]) == {0, 1}
    assert "group" in r.stdout and "KL" in r.stdout


def test_resuming_a_finished_run_adds_no_round(smoke_run, tmp_path):
    import shutil
    copy = tmp_path / "done"
    shutil.copytree(smoke_run, copy)
    before = (copy / "metrics.jsonl").read_text()
    r = hfl("resume", copy, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (copy / "metrics.jsonl").read_text() == before


def test_resume_under_other_code_warns_and_records_it(smoke_run, tmp_path):
    """A run resumed under other package sources than it started with says so in one warning, keeping both lines."""
    import shutil
    copy = tmp_path / "moved"
    shutil.copytree(smoke_run, copy)
    (first,) = [json.loads(x) for x in (copy / "provenance.jsonl").read_text().splitlines()]
    first["source"] = "0" * 16
    (copy / "provenance.jsonl").write_text(json.dumps(first) + "\n")
    r = hfl("resume", copy, "--quiet")   # finished: no round runs, the code is still recorded
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "under other code" in line]
    assert len(warned) == 1 and f"source: {'0' * 16} ->" in warned[0] and "it started with" in warned[0], r.stderr
    lines = [json.loads(x) for x in (copy / "provenance.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["start", "resume"] and lines[1]["round"] == ROUNDS


def test_no_plots_draws_no_png(smoke_run, tmp_path):
    """``--no-plots`` (``plots=False``): the run's files without a PNG; ``hfl-jax report`` draws them later."""
    import shutil
    copy = tmp_path / "done"
    shutil.copytree(smoke_run, copy)
    for png in copy.glob("*.png"):
        png.unlink()
    r = hfl("resume", copy, "--quiet", "--no-plots")
    assert r.returncode == 0, r.stderr
    assert (copy / "summary.json").is_file() and not list(copy.glob("*.png"))
    r = hfl("resume", copy, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (copy / "accuracy_vs_rounds.png").is_file()


def test_runtime_errors_are_one_line(tmp_path):
    r = hfl("run", SMOKE, "--set", "data.custom.train=no/such/file.csv", "--out", tmp_path / "x")
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip() and not l.startswith("WARNING")]
    assert len(lines) == 1 and "hfl-jax: error:" in lines[0], r.stderr


def test_report_on_two_smoke_runs_prints_table_and_writes_png(smoke_run, tmp_path):
    second = tmp_path / "seed1"
    r = hfl("run", SMOKE, "--set", "seed=1", "--set", "train.rounds=2", "--set", "tensorboard=true",
            "--out", second, "--quiet")
    assert r.returncode == 0, r.stderr
    assert list((second / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    r = hfl("report", smoke_run, second, "--out", tmp_path / "plots")
    assert r.returncode == 0, r.stderr
    table = [l for l in r.stdout.splitlines() if l.startswith("|")]
    assert len(table) >= 4 and "final acc" in table[0]   # header, separator, two runs
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
