"""Arm selectors: how each group picks its ``(depth, tau)`` arm every round.

One interface, host-side and pure (state in, state out):

* ``probes``: whether the selector needs the progress probe (loss before/after on probe batches);
* ``init(num_groups) -> state`` (a pytree of numpy leaves, checkpointed as JSON);
* ``select(state, k, arm_costs, rng) -> (arm, record)``: ``arm_costs()`` returns
  ``([A] feasible, [A] estimated seconds)`` and is only called by selectors that need it;
  ``rng`` is the round's host generator;
* ``update(state, k, arm, feedback) -> (state, record)`` with a :class:`Feedback`.

:class:`FixedArm` (one arm, no bandit), :class:`RUCB` (the paper's resource-constrained
discounted UCB, :mod:`hfl_jax.algos.rucb`; reward and bandit model chosen by ``REWARDS``) and :class:`RandomArm` (a uniformly random feasible
arm: the bandit's control).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from hfl_jax.algos import rucb as rucb_lib


class Feedback(NamedTuple):
    """What a group's round tells its selector."""
    time: float                        # the group round's simulated seconds
    loss_before: float | None = None   # probe loss before training (selectors that probe)
    loss_after: float | None = None
    round_time: float | None = None    # the global round's simulated seconds (the slowest group's)
    budget: float | None = None        # the time budget the arm was chosen under (record "time_budget")


def _feasible_or_cheapest(arm_costs) -> tuple[np.ndarray, dict]:
    """The feasible arms; when none fits, the cheapest one (and the record says so)."""
    ok, est = arm_costs()
    if ok.any():
        return ok, {}
    return est == est.min(), {"infeasible_fallback": True}


def budgeted_arms(arm_costs, factor: float | None) -> tuple[np.ndarray, dict]:
    """The arms a selector may pull: :func:`_feasible_or_cheapest` after the automatic time budget
    (``factor`` x the median estimated time of the memory- and ``time_budget``-feasible arms).
    The record carries the budget and how many of those arms it excluded (``over_budget``)."""
    ok, est = arm_costs()
    if factor is None or not ok.any():
        return _feasible_or_cheapest(lambda: (ok, est))
    budget = factor * float(np.median(est[ok]))
    within = ok & (est <= budget)
    arms, rec = _feasible_or_cheapest(lambda: (within, est))
    return arms, dict(rec, time_budget=budget, over_budget=int((ok & ~within).sum()))


@dataclasses.dataclass(frozen=True)
class FixedArm:
    """Always arm 0 (the algorithm's arm grid holds one arm)."""
    probes = False
    time_budget = None

    def init(self, num_groups: int):
        return ()

    def select(self, state, k, arm_costs, rng):
        return 0, {}

    def update(self, state, k, arm, feedback: Feedback):
        return state, {}


@dataclasses.dataclass(frozen=True)
class RandomArm:
    """A uniformly random feasible arm every round (no learning): the control for R-UCB, under the
    same budgets (``time_budget`` seconds, ``time_budget_factor`` as :class:`RUCB`'s)."""
    num_arms: int
    time_budget: float | None = None   # per-round seconds; arms estimated above it are infeasible
    time_budget_factor: float | None = None
    probes = False

    def init(self, num_groups: int):
        return ()

    def select(self, state, k, arm_costs, rng):
        ok, rec = budgeted_arms(arm_costs, self.time_budget_factor)
        return int(rng.choice(np.flatnonzero(ok))), rec

    def update(self, state, k, arm, feedback: Feedback):
        return state, {}


class RUCBSelectorState(NamedTuple):
    bandits: tuple                     # per group RUCBState ("ema") or DetrendedState ("detrended")
    reward_scale: np.ndarray           # [K] running |progress rate| per group (reward normaliser / log floor)


