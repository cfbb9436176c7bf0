"""``hfl-jax sweep``: a tiny study end to end (tuning on the validation split, final runs, report),
then a rerun that skips every run and rewrites the report byte for byte; an interrupted run resumes."""
import json
from pathlib import Path

import pytest
import yaml

from hfl_jax import cli, sweep
from hfl_jax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path, **extra) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "base": str(ROOT / "experiments/configs/smoke.yaml"),
        "data": {"validation_size": 40},
        "train": {"rounds": 2, "local_steps": 2},
        "checkpoint": {"every": 1, "keep": 1}}))
    spec = {"name": "tiny", "base": "base.yaml", "out": "study", "seeds": [0, 1], "reference": "hierfedlora",
            "targets": [0.5, 0.99], "tune": {"key": "train.lr", "grid": [0.003, 0.01], "seeds": [0], "last": 1},
            "methods": {"hierfedlora": {}, "fedlora": {"set": {"algorithm.name": "fedlora"}},
                        "fedlora_at_hier_lr": {"set": {"algorithm.name": "fedlora"}, "lr_from": "hierfedlora",
                                               "seeds": [0]}},
            **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_runs_skips_and_rewrites_the_report_identically(tmp_path, capsys):
    path = _study(tmp_path)
    assert cli.main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("run    tune") == 4 and out.count("run    final") == 5
    study = sweep.load_study(path)
    chosen, scores = sweep.choose(study)
    assert set(chosen) == {("all", "hierfedlora"), ("all", "fedlora")}
    # tuning runs read the validation split; final runs the task's evaluation split at the chosen value
    tune_cfg = yaml.safe_load((study.out / "tune/all/fedlora/train.lr=0.01_s0/config.yaml").read_text())
    final_cfg = yaml.safe_load((study.out / "runs/all/fedlora_at_hier_lr/s0/config.yaml").read_text())
    assert tune_cfg["data"]["evaluate"] == "validation" and final_cfg["data"]["evaluate"] == "test"
    assert final_cfg["train"]["lr"] == chosen[("all", "hierfedlora")]
    assert final_cfg["algorithm"]["name"] == "fedlora"
    report = (study.out / "report.md").read_bytes()
    text = report.decode()
    assert "### Tuning" in text and "### Paired by seed with `hierfedlora`" in text
    assert "device-edge (MB)" in text and "5 of 5 final finished" in text
    assert "| last-1 mean acc |" in text and "| Δ last-1 mean acc |" in text   # k = the tuning's `last`

    # a rerun skips every run and writes the same bytes
    assert cli.main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    verbs = [line.split()[0] for line in out.splitlines() if not line.startswith("wrote")]
    assert verbs == ["skip"] * 9
    assert (study.out / "report.md").read_bytes() == report

    # an interrupted run (no summary.json) is resumed, and the report is unchanged
    (study.out / "runs/all/fedlora/s1/summary.json").unlink()
    assert cli.main(["sweep", str(path), "--dry-run"]) == 0   # runs nothing; counts and time left
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("8 done, 1 partial, 0 new of 9; about ") and "run-hours left" in last
    assert cli.main(["sweep", str(path)]) == 0
    assert "resume final" in capsys.readouterr().out
    assert (study.out / "report.md").read_bytes() == report

    # a study edited under a finished run is refused, naming the run
    edited = _study(tmp_path, settings={"all": {"train.local_steps": 3}})
    assert cli.main(["sweep", str(edited)]) == 2
    assert "another config" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"methods": {}}, "no method"),
    ({"reference": "nope"}, "reference"),
    ({"seeds": [0, 0]}, "seeds repeat"),
    ({"methods": {"a": {"lr_from": "b"}}}, "lr_from"),
    ({"bogus": 1}, "unknown keys"),
])
def test_bad_study_files_are_refused(tmp_path, change, message):
    path = _study(tmp_path, **change)
    with pytest.raises(ConfigError, match=message):
        sweep.load_study(path)


