"""R-UCB: resource-constrained, discounted UCB for HierFedLoRA (arXiv 2503.21213).

Each group runs one bandit whose arms are (d, tau) pairs: d is the LoRA depth
(how many top layers carry adapters, grid ``bandit.depths``) and tau the
number of intra-group aggregation rounds per global round (grid
``bandit.taus``). Every round the group picks a feasible arm (memory and time
within the group's budgets), trains with it, and feeds back a reward (loss
decrease per simulated second, ``reward_from_progress``).

The index is discounted UCB (Garivier & Moulines, 2011) with an overrun
penalty; the exact form in the paper is not public in what we have, so the
discount, the penalty and the reward normalisation below are our
reconstruction (docs/algorithm.md, "## R-UCB"):

    N_a <- gamma N_a + [a = a_t]          (discounted pull counts)
    S_a <- gamma S_a + [a = a_t] r~_t     (discounted reward sums)
    n   <- gamma n + 1                    (= sum_a N_a)
    r~_t = r_t - nu * max(0, T_t / B - 1) (overrun penalty)
    I_a = S_a / N_a + phi * sqrt(2 ln n / N_a)

Builder-style like optax: ``rucb(num_arms, phi=, gamma=, nu=)`` returns an
``RUCB(init, select, update)`` of pure functions over an ``RUCBState``
NamedTuple (a JAX pytree that round-trips through orbax). ``select`` returns
``(arm, info)`` where ``info`` is a plain dict (index values etc.). Which arms fit
the budgets is the cost model's question (:func:`hfl_jax.fed.cost.feasible_arms`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np


class RUCBState(NamedTuple):
  """Per-group bandit statistics (numpy on host; any array type accepted)."""
  counts: np.ndarray  # [A] float64, discounted pull counts N_a
  reward_sums: np.ndarray  # [A] float64, discounted penalised reward sums S_a
  total: np.ndarray  # [] float64, discounted total n = sum_a N_a
  round: np.ndarray  # [] int64, number of updates so far


class RUCB(NamedTuple):
  """The three pure functions of an R-UCB bandit (see ``rucb``)."""
  init: Callable[[], RUCBState]
  select: Callable[..., tuple[int, dict]]
  update: Callable[..., RUCBState]


def penalized_reward(reward: float, time: float | None, budget: float | None,
                     nu: float) -> float:
  """r - nu * max(0, time / budget - 1); r unchanged if time/budget is None."""
  if (time is None) != (budget is None):
    raise ValueError("give both time and budget, or neither")
  if time is None:
    return float(reward)
  if budget <= 0:
    raise ValueError(f"budget must be > 0, got {budget}")
  return float(reward) - nu * max(0.0, float(time) / float(budget) - 1.0)


def ucb_index(state: RUCBState, phi: float) -> np.ndarray:
  """UCB index I_a = S_a/N_a + phi sqrt(2 ln n / N_a) [A]; +inf if N_a == 0.

  ln n is taken of max(n, 1) so the bonus is never negative.
  """
  counts = np.asarray(state.counts, np.float64)
  sums = np.asarray(state.reward_sums, np.float64)
  n = max(float(np.asarray(state.total)), 1.0)
  played = counts > 0
  safe = np.where(played, counts, 1.0)
  idx = sums / safe + phi * np.sqrt(2.0 * math.log(n) / safe)
  return np.where(played, idx, np.inf)


def rucb(num_arms: int, *, phi: float = 1.0, gamma: float = 0.9,
         nu: float = 0.5) -> RUCB:
  """Builds a resource-constrained discounted UCB bandit.

  Args:
    num_arms: A, number of (depth, tau) arms (see ``make_arms``).
    phi: exploration constant (config ``bandit.phi``).
    gamma: discount in (0, 1] (``bandit.gamma``); 1.0 = plain UCB1.
    nu: overrun penalty weight (``bandit.nu``), >= 0.

  Returns:
    RUCB(init, select, update):
      init() -> RUCBState of zeros.
      select(state, feasible [A] bool, seed) -> (arm, info). Among feasible
        arms: the first never-played one (N_a == 0) in the order
        ``np.random.default_rng(seed).permutation(A)``; otherwise the argmax of
        the index, ties broken by that same order. Infeasible arms are never
        chosen; no feasible arm raises ValueError. ``info`` is a dict with
        ``arm``, ``explore`` (True if chosen as unplayed), ``index``, ``mean``,
        ``bonus`` (lists of length A; +inf index / nan mean for unplayed arms,
        index -inf for infeasible ones), ``feasible`` and ``round``.
      update(state, arm, reward, *, time=None, budget=None) -> new state:
        discounts every statistic by gamma and adds the penalised reward
        ``penalized_reward(reward, time, budget, nu)`` for ``arm``.
  """
  if not isinstance(num_arms, int) or num_arms < 1:
    raise ValueError(f"num_arms must be a positive int, got {num_arms!r}")
  if not 0.0 < gamma <= 1.0:
    raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
  if phi < 0 or nu < 0:
    raise ValueError(f"phi and nu must be >= 0, got phi={phi}, nu={nu}")
  a_total = num_arms

  def init() -> RUCBState:
    return RUCBState(counts=np.zeros(a_total), reward_sums=np.zeros(a_total),
                     total=np.asarray(0.0), round=np.asarray(0, np.int64))

  def select(state: RUCBState, feasible, seed: int = 0) -> tuple[int, dict]:
    feas = np.asarray(feasible, bool)
    if feas.shape != (a_total,):
      raise ValueError(f"feasible must have shape ({a_total},), "
                       f"got {feas.shape}")
    if not feas.any():
      raise ValueError("no feasible arm: every (depth, tau) exceeds the "
                       "memory or time budget")
    order = np.random.default_rng(seed).permutation(a_total)
    counts = np.asarray(state.counts, np.float64)
    idx = np.where(feas, ucb_index(state, phi), -np.inf)
    unplayed = feas & (counts <= 0)
    # Unplayed feasible arms have index +inf, so "first unplayed in order"
    # and "argmax with ties broken by order" coincide.
    arm = int(order[np.argmax(idx[order])])
    played = counts > 0
    safe = np.where(played, counts, 1.0)
    n = max(float(np.asarray(state.total)), 1.0)
    mean = np.where(played, np.asarray(state.reward_sums) / safe, np.nan)
    bonus = np.where(played, phi * np.sqrt(2.0 * math.log(n) / safe), np.inf)
    info = {
        "arm": arm,
        "explore": bool(unplayed[arm]),
        "round": int(np.asarray(state.round)),
        "index": idx.tolist(),
        "mean": mean.tolist(),
        "bonus": bonus.tolist(),
        "feasible": feas.tolist(),
    }
    return arm, info

  def update(state: RUCBState, arm: int, reward: float, *,
             time: float | None = None,
             budget: float | None = None) -> RUCBState:
    if not 0 <= int(arm) < a_total:
      raise ValueError(f"arm must lie in [0, {a_total}), got {arm}")
    r = penalized_reward(reward, time, budget, nu)
    onehot = np.arange(a_total) == int(arm)
    return RUCBState(
        counts=gamma * np.asarray(state.counts, np.float64) + onehot,
        reward_sums=gamma * np.asarray(state.reward_sums, np.float64)
        + onehot * r,
        total=np.asarray(gamma * float(np.asarray(state.total)) + 1.0),
        round=np.asarray(int(np.asarray(state.round)) + 1, np.int64))

  return RUCB(init=init, select=select, update=update)


def make_arms(depths: Sequence[int], taus: Sequence[int]
              ) -> tuple[np.ndarray, np.ndarray]:
  """Arm grid from ``bandit.depths`` x ``bandit.taus`` (depth-major).

  Returns:
    (arm_depths [A] int64, arm_taus [A] int64), A = len(depths) * len(taus);
    arm a = i * len(taus) + j is (depths[i], taus[j]).
  """
  d = np.asarray(depths, np.int64)
  t = np.asarray(taus, np.int64)
  if d.ndim != 1 or t.ndim != 1 or d.size == 0 or t.size == 0:
    raise ValueError("depths and taus must be non-empty 1-D sequences")
  return np.repeat(d, t.size), np.tile(t, d.size)


def reward_from_progress(loss_before: float, loss_after: float,
                         round_time: float, scale: float) -> float:
  """Reward = clip((loss_before - loss_after) / round_time / scale, 0, 1).

  ``scale`` is a fixed reference progress rate (loss decrease per simulated
  second), e.g. that of a reference arm in the first round; we use a fixed
  reference rather than a running one so the reward stays a pure function of
  its arguments. Loss increases give 0; rates above ``scale`` saturate at 1.
  """
  if round_time <= 0 or scale <= 0:
    raise ValueError(f"round_time and scale must be > 0, got {round_time}, "
                     f"{scale}")
  rate = (float(loss_before) - float(loss_after)) / float(round_time)
  return float(np.clip(rate / float(scale), 0.0, 1.0))
