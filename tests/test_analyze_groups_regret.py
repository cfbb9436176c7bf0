"""experiments/analyze_groups_regret.py: the bandit's regret against the best fixed arm in hindsight and the
group-KL reading, checked by hand on made-up run records."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("analyze_groups_regret", ROOT / "experiments/analyze_groups_regret.py")
agr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agr)


def _run(accs, times, arms=((1, 1),)):
    groups = [{"depth": d, "tau": t} for d, t in arms]
    return {"records": [{"round": i + 1, "eval_accuracy": a, "sim_time": s, "groups": groups}
                        for i, (a, s) in enumerate(zip(accs, times))],
            "config": {"algorithm": {"name": "hierfedlora_fixed"}}}


def test_regret_per_round_and_best_arm_by_hand():
    fixed = {"fixed_a": {0: _run([0.5, 0.6, 0.7, 0.8], [1, 2, 3, 4])},     # last-2 mean 0.75: the best arm
             "fixed_b": {0: _run([0.6, 0.7, 0.7, 0.7], [2, 4, 6, 8])}}     # last-2 mean 0.70
    bandit = {"bandit": {0: _run([0.5, 0.5, 0.6, 0.7], [1, 2, 3, 4], arms=((1, 1), (3, 2)))}}
    (row,) = agr.regret_rows(bandit, fixed, last=2)
    assert row[:4] == ["bandit", "fixed_a (seeds 0)", "0.7500", "0.6500"]
    assert row[4] == "+0.0750"                       # mean of (0, 0.1, 0.1, 0.1)
    assert row[5] == "+0.1000"                       # rounds 3-4
    assert row[6].startswith("0.0750")               # same times as fixed_a here: the same differences
    assert agr.pulled_arms(bandit["bandit"][0]) == {(1, 1), (3, 2)}


def test_group_kl_reads_the_true_histograms_and_flat_methods_have_none(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "partition.json").write_text(json.dumps({"groups": {"sizes": [4, 4], "mean_kl": 0.25}}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "partition.json").write_text(json.dumps({"groups": {"sizes": [8], "mean_kl": 0.0}}))
    assert agr.group_kl(tmp_path / "a") == pytest.approx(0.25)
    assert agr.group_kl(tmp_path / "b") is None and agr.group_kl(tmp_path / "missing") is None
    assert agr._fmt([None]) == "- (one group)"
    assert agr._fmt([0.2, 0.4]).startswith("0.3000 ± ")
    np.testing.assert_allclose(agr.accuracies(_run([0.1, 0.2], [1, 2])), [0.1, 0.2])


def test_regret_pairs_seeds_and_skips_times_before_the_fixed_arms_first_evaluation():
    # seed 1 only in the bandit: left out, so the best arm and the regret use seed 0 alone
    fixed = {"fixed_a": {0: _run([0.6, 0.8], [2, 4])}}
    bandit = {"bandit": {0: _run([0.5, 0.6, 0.7, 0.7], [1, 2, 3, 4], arms=((1, 1), (3, 2))),
                         1: _run([0.0, 0.0, 0.0, 0.0], [1, 2, 3, 4])}}
    (row,) = agr.regret_rows(bandit, fixed, last=1)
    assert row[:4] == ["bandit", "fixed_a (seeds 0)", "0.8000", "0.7000"]
    assert row[4] == "+0.1500"                       # rounds 1-2: (0.6-0.5, 0.8-0.6)
    # at t=1 fixed_a has not evaluated (skipped, not counted as 0); t=2,3: 0.6; t=4: 0.8
    assert row[6].startswith(f"{np.mean([0.6 - 0.6, 0.6 - 0.7, 0.8 - 0.7]):.4f}")
    assert agr.regret_rows(bandit, {"fixed_b": {2: _run([0.5], [1])}}, last=1)[0][1].startswith("no seed")


def test_paired_rows_by_hand():
    a = {0: _run([0.5, 0.6, 0.7, 0.9], [1, 2, 3, 4]), 1: _run([0.5, 0.5, 0.8, 0.8], [1, 2, 3, 4]),
         2: _run([0.1], [1])}                        # seed 2 has no partner: left out
    b = {0: _run([0.5, 0.5, 0.6, 0.7], [2, 4, 6, 8]), 1: _run([0.5, 0.5, 0.5, 0.6], [2, 4, 6, 8])}
    cells = agr.paired_rows(a, b, last=1, targets=(0.7, 0.95))
    assert cells[0].startswith("0.2000 ± ") and cells[0].endswith("(n=2)")   # (0.9-0.7, 0.8-0.6)
    assert cells[1].startswith("0.2000 ± ")          # second halves: (0.8-0.65, 0.8-0.55) -> 0.15, 0.25
    assert cells[2] == "2/1, 0.38x"                  # a reaches 0.7 at 3 (seeds 0 and 1), b at 8 (seed 0)
    assert cells[3] == "0/0"


def test_pairs_name_study_methods(tmp_path):
    with pytest.raises(SystemExit):
        agr.main([str(ROOT / "experiments/studies/scale.yaml"), "--pair", "nope:hierfedlora"])
    with pytest.raises(SystemExit):
        agr.main([str(ROOT / "experiments/studies/scale.yaml"), "--pair", "hierfedlora"])
