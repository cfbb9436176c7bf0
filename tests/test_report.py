"""hfl_jax.report: hand-made run directories with hand-computed table cells, plots, and one real smoke run."""
import json
from pathlib import Path

import pytest
import yaml

from hfl_jax import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(name, algorithm, seed, lr=0.003):
    return {"name": name, "seed": seed, "algorithm": {"name": algorithm, "num_groups": 2},
            "train": {"rounds": 3, "lr": lr}}


def _groups(depths, taus, bandit):
    out = []
    for k, (d, t) in enumerate(zip(depths, taus)):
        g = {"group": k, "participants": 2, "members": 2, "skipped": False, "arm": k, "depth": d, "tau": t,
             "time": 1.0, "loss_before": 0.7, "loss_after": 0.6, "train_loss": 0.6, "explore": k == 0, "dropped": []}
        if bandit:
            g["reward"] = 0.1
        out.append(g)
    return out


def write_run(path: Path, config, accs, sim_times, up, down, wall, bandit=True, evaluate=True, summary=True):
    """A run directory like the driver's: one record per round with the given per-round numbers."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    recs = []
    for i, (acc, t) in enumerate(zip(accs, sim_times)):
        rec = {"round": i + 1, "round_time": 1.0, "sim_time": t, "bytes_up": up, "bytes_down": down,
               "groups": _groups([1 + i % 2, 4], [2, 1], bandit), "dropped_devices": [], "wall_time": wall}
        if evaluate:
            rec["eval_loss"], rec["eval_accuracy"] = 1.0 - acc, acc
        recs.append(rec)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if summary:
        (path / "summary.json").write_text(json.dumps({"name": config["name"], "stop_reason": "rounds"}))
    return path


@pytest.fixture
def three_runs(tmp_path):
    """A and B: one setting, seeds 0 and 1 (bandit); C: another algorithm (fixed arms)."""
    a = write_run(tmp_path / "a", _config("cmp", "hierfedlora", 0), [0.5, 0.7, 0.8], [10, 20, 30],
                  1e6, 2e6, 1.0)
    b = write_run(tmp_path / "b", _config("cmp", "hierfedlora", 1), [0.6, 0.75, 0.7], [12, 24, 36],
                  0.5e6, 0.5e6, 2.0)
    c = write_run(tmp_path / "c", _config("cmp", "fedlora", 0), [0.4, 0.6, 0.65], [5, 10, 15],
                  1e6, 1e6, 0.5, bandit=False)
    return [a, b, c]


def _rows(table):
    """{label: [cells]} of a markdown table."""
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_load_run_and_errors(three_runs, tmp_path):
    run = report.load_run(three_runs[0])
    assert run["config"]["seed"] == 0 and len(run["records"]) == 3
    assert run["summary"]["stop_reason"] == "rounds"
    assert report.run_identity(run) == ("cmp", "hierfedlora", 0)
    with pytest.raises(FileNotFoundError, match="not a hfl-jax run directory"):
        report.load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.load_run(tmp_path / "nope")
    (three_runs[2] / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2, oops\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        report.load_run(three_runs[2])


def test_running_run_without_summary(tmp_path):
    d = write_run(tmp_path / "r", _config("cmp", "fedlora", 3), [0.5, 0.6], [1, 2], 1e6, 1e6, 1.0, summary=False)
    s = report.load_run(d)["summary"]
    assert s["stop_reason"] is None and s["best_accuracy"] == 0.6 and s["bytes_up"] == 2e6 and s["seed"] == 3


def test_run_stats_hand_computed(three_runs):
    run = report.load_run(three_runs[0])
    s = report.run_stats(run, target=0.7)
    assert s["final_accuracy"] == 0.8 and s["best_accuracy"] == 0.8
    assert s["rounds_to_target"] == 2 and s["time_to_target"] == 20.0
    assert s["traffic_mb"] == pytest.approx(9.0) and s["wall_time"] == pytest.approx(3.0)
    assert report.run_stats(run, target=0.9)["rounds_to_target"] is None


def test_table_default_target_mean_std(three_runs):
    table = report.report_table(three_runs)
    rows = _rows(table)
    assert list(rows) == ["cmp (hierfedlora)", "cmp (fedlora)"]
    # default target: min over runs of best accuracy = min(0.8, 0.75, 0.65)
    assert "Target accuracy: 0.6500 (default" in table
    # A, B: final 0.8, 0.7; best 0.8, 0.75; reach 0.65 at round 2 (t = 20, 24);
    # traffic 3 * 3 MB = 9 and 3 * 1 MB = 3; wall 3 and 6 (3 significant digits). std with ddof=1: |x1 - x2| / sqrt(2).
    assert rows["cmp (hierfedlora)"] == ["0, 1", "0.7500 ± 0.0707", "0.7750 ± 0.0354", "2.0 ± 0.0",
                                         "22.0 ± 2.8", "6.000 ± 4.243", "4.50 ± 2.12", "n/a", "n/a"]
    # C alone: reaches 0.65 only at round 3 (t = 15); traffic 3 * 2 MB; wall 3 * 0.5
    assert rows["cmp (fedlora)"] == ["0", "0.6500", "0.6500", "3", "15.0", "6.000", "1.50", "n/a", "n/a"]


def test_table_given_target_not_reached(three_runs):
    table = report.report_table(three_runs, target=0.78)
    rows = _rows(table)
    assert "Target accuracy: 0.7800 (given)" in table
    assert rows["cmp (hierfedlora)"][3:5] == ["3.0 (1/2 reached)", "30.0 (1/2 reached)"]
    assert rows["cmp (fedlora)"][3:5] == ["not reached", "not reached"]


def test_table_group_by(three_runs, tmp_path):
    d = write_run(tmp_path / "d", _config("other", "fedlora", 0, lr=0.01), [0.3], [1], 1e6, 0, 1.0)
    rows = _rows(report.report_table(three_runs + [d], group_by=()))
    assert list(rows) == ["hierfedlora", "fedlora"] and rows["fedlora"][0] == "0, 0"
    rows = _rows(report.report_table(three_runs + [d], group_by="train.lr"))
    assert list(rows) == ["hierfedlora, train.lr=0.003", "fedlora, train.lr=0.003", "fedlora, train.lr=0.01"]
    # default grouping: same name and algorithm but another setting -> the differing key joins the label
    e = write_run(tmp_path / "e", _config("cmp", "fedlora", 0, lr=0.01), [0.3], [1], 1e6, 0, 1.0)
    rows = _rows(report.report_table(three_runs + [e]))
    assert set(rows) == {"cmp (hierfedlora)", "cmp (fedlora), train.lr=0.003", "cmp (fedlora), train.lr=0.01"}


def test_table_without_evaluation(tmp_path):
    d = write_run(tmp_path / "r", _config("cmp", "fedlora", 0), [0.5], [1], 1e6, 1e6, 1.0, evaluate=False)
    table = report.report_table([d])
    assert _rows(table)["cmp (fedlora)"] == ["0", "n/a", "n/a", "n/a", "n/a", "2.000", "1.00", "n/a", "n/a"]
    assert "Target accuracy: none" in table


def test_plots_written(three_runs, tmp_path):
    paths = report.plot_runs(three_runs, tmp_path / "plots", target=0.7)
    names = sorted(p.name for p in paths)
    assert names == ["accuracy_vs_rounds.png", "accuracy_vs_time.png",
                     "arms_cmp_hierfedlora_seed0.png", "arms_cmp_hierfedlora_seed1.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots" and p.read_bytes()[:8] == PNG_MAGIC
    assert report.bandit_choices(report.load_run(three_runs[0]))[0] == [(1, 1, 2, True), (2, 2, 2, True),
                                                                       (3, 1, 2, True)]


def test_plots_single_run_and_no_evaluation(three_runs, tmp_path):
    single = report.plot_runs([three_runs[0]], three_runs[0])
    assert sorted(p.name for p in single) == ["accuracy_vs_rounds.png", "accuracy_vs_time.png", "arms.png"]
    d = write_run(tmp_path / "r", _config("cmp", "fedlora", 0), [0.5], [1], 1e6, 1e6, 1.0,
                  bandit=False, evaluate=False)
    assert report.plot_runs([d], d) == []


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from hfl_jax import driver
    from hfl_jax.config import load_config

    out = tmp_path_factory.mktemp("smoke") / "run"
    driver.run(load_config(Path(__file__).resolve().parents[1] / "tests/configs/tiny_v1.yaml",
                           overrides=["train.rounds=2"]), out)
    return out


def test_real_smoke_run(smoke_run):
    run = report.load_run(smoke_run)
    summ = run["summary"]
    assert len(run["records"]) == 2 and summ["rounds"] == 2
    stats = report.run_stats(run)
    assert stats["final_accuracy"] == summ["final_accuracy"] and stats["best_accuracy"] == summ["best_accuracy"]
    assert stats["traffic_mb"] == pytest.approx((summ["bytes_up"] + summ["bytes_down"]) / 1e6)
    rows = _rows(report.report_table([smoke_run]))
    cells = rows["smoke (hierfedlora)"]
    assert cells[1] == f"{summ['final_accuracy']:.4f}"
    assert cells[3] != "not reached"   # the default target is this run's own best
    assert cells[5] == f"{stats['traffic_mb']:.3f}"
    # per-tier traffic and time: every round record has them, summary.json sums them, the table shows them
    tiers = ("edge_bytes_up", "edge_bytes_down", "cloud_bytes_up", "cloud_bytes_down",
             "time_compute", "time_edge", "time_cloud")
    for k in tiers:
        assert summ[k] == pytest.approx(sum(r[k] for r in run["records"]))
    for r in run["records"]:
        assert r["time_compute"] + r["time_edge"] + r["time_cloud"] == pytest.approx(r["round_time"])
        assert r["edge_bytes_up"] + r["cloud_bytes_up"] == pytest.approx(r["bytes_up"])
    assert cells[7:9] == [f"{stats['edge_mb']:.3f}", f"{stats['cloud_mb']:.3f}"]
    assert stats["edge_mb"] + stats["cloud_mb"] == pytest.approx(stats["traffic_mb"])
    # the driver drew the plots into the run directory at the end of the run
    for name in ("accuracy_vs_time.png", "accuracy_vs_rounds.png", "arms.png"):
        assert (smoke_run / name).read_bytes()[:8] == PNG_MAGIC