def test_a_setting_can_reuse_another_settings_tuning(tmp_path):
    path = _study(tmp_path, settings={"a": {"partition.alpha": 0.5},
                                      "b": {"set": {"partition.alpha": 1.0}, "tuned_in": "a"}})
    study = sweep.load_study(path)
    assert {r.setting for r in sweep.tuning_runs(study)} == {"a"}
    chosen = {("a", "hierfedlora"): 0.01, ("a", "fedlora"): 0.003}
    final = {(r.setting, r.method, r.seed): r.value for r in sweep.final_runs(study, chosen)}
    assert final[("b", "fedlora", 1)] == 0.003 and final[("b", "fedlora_at_hier_lr", 0)] == 0.01
    cfg = sweep.run_config(study, next(r for r in sweep.final_runs(study, chosen) if r.setting == "b"))
    assert cfg.partition.alpha == 1.0
    with pytest.raises(ConfigError, match="tuned_in"):
        sweep.load_study(_study(tmp_path, settings={"a": {"set": {}, "tuned_in": "zzz"}}))


def test_a_run_written_before_a_config_field_existed_is_still_recognised(tmp_path):
    """A finished run's config.yaml lacks fields added to hfl_jax since (here model.unroll and
    train.group_padding): they compare at their defaults, so the study skips the run; a changed value
    is still refused."""
    from hfl_jax.config import to_dict
    study = sweep.load_study(_study(tmp_path))
    run = sweep.tuning_runs(study)[0]
    cfg = sweep.run_config(study, run)
    old = to_dict(cfg)
    del old["model"]["unroll"], old["train"]["group_padding"]
    run.out.mkdir(parents=True)
    (run.out / "config.yaml").write_text(yaml.safe_dump(old))
    (run.out / "summary.json").write_text("{}")
    assert sweep.run_status(run, cfg) == "done"
    old["train"]["local_steps"] += 1
    (run.out / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="another config"):
        sweep.run_status(run, cfg)
    old["train"]["local_steps"] -= 1
    # a section only another algorithm reads (HetLoRA's, here in a HierFedLoRA run) makes no other run
    old["algorithm"]["hetlora"]["sparsity"] = "update"
    (run.out / "config.yaml").write_text(yaml.safe_dump(old))
    assert cfg.algorithm.name != "hetlora" and sweep.run_status(run, cfg) == "done"
    # removed keys: the message names the run
    old["bogus"] = 1
    (run.out / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=f"{run.out}.*move the run away"):
        sweep.run_status(run, cfg)


def test_a_hetlora_run_written_before_padding_existed_reads_as_holders(tmp_path):
    """algorithm.hetlora.padding's default became "zeros" when the field was added; a HetLoRA run
    directory written before ran with "holders" (config.RUN_LEGACY_DEFAULTS): resume and the sweep
    read it so, so such a run is neither resumed with another aggregation nor taken for a new one."""
    from dataclasses import replace

    from hfl_jax.config import load_run_config, to_dict
    study = sweep.load_study(_study(tmp_path))
    run = sweep.tuning_runs(study)[0]
    cfg = sweep.run_config(study, run)
    cfg = replace(cfg, algorithm=replace(cfg.algorithm, name="hetlora",
                                         hetlora=replace(cfg.algorithm.hetlora, ranks=(1, 2, 4))))
    old = to_dict(cfg)
    del old["algorithm"]["hetlora"]["padding"]
    run.out.mkdir(parents=True)
    (run.out / "config.yaml").write_text(yaml.safe_dump(old))
    (run.out / "summary.json").write_text("{}")
    assert load_run_config(run.out).algorithm.hetlora.padding == "holders"
    with pytest.raises(ConfigError, match="another config"):      # the study asks for the paper's zeros
        sweep.run_status(run, cfg)
    holders = replace(cfg, algorithm=replace(cfg.algorithm, hetlora=replace(cfg.algorithm.hetlora, padding="holders")))
    assert sweep.run_status(run, holders) == "done"


