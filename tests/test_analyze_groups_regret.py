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
    assert row[4] == "0.0750 (n=1)"                  # mean of (0, 0.1, 0.1, 0.1)
    assert row[5] == "0.1000 (n=1)"                  # rounds 3-4
    assert row[6] == "0.0750 (n=1)"                  # same times as fixed_a here: the same differences
    assert agr.pulled_arms(bandit["bandit"][0]) == {(1, 1), (3, 2)}


def test_group_kl_reads_the_true_histograms_and_flat_methods_have_none(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "partition.json").write_text(json.dumps({"groups": {"sizes": [4, 4], "mean_kl": 0.25}}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "partition.json").write_text(json.dumps({"groups": {"sizes": [8], "mean_kl": 0.0}}))
    assert agr.group_kl(tmp_path / "a") == pytest.approx(0.25)
    assert agr.group_kl(tmp_path / "b") is None and agr.group_kl(tmp_path / "missing") is None
    assert agr._fmt([None]) == "n/a" and agr._fmt([], empty="- (one group)") == "- (one group)"
    assert agr._fmt([0.2, 0.4]).startswith("0.3000 ± ")
    np.testing.assert_allclose(agr.accuracies(_run([0.1, 0.2], [1, 2])), [0.1, 0.2])


def test_regret_pairs_seeds_and_compares_times_only_inside_the_fixed_run():
    # seed 1 only in the bandit: left out, so the best arm and the regret use seed 0 alone
    fixed = {"fixed_a": {0: _run([0.6, 0.7, 0.8, 0.8], [2, 3, 4, 5])}}
    bandit = {"bandit": {0: _run([0.5, 0.6, 0.7, 0.7], [1, 2, 4, 8], arms=((1, 1), (3, 2))),
                         1: _run([0.0, 0.0, 0.0, 0.0], [1, 2, 3, 4])}}
    (row,) = agr.regret_rows(bandit, fixed, last=1)
    assert row[:4] == ["bandit", "fixed_a (seeds 0)", "0.8000", "0.7000"]
    assert row[4] == "0.1000 (n=1)"                  # by round: (0.1, 0.1, 0.1, 0.1)
    # t=1: fixed_a has not evaluated yet; t=8: fixed_a ended at 5 -- both left out (unknown, not 0 or its
    # final accuracy); t=2: 0.6 - 0.6, t=4: 0.8 - 0.7
    assert row[6] == f"{np.mean([0.0, 0.1]):.4f} (n=1)"
    assert agr.regret_rows(bandit, {"fixed_b": {2: _run([0.5], [1])}}, last=1)[0][1].startswith("no seed")
    with pytest.raises(ValueError, match="evaluations"):   # runs of different lengths are not lined up
        agr.regret_rows({"bandit": {0: _run([0.5, 0.6], [1, 2])}}, fixed, last=1)


def test_paired_rows_by_hand(tmp_path):
    a = {0: _run([0.5, 0.6, 0.7, 0.9], [1, 2, 3, 4]), 1: _run([0.5, 0.5, 0.8, 0.8], [1, 2, 3, 4]),
         2: _run([0.1], [1])}                        # seed 2 has no partner: left out
    b = {0: _run([0.5, 0.5, 0.6, 0.7], [2, 4, 6, 8]), 1: _run([0.5, 0.5, 0.5, 0.6], [2, 4, 6, 8])}
    for r in (*a.values(), *b.values()):
        for rec in r["records"]:
            rec["bytes_up"] = 1.0
    b[0]["records"][0]["bytes_up"] = 5.0             # seed 0: b moved 8 bytes, a 4
    dirs = {}
    for name, kl in (("a", (0.3, 0.5)), ("b", (0.1, 0.2))):
        dirs[name] = {}
        for s, v in enumerate(kl):
            (tmp_path / f"{name}{s}").mkdir()
            (tmp_path / f"{name}{s}" / "partition.json").write_text(
                json.dumps({"groups": {"sizes": [2, 2], "mean_kl": v}}))
            dirs[name][s] = tmp_path / f"{name}{s}"
    cells, p = agr.paired_rows(a, b, last=1, targets=(0.7, 0.95), a_dirs=dirs["a"], b_dirs=dirs["b"])
    assert cells[0].startswith("0.2000 ± ") and cells[0].endswith("(n=2)")   # (0.9-0.7, 0.8-0.6)
    assert p == pytest.approx(0.0)                   # two equal differences: no spread
    assert cells[1].startswith("0.2000 ± ")          # second halves: (0.8-0.65, 0.8-0.55) -> 0.15, 0.25
    assert cells[2] == "2/1, 0.38 (n=1)"             # a reaches 0.7 at 3 (seeds 0 and 1), b at 8 (seed 0)
    assert cells[3] == "0/0"
    assert cells[4].startswith("0.71 [")             # traffic: sqrt(4/8 * 4/4)
    assert cells[5].startswith("0.2500 ± ")          # group KL: (0.2, 0.3)
    assert agr.paired_rows(a, {5: b[0]}, last=1)[0][0] == "no common seed"


def test_paired_p_and_holm_by_hand():
    from scipy.stats import ttest_rel

    x, y = [0.1, 0.3, 0.2, 0.4], [0.0, 0.1, 0.15, 0.1]
    assert agr.paired_p([u - v for u, v in zip(x, y)]) == pytest.approx(ttest_rel(x, y).pvalue)
    assert agr.paired_p([0.1]) is None
    # Holm: sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert agr.holm([0.04, None, 0.01, 0.03]) == [pytest.approx(0.06), None, pytest.approx(0.03),
                                                  pytest.approx(0.06)]


def test_bandit_rows_need_the_fixed_arms_config():
    base = {"name": "x", "seed": 0, "train": {"lr": 1e-3}, "algorithm": {"name": "hierfedlora", "fixed_depth": 3,
                                                                          "fixed_tau": 2, "layer_policy": "top"}}
    fixed = {**base, "name": "y", "seed": 1, "algorithm": {**base["algorithm"], "name": "hierfedlora_fixed",
                                                           "fixed_depth": 1}}
    assert agr._core(base) == agr._core(fixed)
    assert agr._core({**base, "algorithm": {**base["algorithm"], "name": "hierfedlora_random_groups"}}) != \
        agr._core(fixed)
    assert agr._core({**base, "algorithm": {**base["algorithm"], "layer_policy": "bottom"}}) != agr._core(fixed)


def test_pairs_name_study_methods(tmp_path):
    with pytest.raises(SystemExit):
        agr.main([str(ROOT / "experiments/studies/scale.yaml"), "--pair", "nope:hierfedlora"])
    with pytest.raises(SystemExit):
        agr.main([str(ROOT / "experiments/studies/scale.yaml"), "--pair", "hierfedlora"])
