"""Tests for hfl_jax.algos.rucb (host-side bandit; jax/orbax for the pytree)."""

import math

import numpy as np
import pytest

from hfl_jax.algos import rucb as rucb_lib
from hfl_jax.algos.rucb import (RUCBState, make_arms, penalized_reward,
                                reward_from_progress, rucb, ucb_index)
from hfl_jax.fed.cost import feasible_arms


def _tiny_state():
  # gamma = .5: three pulls (arm 0, r=1), (arm 1, r=.5), (arm 0, r=0).
  #   after 1: N = [1, 0, 0],     S = [1, 0, 0],       n = 1
  #   after 2: N = [.5, 1, 0],    S = [.5, .5, 0],     n = 1.5
  #   after 3: N = [1.25, .5, 0], S = [.25, .25, 0],   n = 1.75
  b = rucb(3, phi=1.0, gamma=0.5, nu=0.5)
  s = b.init()
  for arm, r in [(0, 1.0), (1, 0.5), (0, 0.0)]:
    s = b.update(s, arm, r)
  return b, s


def test_update_hand_computed():
  _, s = _tiny_state()
  np.testing.assert_allclose(s.counts, [1.25, 0.5, 0.0])
  np.testing.assert_allclose(s.reward_sums, [0.25, 0.25, 0.0])
  np.testing.assert_allclose(s.total, 1.75)
  assert int(s.round) == 3


def test_index_hand_computed():
  b, s = _tiny_state()
  # ln 1.75 = 0.5596158
  # arm 0: .25/1.25 + sqrt(2 * 0.5596158 / 1.25) = .2 + 0.9462480 = 1.1462480
  # arm 1: .25/.5   + sqrt(2 * 0.5596158 / .5)   = .5 + 1.4961495 = 1.9961495
  # arm 2: unplayed -> +inf
  idx = ucb_index(s, phi=1.0)
  np.testing.assert_allclose(idx[:2], [1.1462480, 1.9961495], atol=1e-6)
  assert idx[2] == np.inf
  arm, info = b.select(s, np.array([True, True, True]), seed=0)
  assert arm == 2 and info["explore"]
  arm, info = b.select(s, np.array([True, True, False]), seed=0)
  assert arm == 1 and not info["explore"]
  np.testing.assert_allclose(info["index"][:2], [1.1462480, 1.9961495],
                             atol=1e-6)
  assert info["index"][2] == -np.inf  # infeasible
  np.testing.assert_allclose(info["mean"][:2], [0.2, 0.5])
  arm, _ = b.select(s, np.array([True, False, False]), seed=0)
  assert arm == 0


def test_gamma_one_is_plain_counts():
  b = rucb(3, gamma=1.0)
  s = b.init()
  for arm, r in [(0, 1.0), (0, 0.0), (2, 0.5)]:
    s = b.update(s, arm, r)
  np.testing.assert_array_equal(s.counts, [2.0, 0.0, 1.0])
  np.testing.assert_array_equal(s.reward_sums, [1.0, 0.0, 0.5])
  assert float(s.total) == 3.0


def test_overrun_penalty_lowers_index():
  # nu = .5, arm 1 took 1.5x its budget: r~ = .8 - .5 * (1.5 - 1) = .55.
  # gamma = 1, N = [1, 1], n = 2, bonus = sqrt(2 ln 2) = 1.1774100.
  assert penalized_reward(0.8, 1.5, 1.0, 0.5) == pytest.approx(0.55)
  assert penalized_reward(0.8, 0.9, 1.0, 0.5) == pytest.approx(0.8)
  assert penalized_reward(0.8, None, None, 0.5) == pytest.approx(0.8)
  b = rucb(2, phi=1.0, gamma=1.0, nu=0.5)
  s = b.update(b.init(), 0, 0.8)
  s_over = b.update(s, 1, 0.8, time=1.5, budget=1.0)
  s_ok = b.update(s, 1, 0.8, time=0.9, budget=1.0)
  np.testing.assert_allclose(ucb_index(s_over, 1.0), [1.9774100, 1.7274100],
                             atol=1e-6)
  np.testing.assert_allclose(ucb_index(s_ok, 1.0), [1.9774100, 1.9774100],
                             atol=1e-6)
  assert b.select(s_over, np.array([True, True]), seed=0)[0] == 0
  with pytest.raises(ValueError, match="both time and budget"):
    b.update(s, 1, 0.8, time=1.5)


