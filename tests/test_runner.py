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


def hfl(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "hfl_jax", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    r = hfl("run", SMOKE, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
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
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["sim_time"] > 0 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert 0 <= r["eval_accuracy"] <= 1 and np.isfinite(r["eval_loss"])
        for g in r["groups"]:
            assert g["skipped"] or (g["depth"] in (2, 4) and g["tau"] in (1, 2) and g["time"] > 0)
    assert all(b > a for a, b in zip([r["sim_time"] for r in records], [r["sim_time"] for r in records][1:]))
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["final_accuracy"] == records[-1]["eval_accuracy"]
    steps = sorted(int(p.name) for p in (smoke_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 4]   # keep: 2


def test_killed_run_resumes_bit_identically(smoke_run, tmp_path):
    out = tmp_path / "killed"
    # SIGKILL right after round 3's metrics line is written, before its checkpoint
    r = hfl("run", SMOKE, "--out", out, "--quiet", env={"HFL_FAULT_KILL_ROUND": "3"})
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert len(_records(out)) == 3
    r = hfl("resume", out, "--quiet")
    assert r.returncode == 0, r.stderr
    strip = lambda recs: [{k: v for k, v in rec.items() if k != "wall_time"} for rec in recs]
    assert strip(_records(out)) == strip(_records(smoke_run))
    import jax
    (s1, a), (s2, b) = _final_adapters(smoke_run), _final_adapters(out)
    assert s1 == s2 == 4
    la, lb = jax.tree_util.tree_leaves_with_path(a["trainable"]), jax.tree_util.tree_leaves_with_path(b["trainable"])
    assert len(la) == len(lb) > 0
    for (pa, xa), (pb, xb) in zip(la, lb):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))


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
