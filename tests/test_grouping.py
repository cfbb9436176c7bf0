"""Tests for hfl_jax.algos.grouping (host-side numpy, no jax needed)."""

import math

import numpy as np
import pytest

from hfl_jax.algos import grouping
from hfl_jax.algos.grouping import group_devices, group_report, random_groups


def dirichlet_counts(n_devices: int, n_classes: int, *, alpha: float = 0.1,
                     per_device: int = 500, seed: int = 0) -> np.ndarray:
  """[N, C] label counts: each class's samples split by Dirichlet(alpha)."""
  rng = np.random.default_rng(seed)
  per_class = n_devices * per_device // n_classes
  out = np.zeros((n_devices, n_classes), np.int64)
  for c in range(n_classes):
    out[:, c] = rng.multinomial(per_class,
                                rng.dirichlet(alpha * np.ones(n_devices)))
  return out


# ---------------------------------------------------------------- objective


def test_objective_hand_computed():
  # Devices [[3,1],[1,1],[0,2],[2,0]], groups {0,1} and {2,3}.
  # Global q = [6,4]/10 = [.6,.4].
  # Group 0: [4,2] -> q0 = [2/3,1/3], n0/n = .6
  #   KL0 = 2/3 ln((2/3)/.6) + 1/3 ln((1/3)/.4) = 0.0702403 - 0.0607739
  #       = 0.0094665
  # Group 1: [2,2] -> q1 = [.5,.5], n1/n = .4
  #   KL1 = .5 ln(.5/.6) + .5 ln(.5/.4) = -0.0911608 + 0.1115718 = 0.0204110
  # Data term = .6 * 0.0094665 + .4 * 0.0204110 = 0.0138443.
  x = np.array([[3, 1], [1, 1], [0, 2], [2, 0]])
  a = np.array([0, 0, 1, 1])
  rep = group_report(x, a)
  np.testing.assert_allclose(rep["kl"], [0.0094665, 0.0204110], atol=2e-6)
  np.testing.assert_allclose(rep["data_objective"], 0.0138443, atol=2e-6)
  np.testing.assert_array_equal(rep["sizes"], [2, 2])
  np.testing.assert_array_equal(rep["samples"], [6, 4])
  # Speeds [1, e, 1, e^3]: log-speeds {0,1} and {0,3}; population std .5 and
  # 1.5; size-weighted mean = .5 * .5 + .5 * 1.5 = 1.0.
  speeds = np.array([1.0, math.e, 1.0, math.e**3])
  rep = group_report(x, a, speeds, lam=0.1)
  np.testing.assert_allclose(rep["speed_spread"], [0.5, 1.5], atol=1e-12)
  np.testing.assert_allclose(rep["speed_objective"], 1.0, atol=1e-12)
  np.testing.assert_allclose(rep["objective"], 0.0138443 + 0.1, atol=2e-6)
  np.testing.assert_allclose(
      grouping.grouping_objective(x, a, speeds=speeds, lam=0.1),
      0.0138443 + 0.1, atol=2e-6)


def test_tiny_case_finds_perfect_mix():
  # Two pure-A and two pure-B devices; the only zero-KL split pairs A with B.
  x = np.array([[10, 0], [10, 0], [0, 10], [0, 10]])
  a = group_devices(x, 2, seed=3)
  assert a[0] != a[1] and a[2] != a[3]
  assert group_report(x, a)["data_objective"] < 1e-9


# ---------------------------------------------------------------- quality


@pytest.mark.parametrize("n_classes", [2, 10])
def test_beats_random_grouping_on_dirichlet(n_classes):
  x = dirichlet_counts(80, n_classes, seed=0)
  a = group_devices(x, 8, seed=0)
  rep = group_report(x, a)
  rand = np.mean([group_report(x, random_groups(80, 8, seed=s))["mean_kl"]
                  for s in range(20)])
  assert rand > 0.05  # the random baseline is really non-IID
  assert rep["mean_kl"] <= rand / 5, (rep["mean_kl"], rand)
  np.testing.assert_array_equal(rep["sizes"], np.full(8, 10))


def test_lam_lowers_speed_spread():
  x = dirichlet_counts(80, 10, seed=1)
  speeds = np.random.default_rng(7).lognormal(0.0, 1.0, size=80)
  r0 = group_report(x, group_devices(x, 8, speeds=speeds, lam=0.0), speeds)
  r1 = group_report(x, group_devices(x, 8, speeds=speeds, lam=1.0), speeds)
  assert r1["speed_objective"] < 0.6 * r0["speed_objective"], (
      r0["speed_objective"], r1["speed_objective"])
  # The speed term is traded against the data term, not free.
  assert r1["data_objective"] >= r0["data_objective"]