def test_first_pulls_follow_seeded_order():
  b = rucb(5)
  s = b.init()
  feas = np.array([True, True, False, True, True])
  order = np.random.default_rng(42).permutation(5)
  expected = [int(a) for a in order if feas[a]]
  picks = []
  for _ in range(4):
    arm, info = b.select(s, feas, seed=42)
    assert info["explore"]
    picks.append(arm)
    s = b.update(s, arm, 0.5)
  assert picks == expected
  assert not b.select(s, feas, seed=42)[1]["explore"]


def test_no_feasible_arm_raises():
  b = rucb(3)
  with pytest.raises(ValueError, match="no feasible arm"):
    b.select(b.init(), np.zeros(3, bool), seed=0)
  with pytest.raises(ValueError, match="shape"):
    b.select(b.init(), np.ones(4, bool), seed=0)


def test_stationary_problem_finds_best_feasible_arm():
  depths, taus = make_arms((1, 2, 4, 6), (1, 2))
  # Arms 6, 7 (depth 6) are best overall but need too much memory.
  means = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.8, 0.9, 0.95])
  feas = feasible_arms(depths, taus, memory=lambda d, t: 10.0 * d,
                       time=depths * taus, mem_budget=40.0, time_budget=None)
  np.testing.assert_array_equal(feas, [True] * 6 + [False] * 2)
  # gamma = .99 has an effective window of ~100 pulls; phi = .25 suits
  # rewards with spread ~.1 (phi = 1 keeps exploring 7 arms in that window).
  b = rucb(8, phi=0.25, gamma=0.99, nu=0.5)
  s = b.init()
  rng = np.random.default_rng(0)
  picks = []
  for t in range(500):
    arm, _ = b.select(s, feas, seed=t)
    s = b.update(s, arm, means[arm] + 0.1 * rng.standard_normal())
    picks.append(arm)
  picks = np.array(picks)
  assert not np.any(np.isin(picks, [6, 7]))
  frac = np.mean(picks[250:] == 5)
  assert frac >= 0.7, frac


def test_checkpoint_roundtrip_and_pytree(tmp_path):
  jax = pytest.importorskip("jax")
  ocp = pytest.importorskip("orbax.checkpoint")
  _, s = _tiny_state()
  # Valid pytree: 4 leaves, tree_map keeps the NamedTuple.
  leaves, treedef = jax.tree_util.tree_flatten(s)
  assert len(leaves) == 4
  doubled = jax.tree_util.tree_map(lambda x: x * 2, s)
  assert isinstance(doubled, RUCBState)
  np.testing.assert_allclose(doubled.counts, [2.5, 1.0, 0.0])
  # select works on jax-array states too (e.g. after a restore to device).
  s_jax = jax.tree_util.tree_map(jax.numpy.asarray, s)
  b = rucb(3, phi=1.0, gamma=0.5)
  feas = np.array([True, True, False])
  assert b.select(s_jax, feas, seed=0)[0] == b.select(s, feas, seed=0)[0]

  ckpt = ocp.StandardCheckpointer()
  path = tmp_path / "rucb"
  ckpt.save(path, s)
  ckpt.wait_until_finished()
  restored = ckpt.restore(path, s)
  assert isinstance(restored, RUCBState)
  for a, r in zip(s, restored):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
    assert np.asarray(a).dtype == np.asarray(r).dtype
  # Restored state continues identically.
  s1 = b.update(s, 1, 0.3, time=2.0, budget=1.0)
  s2 = b.update(restored, 1, 0.3, time=2.0, budget=1.0)
  for a, r in zip(s1, s2):
    np.testing.assert_array_equal(a, r)


def test_reward_from_progress():
  # Loss 2.0 -> 1.5 in .5 s: rate 1.0 per s; scale 2 -> reward .5.
  assert reward_from_progress(2.0, 1.5, 0.5, 2.0) == pytest.approx(0.5)
  assert reward_from_progress(1.5, 2.0, 0.5, 2.0) == 0.0  # loss went up
  assert reward_from_progress(5.0, 1.0, 0.5, 2.0) == 1.0  # saturates
  with pytest.raises(ValueError):
    reward_from_progress(2.0, 1.5, 0.0, 2.0)