def _ema_reward(sel: "RUCB", scale: float, fb: Feedback) -> tuple[float, float]:
    """The original reward: clip(rate / (2 ref), 0, 1), rate per *group* second, ref an EMA
    (factor gamma) of the group's past |rate|. Returns (reward, new ref)."""
    before, after, time = fb.loss_before, fb.loss_after, fb.time
    rate = (before - after) / max(time, 1e-12)
    ref = scale if scale > 0 else max(abs(rate), 1e-12)
    # reward 0.5 at the group's typical progress rate (EMA of past |rates|), 1 at twice it
    reward = rucb_lib.reward_from_progress(before, after, time, 2.0 * ref)
    return reward, sel.gamma * ref + (1 - sel.gamma) * max(abs(rate), 1e-12)


def _log_rate_reward(sel: "RUCB", scale: float, fb: Feedback) -> tuple[float, float]:
    """log(progress / global round time), floored at log(0.1 ref), ref an average (factor 1/2) of
    the group's past |rate|. Returns (reward, new ref)."""
    time = fb.round_time if fb.round_time is not None else fb.time
    rate = (fb.loss_before - fb.loss_after) / max(time, 1e-12)
    ref = scale if scale > 0 else max(abs(rate), 1e-12)
    y = rucb_lib.log_rate(fb.loss_before, fb.loss_after, max(time, 1e-12), ref)
    return y, 0.5 * ref + 0.5 * max(abs(rate), 1e-12)


# algorithm.bandit.reward -> (bandit builder, reward function)
REWARDS = {
    "ema": (rucb_lib.rucb, _ema_reward),
    "detrended": (rucb_lib.detrended_rucb, _log_rate_reward),
}


@dataclasses.dataclass(frozen=True)
class RUCB:
    """One R-UCB bandit per group, rewarded by probe-loss progress per simulated second
    (docs/algorithm.md, "## R-UCB").

    ``reward="detrended"``: log(progress / global round time) into the detrended bandit
    (:func:`hfl_jax.algos.rucb.detrended_rucb`); ``"ema"``: the original reward (progress per
    group second over an EMA of past rates, in [0, 1]) into :func:`hfl_jax.algos.rucb.rucb`.
    ``time_budget`` (seconds) or ``time_budget_factor`` (budget = factor x the median estimated
    time of the group's memory-feasible arms, every round) makes slower arms infeasible.
    """
    num_arms: int
    phi: float
    gamma: float
    nu: float
    time_budget: float | None = None
    reward: str = "detrended"
    time_budget_factor: float | None = None
    probes = True

    @property
    def bandit(self) -> rucb_lib.RUCB:
        return REWARDS[self.reward][0](self.num_arms, phi=self.phi, gamma=self.gamma, nu=self.nu)

    def init(self, num_groups: int) -> RUCBSelectorState:
        return RUCBSelectorState(tuple(self.bandit.init() for _ in range(num_groups)), np.zeros(num_groups))

    def select(self, state: RUCBSelectorState, k, arm_costs, rng):
        ok, rec = budgeted_arms(arm_costs, self.time_budget_factor)
        arm, info = self.bandit.select(state.bandits[k], ok, seed=int(rng.integers(2**31)))
        extra = {"greedy": info["greedy"]} if "greedy" in info else {}
        # the pull's full log: UCB index per arm (None: unplayed or infeasible)
        return arm, dict(rec, explore=info["explore"], **extra,
                         ucb_index=[float(x) if np.isfinite(x) else None for x in info["index"]])

    def update(self, state: RUCBSelectorState, k, arm, feedback: Feedback):
        scales = np.array(state.reward_scale, np.float64)
        reward, scales[k] = REWARDS[self.reward][1](self, scales[k], feedback)
        limit = feedback.budget if feedback.budget is not None else self.time_budget
        budget = {"time": feedback.time, "budget": limit} if limit else {}
        bandits = list(state.bandits)
        bandits[k] = self.bandit.update(bandits[k], arm, reward, **budget)
        return RUCBSelectorState(tuple(bandits), scales), {"reward": float(reward)}


# Selectors by name (algorithm files compose them).
SELECTORS = {"fixed": FixedArm, "rucb": RUCB, "random": RandomArm}