def test_size_bounds_respected_and_configurable():
  x = dirichlet_counts(30, 4, seed=2)
  a = group_devices(x, 4)  # default floor/ceil(30/4) = 7..8
  sizes = np.bincount(a, minlength=4)
  assert sizes.min() >= 7 and sizes.max() <= 8 and sizes.sum() == 30
  a = group_devices(x, 4, min_size=2, max_size=12)
  sizes = np.bincount(a, minlength=4)
  assert sizes.min() >= 2 and sizes.max() <= 12
  with pytest.raises(ValueError, match="cannot partition"):
    group_devices(x, 4, min_size=8, max_size=9)


# ---------------------------------------------------------------- behaviour


def test_deterministic_for_seed():
  x = dirichlet_counts(40, 5, seed=3)
  speeds = np.random.default_rng(0).lognormal(size=40)
  a1 = group_devices(x, 5, speeds=speeds, lam=0.5, seed=11)
  a2 = group_devices(x, 5, speeds=speeds, lam=0.5, seed=11)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(random_groups(40, 5, seed=4),
                                random_groups(40, 5, seed=4))


def test_k_greater_than_n_raises():
  x = np.ones((3, 2))
  with pytest.raises(ValueError, match=r"num_groups=5.*N=3"):
    group_devices(x, 5)
  with pytest.raises(ValueError, match=r"num_groups=5.*N=3"):
    random_groups(3, 5)


def test_k_one_gives_zeros():
  x = dirichlet_counts(10, 3, seed=0)
  a = group_devices(x, 1)
  np.testing.assert_array_equal(a, np.zeros(10, np.int64))


def test_empty_devices():
  # 4 non-empty devices + 4 empty ones, 2 groups of 4.
  x = np.array([[10, 0], [10, 0], [0, 10], [0, 10]] + [[0, 0]] * 4)
  a = group_devices(x, 2, seed=0)
  np.testing.assert_array_equal(np.bincount(a), [4, 4])
  assert a[0] != a[1] and a[2] != a[3]
  rep = group_report(x, a)
  # Empty devices do not change the KL: same as the non-empty devices alone.
  rep_ne = group_report(x[:4], a[:4], num_groups=2)
  np.testing.assert_allclose(rep["kl"], rep_ne["kl"], atol=1e-15)
  assert rep["data_objective"] < 1e-9
  # All devices empty: still a balanced assignment, zero objective.
  a = group_devices(np.zeros((6, 3)), 3)
  np.testing.assert_array_equal(np.bincount(a), [2, 2, 2])
  assert group_report(np.zeros((6, 3)), a)["objective"] == 0.0


def test_bad_inputs_raise():
  x = np.ones((4, 2))
  with pytest.raises(ValueError, match="num_groups must be >= 1"):
    group_devices(x, 0)
  with pytest.raises(ValueError, match=r"shape \[N, C\]"):
    group_devices(np.ones(4), 2)
  with pytest.raises(ValueError, match="non-negative"):
    group_devices(-x, 2)
  with pytest.raises(ValueError, match="speeds must have shape"):
    group_devices(x, 2, speeds=np.ones(3))
  with pytest.raises(ValueError, match="speeds must be finite and > 0"):
    group_devices(x, 2, speeds=np.zeros(4))
  with pytest.raises(ValueError, match="assignment"):
    group_report(x, np.array([0, 1, 2]))


def test_random_groups_balanced():
  a = random_groups(10, 3, seed=0)
  np.testing.assert_array_equal(np.sort(np.bincount(a)), [3, 3, 4])


def test_sample_balance_term_evens_out_group_samples():
    # two big single-class devices and many small mixed ones: KL alone puts both big devices
    # with small ones of the other class; the balance term must even out sample totals
    rng = np.random.default_rng(0)
    small = rng.integers(1, 4, size=(14, 2))
    counts = np.concatenate([[[200, 0], [0, 30]], small]).astype(float)
    plain = group_devices(counts, 2, seed=0)
    balanced = group_devices(counts, 2, balance=5.0, seed=0)
    share = lambda a: group_report(counts, a)["samples"].max() / counts.sum()
    rep = group_report(counts, balanced, balance=5.0)
    assert rep["balance_objective"] == pytest.approx(
        2 * sum((s / counts.sum() - 0.5) ** 2 for s in rep["samples"]))
    assert rep["objective"] == pytest.approx(rep["data_objective"] + 5.0 * rep["balance_objective"])
    assert share(balanced) <= share(plain)
    # the greedy search does at least as well as the plain grouping on the balanced objective
    obj = lambda a: grouping.grouping_objective(counts, a, balance=5.0)
    assert obj(balanced) <= obj(plain) + 1e-12