def test_feasible_arms_and_make_arms():
  d, t = make_arms((1, 2, 4), (1, 3))
  np.testing.assert_array_equal(d, [1, 1, 2, 2, 4, 4])
  np.testing.assert_array_equal(t, [1, 3, 1, 3, 1, 3])
  mem = np.array([1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
  time = d * t  # [1, 3, 2, 6, 4, 12]
  np.testing.assert_array_equal(
      feasible_arms(d, t, mem, time, mem_budget=2.0, time_budget=3.0),
      [True, True, True, False, False, False])
  np.testing.assert_array_equal(
      feasible_arms(d, t, lambda di, ti: float(di), time, None, None),
      [True] * 6)
  with pytest.raises(ValueError, match="memory must have shape"):
    feasible_arms(d, t, mem[:3], time, 1.0, 1.0)


def test_bad_hyperparameters_raise():
  with pytest.raises(ValueError, match="gamma"):
    rucb(3, gamma=0.0)
  with pytest.raises(ValueError, match="num_arms"):
    rucb(0)
  with pytest.raises(ValueError, match="arm must lie"):
    rucb(3).update(rucb(3).init(), 3, 1.0)
  assert rucb_lib.RUCB._fields == ("init", "select", "update")


def test_detrended_fit_hand_computed():
  # gamma = 1, slope_prior = 2, noise_prior = .5 (prior_dof 2);
  # pulls (t, arm, y): (0, 0, 1.0), (1, 1, 0.0), (2, 0, 0.6)
  # arm 0: W 2, tbar 1, ybar .8, Sxx 2, Sxy -.4, Syy .08
  # arm 1: W 1, tbar 1, ybar 0, Sxx = Sxy = Syy = 0
  # slope = -.4 / (2 + 2) = -.1; RSS = .08 - .04 = .04; dof = 3 - 2 - 1 = 0
  # sigma^2 = (.04 + 2 * .25) / 2 = .27
  # at t0 = 3: level = [.8 - .2, 0 - .2] = [.6, -.2]
  # se = sigma sqrt([1/2 + 4/4, 1 + 4/4]) = [.6363961, .7348469]
  b = rucb_lib.detrended_rucb(3, phi=1.0, gamma=1.0, slope_prior=2.0,
                              noise_prior=0.5)
  s = b.init()
  for arm, y in [(0, 1.0), (1, 0.0), (0, 0.6)]:
    s = b.update(s, arm, y)
  fit = rucb_lib.detrended_fit(s, slope_prior=2.0, noise_prior=0.5)
  assert fit["slope"] == pytest.approx(-0.1)
  assert fit["sigma"] == pytest.approx(math.sqrt(0.27))
  np.testing.assert_allclose(fit["level"][:2], [0.6, -0.2])
  np.testing.assert_allclose(fit["se"][:2], [0.6363961, 0.7348469], atol=1e-7)
  assert np.isnan(fit["level"][2]) and fit["se"][2] == np.inf
  # index = level + sqrt(2 ln 3) se = [1.5433324, 0.8892664]; arm 2 unplayed
  arm, info = b.select(s, np.array([True, True, False]), seed=0)
  assert arm == 0 and not info["explore"] and info["greedy"] is True
  np.testing.assert_allclose(info["index"][:2], [1.5433324, 0.8892664],
                             atol=1e-7)
  arm, info = b.select(s, np.array([True, True, True]), seed=0)
  assert arm == 2 and info["explore"] and not info["greedy"]
  # overrun penalty in log units: y~ = y - nu (T / B - 1)
  s2 = b.update(s, 1, 0.0, time=1.5, budget=1.0)
  assert float(s2.y_sums[1]) == pytest.approx(-0.25)


def test_common_drift_cancels():
  # y = theta_a - .3 t exactly: the fitted levels at t0 are theta_a - .3 t0,
  # whatever the order of the pulls
  theta = np.array([0.0, 1.0, 0.5])
  b = rucb_lib.detrended_rucb(3, gamma=1.0, slope_prior=1e-9)
  s = b.init()
  for t, arm in enumerate([1, 1, 0, 2, 0, 2, 1, 0]):
    s = b.update(s, arm, theta[arm] - 0.3 * t)
  fit = rucb_lib.detrended_fit(s, slope_prior=1e-9, noise_prior=0.5)
  assert fit["slope"] == pytest.approx(-0.3)
  np.testing.assert_allclose(fit["level"], theta - 0.3 * 8, atol=1e-6)


def test_log_rate():
  # loss 2.0 -> 1.5 in .5 s: rate 1, log 1 = 0;
  # a loss increase floors at log(.1 * scale)
  assert rucb_lib.log_rate(2.0, 1.5, 0.5, 2.0) == pytest.approx(0.0)
  assert rucb_lib.log_rate(1.5, 2.0, 0.5, 2.0) == pytest.approx(math.log(0.2))
  with pytest.raises(ValueError):
    rucb_lib.log_rate(2.0, 1.5, 0.0, 2.0)


def test_selector_rewards_use_the_global_round_time():
  from hfl_jax.algos.selectors import RUCB as Selector, Feedback
  new = Selector(2, phi=0.5, gamma=0.98, nu=0.5)
  st = new.init(1)
  # a group that finished in 1 s while the round took 4 s: rate .5 / 4 = .125
  _, rec = new.update(st, 0, 0, Feedback(1.0, 2.0, 1.5, round_time=4.0))
  assert rec["reward"] == pytest.approx(math.log(0.125))
  _, rec2 = new.update(st, 0, 1, Feedback(3.0, 2.0, 1.5, round_time=4.0))
  # finishing early earns nothing while the others wait
  assert rec2["reward"] == rec["reward"]
  old = Selector(2, phi=0.5, gamma=0.95, nu=0.5, reward="ema")
  _, rec = old.update(old.init(1), 0, 0,
                      Feedback(1.0, 2.0, 1.5, round_time=4.0))
  # per group second; first pull: its own rate is the reference
  assert rec["reward"] == pytest.approx(0.5)


def test_selector_auto_budget():
  from hfl_jax.algos.selectors import RUCB as Selector, Feedback
  sel = Selector(4, phi=0.5, gamma=0.98, nu=0.5, time_budget_factor=1.0)
  est = np.array([1.0, 2.0, 3.0, 10.0])
  # the median over memory-feasible arms is 2 s
  mem_ok = np.array([True, True, True, False])
  rng = np.random.default_rng(0)
  st = sel.init(1)
  for _ in range(6):
    arm, rec = sel.select(st, 0, lambda: (mem_ok, est), rng)
    assert rec["time_budget"] == 2.0 and rec["over_budget"] == 1 and arm in (0, 1)
    st, _ = sel.update(st, 0, arm, Feedback(est[arm], 2.0, 1.9, round_time=2.0,
                                            budget=rec["time_budget"]))


def test_random_arm_control_obeys_the_same_budget():
  from hfl_jax.algos.selectors import RandomArm
  sel = RandomArm(4, time_budget_factor=1.0)
  est, mem_ok = np.array([1.0, 2.0, 3.0, 10.0]), np.array([True, True, True, False])
  rng = np.random.default_rng(0)
  arms = [sel.select((), 0, lambda: (mem_ok, est), rng)[0] for _ in range(40)]
  assert set(arms) == {0, 1}   # uniform over the arms within budget; the over-budget and too-big ones never


def test_bandit_config_keys():
  from pathlib import Path
  from hfl_jax.config import ConfigError, load_config
  smoke = Path(__file__).resolve().parents[1] / "experiments/configs/smoke.yaml"
  cfg = load_config(smoke, [], check_model=False)
  assert cfg.algorithm.bandit.reward == "detrended"
  with pytest.raises(ConfigError, match="algorithm.bandit.reward.*ema"):
    load_config(smoke, ["algorithm.bandit.reward=bogus"], check_model=False)
  with pytest.raises(ConfigError, match="not both"):
    load_config(smoke, ["algorithm.bandit.time_budget=5",
                        "algorithm.bandit.time_budget_factor=1"],
                check_model=False)
