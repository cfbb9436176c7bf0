"""R-UCB: resource-constrained, discounted UCB for HierFedLoRA (arXiv 2503.21213).

Each group runs one bandit whose arms are (d, tau) pairs: d is the LoRA depth
(how many layers carry adapters -- the top ones, or another set under ``algorithm.layer_policy`` --
grid ``algorithm.depths``) and tau the number of intra-group aggregation rounds per global round
(grid ``algorithm.taus``). Every round the group picks a feasible arm (memory and time within the
group's budgets), trains with it, and feeds back a reward (``algorithm.bandit.reward``: the default
``detrended``, the log of the loss decrease per second of the global round, ``log_rate``, fitted
against a trend common to the arms; ``ema``, the loss decrease per second of the group's own time
over a moving reference, ``reward_from_progress``).

The index is discounted UCB (Garivier & Moulines, 2011) with an overrun
penalty; the exact form in the paper is not public in what we have, so the
discount, the penalty and the reward normalisation below are our
reconstruction (docs/algorithm.md, "## R-UCB"):

    N_a <- gamma N_a + [a = a_t]          (discounted pull counts)
    S_a <- gamma S_a + [a = a_t] r~_t     (discounted reward sums)
    n   <- gamma n + 1                    (= sum_a N_a)
    r~_t = r_t - nu * max(0, T_t / B - 1) (overrun penalty)
    I_a = S_a / N_a + phi * sqrt(2 ln n / N_a)

``detrended_rucb`` (the default, config ``bandit.reward: detrended``) learns from
log progress rates under a common drift: y_t = theta_a + beta t + noise, fitted
by discounted least squares with one level theta_a per arm and one slope beta
shared by all arms, so a drift common to all arms (training converging) cancels
from the comparison of arms (docs/algorithm.md, "### Detrended R-UCB").

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


def _check_builder(num_arms, gamma: float, phi: float, nu: float) -> None:
  if not isinstance(num_arms, int) or num_arms < 1:
    raise ValueError(f"num_arms must be a positive int, got {num_arms!r}")
  if not 0.0 < gamma <= 1.0:
    raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
  if phi < 0 or nu < 0:
    raise ValueError(f"phi and nu must be >= 0, got phi={phi}, nu={nu}")


def _feasible_and_order(feasible, num_arms: int, seed: int
                        ) -> tuple[np.ndarray, np.ndarray]:
  """``([A] bool feasible, seeded arm order)``; raises on a bad shape or no feasible arm."""
  feas = np.asarray(feasible, bool)
  if feas.shape != (num_arms,):
    raise ValueError(f"feasible must have shape ({num_arms},), "
                     f"got {feas.shape}")
  if not feas.any():
    raise ValueError("no feasible arm: every (depth, tau) exceeds the "
                     "memory or time budget")
  return feas, np.random.default_rng(seed).permutation(num_arms)


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
  _check_builder(num_arms, gamma, phi, nu)
  a_total = num_arms

  def init() -> RUCBState:
    return RUCBState(counts=np.zeros(a_total), reward_sums=np.zeros(a_total),
                     total=np.asarray(0.0), round=np.asarray(0, np.int64))

  def select(state: RUCBState, feasible, seed: int = 0) -> tuple[int, dict]:
    feas, order = _feasible_and_order(feasible, a_total, seed)
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


class DetrendedState(NamedTuple):
  """Discounted per-arm sums of the detrended bandit (weights w = gamma^age)."""
  weights: np.ndarray  # [A] float64, W_a = sum w
  t_sums: np.ndarray  # [A] float64, sum w t  (t: the bandit's pull count)
  y_sums: np.ndarray  # [A] float64, sum w y  (y: penalised log rate)
  tt_sums: np.ndarray  # [A] float64, sum w t^2
  ty_sums: np.ndarray  # [A] float64, sum w t y
  yy_sums: np.ndarray  # [A] float64, sum w y^2
  round: np.ndarray  # [] int64, number of updates so far (the next pull's t)


def detrended_fit(state: DetrendedState, *, slope_prior: float,
                  noise_prior: float, prior_dof: float = 2.0) -> dict:
  """Discounted least squares of y = theta_a + beta t over the pulls so far.

  beta = sum_a Sxy_a / (sum_a Sxx_a + slope_prior) (within-arm variation only,
  ridge ``slope_prior``); level at the current time t0 = ``state.round``:
  theta_a(t0) = ybar_a + beta (t0 - tbar_a); noise variance
  s^2 = (RSS + prior_dof noise_prior^2) / (max(0, W - P - 1) + prior_dof), P =
  played arms; standard error of theta_a(t0):
  s sqrt(1/W_a + (t0 - tbar_a)^2 / (sum_a Sxx_a + slope_prior)).

  Returns a dict of numpy values: ``level`` [A] (nan if unplayed), ``se`` [A]
  (inf if unplayed), ``slope``, ``sigma``, ``n`` (sum of weights).
  """
  w = np.asarray(state.weights, np.float64)
  played = w > 0
  safe = np.where(played, w, 1.0)
  tbar = np.asarray(state.t_sums, np.float64) / safe
  ybar = np.asarray(state.y_sums, np.float64) / safe
  sxx = np.where(played, np.asarray(state.tt_sums) - w * tbar**2, 0.0)
  sxy = np.where(played, np.asarray(state.ty_sums) - w * tbar * ybar, 0.0)
  syy = np.where(played, np.asarray(state.yy_sums) - w * ybar**2, 0.0)
  sxx_all = max(float(sxx.sum()), 0.0) + slope_prior
  slope = float(sxy.sum()) / sxx_all
  rss = max(float(syy.sum()) - slope * float(sxy.sum()), 0.0)
  dof = max(float(w.sum()) - int(played.sum()) - 1.0, 0.0)
  sigma = math.sqrt((rss + prior_dof * noise_prior**2) / (dof + prior_dof))
  t0 = float(np.asarray(state.round))
  level = np.where(played, ybar + slope * (t0 - tbar), np.nan)
  se = np.where(played, sigma * np.sqrt(1.0 / safe + (t0 - tbar)**2 / sxx_all),
                np.inf)
  return {"level": level, "se": se, "slope": slope, "sigma": sigma,
          "n": float(w.sum())}


def detrended_rucb(num_arms: int, *, phi: float = 0.5, gamma: float = 0.98,
                   nu: float = 0.5, slope_prior: float = 25.0,
                   noise_prior: float = 0.5) -> RUCB:
  """Builds the detrended resource-constrained UCB bandit (our reconstruction).

  Rewards are log progress rates y (``log_rate``); the model is
  y_t = theta_a + beta t + noise with a slope beta common to all arms, fitted
  by discounted least squares (``detrended_fit``). The index compares arms at
  the current time, where the common drift beta t cancels:

    I_a = theta_a(t0) + phi sqrt(2 ln max(n, 1)) se_a,

  a Gaussian UCB whose bonus is scaled by the fitted noise level, so phi is in
  units of standard errors and needs no knowledge of the reward's scale.

  Args:
    num_arms: A.
    phi: exploration constant (``bandit.phi``).
    gamma: discount in (0, 1] (``bandit.gamma``); window ~ 1 / (1 - gamma).
    nu: overrun penalty weight: y~ = y - nu max(0, T / B - 1).
    slope_prior: ridge precision of the slope (in pulls^2): the slope is
      shrunk to 0 until the arms' repeat pulls span about sqrt(slope_prior)
      pulls.
    noise_prior: prior noise std of y (log units), worth ``prior_dof = 2``
      residual degrees of freedom.

  Returns:
    RUCB(init, select, update) with the same contract as :func:`rucb`:
    unplayed feasible arms first (seeded order), then argmax of I_a over
    feasible arms; ``info`` also has ``greedy`` (the chosen arm also has the
    highest fitted level among played feasible arms), ``level``, ``se``,
    ``slope``, ``sigma``.
  """
  _check_builder(num_arms, gamma, phi, nu)
  if slope_prior <= 0 or noise_prior <= 0:
    raise ValueError("need slope_prior, noise_prior > 0")
  a_total = num_arms
  fields = DetrendedState._fields[:-1]

  def init() -> DetrendedState:
    return DetrendedState(*[np.zeros(a_total) for _ in fields],
                          round=np.asarray(0, np.int64))

  def select(state: DetrendedState, feasible, seed: int = 0
             ) -> tuple[int, dict]:
    feas, order = _feasible_and_order(feasible, a_total, seed)
    fit = detrended_fit(state, slope_prior=slope_prior,
                        noise_prior=noise_prior)
    played = np.asarray(state.weights) > 0
    se = np.where(played, fit["se"], 0.0)
    bonus = phi * math.sqrt(2.0 * math.log(max(fit["n"], 1.0))) * se
    idx = np.where(played, fit["level"] + bonus, np.inf)
    idx = np.where(feas, idx, -np.inf)
    arm = int(order[np.argmax(idx[order])])
    level = np.where(feas & played, fit["level"], -np.inf)
    greedy = bool(played[arm] and level[arm] >= level.max())
    info = {"arm": arm, "explore": not bool(played[arm]), "greedy": greedy,
            "round": int(np.asarray(state.round)), "index": idx.tolist(),
            "level": fit["level"].tolist(), "se": fit["se"].tolist(),
            "slope": fit["slope"], "sigma": fit["sigma"],
            "feasible": feas.tolist()}
    return arm, info

  def update(state: DetrendedState, arm: int, reward: float, *,
             time: float | None = None,
             budget: float | None = None) -> DetrendedState:
    if not 0 <= int(arm) < a_total:
      raise ValueError(f"arm must lie in [0, {a_total}), got {arm}")
    y = penalized_reward(reward, time, budget, nu)
    t = float(np.asarray(state.round))
    onehot = (np.arange(a_total) == int(arm)).astype(np.float64)
    add = (1.0, t, y, t * t, t * y, y * y)
    new = [gamma * np.asarray(getattr(state, f), np.float64) + onehot * v
           for f, v in zip(fields, add)]
    return DetrendedState(*new, round=np.asarray(int(t) + 1, np.int64))

  return RUCB(init=init, select=select, update=update)


def log_rate(loss_before: float, loss_after: float, round_time: float,
             scale: float, floor: float = 0.1) -> float:
  """y = log(max(rate, floor * scale)), rate = (before - after) / round_time.

  ``scale`` is a typical |rate| of the group (a running average); a loss
  increase or a tiny decrease scores log(floor * scale), so one bad probe
  costs a bounded log(1 / floor) below a typical pull instead of -inf.
  """
  if round_time <= 0 or scale <= 0:
    raise ValueError(f"round_time and scale must be > 0, got {round_time}, "
                     f"{scale}")
  rate = (float(loss_before) - float(loss_after)) / float(round_time)
  return math.log(max(rate, floor * float(scale)))


def make_arms(depths: Sequence[int], taus: Sequence[int]
              ) -> tuple[np.ndarray, np.ndarray]:
  """Arm grid from ``algorithm.depths`` x ``algorithm.taus`` (depth-major).

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
