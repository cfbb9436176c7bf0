"""Arm selectors: how each group picks its ``(depth, tau)`` arm every round.

One interface, host-side and pure (state in, state out):

* ``probes``: whether the selector needs the progress probe (loss before/after on probe batches);
* ``init(num_groups) -> state`` (a pytree of numpy leaves, checkpointed as JSON);
* ``select(state, k, arm_costs, rng) -> (arm, record)``: ``arm_costs()`` returns
  ``([A] feasible, [A] estimated seconds)`` and is only called by selectors that need it;
  ``rng`` is the round's host generator;
* ``update(state, k, arm, feedback) -> (state, record)`` with a :class:`Feedback`.

:class:`FixedArm` (one arm, no bandit), :class:`RUCB` (the paper's resource-constrained
discounted UCB, :mod:`hfl_jax.algos.rucb`) and :class:`RandomArm` (a uniformly random feasible
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


def _feasible_or_cheapest(arm_costs) -> tuple[np.ndarray, dict]:
    """The feasible arms; when none fits, the cheapest one (and the record says so)."""
    ok, est = arm_costs()
    if ok.any():
        return ok, {}
    return est == est.min(), {"infeasible_fallback": True}


@dataclasses.dataclass(frozen=True)
class FixedArm:
    """Always arm 0 (the algorithm's arm grid holds one arm)."""
    probes = False

    def init(self, num_groups: int):
        return ()

    def select(self, state, k, arm_costs, rng):
        return 0, {}

    def update(self, state, k, arm, feedback: Feedback):
        return state, {}


@dataclasses.dataclass(frozen=True)
class RandomArm:
    """A uniformly random feasible arm every round (no learning): the control for R-UCB."""
    num_arms: int
    probes = False

    def init(self, num_groups: int):
        return ()

    def select(self, state, k, arm_costs, rng):
        ok, rec = _feasible_or_cheapest(arm_costs)
        return int(rng.choice(np.flatnonzero(ok))), rec

    def update(self, state, k, arm, feedback: Feedback):
        return state, {}


class RUCBSelectorState(NamedTuple):
    bandits: tuple                     # per group RUCBState
    reward_scale: np.ndarray           # [K] EMA (factor gamma) of |progress rate| per group (reward normaliser)


@dataclasses.dataclass(frozen=True)
class RUCB:
    """One R-UCB bandit per group (:func:`hfl_jax.algos.rucb.rucb`), rewarded by probe-loss
    progress per simulated second relative to the group's typical rate (docs/algorithm.md)."""
    num_arms: int
    phi: float
    gamma: float
    nu: float
    time_budget: float | None = None
    probes = True

    @property
    def bandit(self) -> rucb_lib.RUCB:
        return rucb_lib.rucb(self.num_arms, phi=self.phi, gamma=self.gamma, nu=self.nu)

    def init(self, num_groups: int) -> RUCBSelectorState:
        return RUCBSelectorState(tuple(self.bandit.init() for _ in range(num_groups)), np.zeros(num_groups))

    def select(self, state: RUCBSelectorState, k, arm_costs, rng):
        ok, rec = _feasible_or_cheapest(arm_costs)
        arm, info = self.bandit.select(state.bandits[k], ok, seed=int(rng.integers(2**31)))
        # the pull's full log: UCB index per arm (None: unplayed or infeasible)
        return arm, dict(rec, explore=info["explore"],
                         ucb_index=[float(x) if np.isfinite(x) else None for x in info["index"]])

    def update(self, state: RUCBSelectorState, k, arm, feedback: Feedback):
        before, after, time = feedback.loss_before, feedback.loss_after, feedback.time
        scales = np.array(state.reward_scale, np.float64)
        rate = (before - after) / max(time, 1e-12)
        ref = scales[k] if scales[k] > 0 else max(abs(rate), 1e-12)
        # reward 0.5 at the group's typical progress rate (EMA of past |rates|), 1 at twice it
        reward = rucb_lib.reward_from_progress(before, after, time, 2.0 * ref)
        scales[k] = self.gamma * ref + (1 - self.gamma) * max(abs(rate), 1e-12)
        budget = {"time": time, "budget": self.time_budget} if self.time_budget else {}
        bandits = list(state.bandits)
        bandits[k] = self.bandit.update(bandits[k], arm, reward, **budget)
        return RUCBSelectorState(tuple(bandits), scales), {"reward": float(reward)}


# Selectors by name (algorithm files compose them).
SELECTORS = {"fixed": FixedArm, "rucb": RUCB, "random": RandomArm}