def test_runs_written_before_sparsity_and_reward_existed_read_as_their_old_behaviour(tmp_path):
    """A run directory without algorithm.hetlora.sparsity or algorithm.bandit.reward ran with update-norm
    weights and the EMA reward (config.RUN_LEGACY_DEFAULTS); one that has them keeps its own values."""
    from hfl_jax.config import load_run_config, to_dict
    study = sweep.load_study(_study(tmp_path))
    run = sweep.tuning_runs(study)[0]
    cfg = sweep.run_config(study, run)
    old = to_dict(cfg)
    del old["algorithm"]["hetlora"]["sparsity"], old["algorithm"]["bandit"]["reward"]
    run.out.mkdir(parents=True)
    (run.out / "config.yaml").write_text(yaml.safe_dump(old))
    loaded = load_run_config(run.out).algorithm
    assert (loaded.hetlora.sparsity, loaded.bandit.reward) == ("update", "ema")
    assert (cfg.algorithm.hetlora.sparsity, cfg.algorithm.bandit.reward) == ("adapter", "detrended")
    (run.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    loaded = load_run_config(run.out).algorithm
    assert (loaded.hetlora.sparsity, loaded.bandit.reward) == ("adapter", "detrended")


def test_shards_run_a_study_together_without_overlap(tmp_path, capsys):
    """``--shard I/N``: each process takes every N-th run of each stage; a shard runs final runs only
    once every tuning run (its own and the others') has finished; together they run each run once."""
    path = _study(tmp_path, seeds=[0], tune={"key": "train.lr", "grid": [0.01], "seeds": [0], "last": 1},
                  methods={"hierfedlora": {}, "fedlora": {"set": {"algorithm.name": "fedlora"}}})
    assert cli.main(["sweep", str(path), "--shard", "1/2", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.count("run    tune") == 1 and "run    final" not in out and "rerun this command" in out
    assert cli.main(["sweep", str(path), "--shard", "0/2", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.count("run    tune") == 1 and out.count("run    final") == 1 and "skip" not in out
    assert cli.main(["sweep", str(path), "--shard", "1/2", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.count("skip   tune") == 1 and out.count("run    final") == 1 and "rerun" not in out
    assert cli.main(["sweep", str(path)]) == 0           # unsharded: everything is done
    verbs = [line.split()[0] for line in capsys.readouterr().out.splitlines() if not line.startswith("wrote")]
    assert verbs == ["skip"] * 4
    assert not list(sweep.load_study(path).out.rglob("*.png"))   # --no-plots
    assert cli.main(["sweep", str(path), "--shard", "2/2"]) == 2
    assert "--shard" in capsys.readouterr().err


def test_report_last_k_mean_reads_the_last_k_evaluations():
    """The report's last-k column: the mean of the last k evaluated rounds (rounds without an
    evaluation do not count), hand-computed."""
    from hfl_jax.study_report import _last_mean
    records = [{"round": 1, "sim_time": 1.0, "eval_accuracy": 0.5}, {"round": 2, "sim_time": 2.0},
               {"round": 3, "sim_time": 3.0, "eval_accuracy": 0.7}, {"round": 4, "sim_time": 4.0, "eval_accuracy": 0.6},
               {"round": 5, "sim_time": 5.0, "eval_accuracy": 0.9}]
    run = {"records": records}
    assert _last_mean(run, 1) == pytest.approx(0.9)
    assert _last_mean(run, 3) == pytest.approx((0.7 + 0.6 + 0.9) / 3)
    assert _last_mean(run, 9) == pytest.approx((0.5 + 0.7 + 0.6 + 0.9) / 4)
    assert _last_mean({"records": [{"round": 1, "sim_time": 1.0}]}, 3) is None


def test_remaining_time_takes_each_runs_finished_peers(tmp_path):
    """Hand-checked: an unfinished run counts the median wall time of its (setting, method)'s finished runs,
    else its setting's, else all; a partial run the share of rounds it has left."""
    def run(setting, method, seed, wall=None, rounds=10, lines=0):
        out = tmp_path / setting / method / str(seed)
        out.mkdir(parents=True)
        if wall is not None:
            (out / "summary.json").write_text(json.dumps({"wall_time": wall, "rounds": rounds}))
        if lines:
            (out / "metrics.jsonl").write_text("{}\n" * lines)
        status = "done" if wall is not None else ("partial" if lines else "new")
        return sweep.Run("final", setting, method, seed, None, out), status

    planned = [run("a", "m", 0, wall=100.0), run("a", "m", 1, wall=300.0), run("a", "n", 0, wall=1000.0),
               run("b", "m", 0, wall=40.0),
               run("a", "m", 2),                # its method's median: 200
               run("a", "m", 3, lines=5),       # half its rounds left: 100
               run("a", "k", 0),                # no finished k in a: the setting's median, of 100, 300, 1000: 300
               run("c", "z", 0)]                # nothing in c: the median of all four finished: 200
    assert sweep.remaining_time(planned) == (200.0 + 100.0 + 300.0 + 200.0, 4)
    assert sweep.remaining_time([run("d", "m", 0)]) == (None, 0)
