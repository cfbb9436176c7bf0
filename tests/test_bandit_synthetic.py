"""The R-UCB selector on synthetic bandit instances (no model): does it learn within 60 pulls?

Drives the real :class:`hfl_jax.algos.selectors.RUCB` through ``select``/``update`` with
:class:`~hfl_jax.algos.selectors.Feedback` built from synthetic probe losses: a pull of arm ``a``
at pull ``t`` lowers the loss by ``p = g(t) (mu_a + 0.1 eps)``, eps ~ N(0, 1), in ``time_a``
simulated seconds (the global round time, one group).

An **exploitation pull** is any pull not forced by the unplayed-arm rule (record ``explore`` is
False): it includes pulls that the UCB bonus decided, so the fraction below counts every
index-based decision, not only the greedy ones. Each instance runs 20 seeds (0..19, not chosen);
the tests assert on the mean fraction of exploitation pulls that pick the best (feasible) arm and
on a floor for the minimum. ``python tests/test_bandit_synthetic.py`` prints mean and min for the
new (``detrended``) and the original (``ema``) reward.
"""
import numpy as np

from hfl_jax.algos.selectors import RUCB, Feedback

MEANS = np.array([0.3, 0.5, 0.8, 0.4, 0.6, 0.35])   # best arm 2
PULLS, SEEDS, NOISE = 60, range(20), 0.1
OLD = dict(reward="ema", phi=0.5, gamma=0.95, nu=0.5)   # the original selector and defaults
NEW = dict(reward="detrended", phi=0.5, gamma=0.98, nu=0.5)


def run(seed, *, means=MEANS, decay=1.0, times=None, factor=None, selector=NEW):
    """One group, ``PULLS`` pulls; returns (picks [T], forced [T] bool, feasible [A] bool)."""
    times = np.ones(len(means)) if times is None else np.asarray(times, float)
    sel = RUCB(len(means), time_budget_factor=factor, **selector)
    state = sel.init(1)
    rng, noise = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    feasible = np.ones(len(means), bool)
    if factor is not None:
        feasible = times <= factor * np.median(times)
    picks, forced = [], []
    for t in range(PULLS):
        arm, rec = sel.select(state, 0, lambda: (np.ones(len(means), bool), times), rng)
        progress = decay**t * (means[arm] + NOISE * noise.standard_normal())
        fb = Feedback(float(times[arm]), 2.0, 2.0 - progress, round_time=float(times[arm]),
                      budget=rec.get("time_budget"))
        state, _ = sel.update(state, 0, arm, fb)
        picks.append(arm)
        forced.append(rec["explore"])
    return np.array(picks), np.array(forced), feasible


def best_fraction(best, **kw):
    """Per seed: fraction of exploitation pulls that chose ``best``."""
    out = []
    for seed in SEEDS:
        picks, forced, _ = run(seed, **kw)
        out.append(np.mean(picks[~forced] == best))
    return np.array(out)


# Budget instance: rate = progress / time; the arms with the best rates (2, 4, 5) are slow, and the
# automatic budget (factor 1 x the median estimated time, 2.5 s) leaves arms 0, 1, 3 feasible;
# among them arm 1 has the best rate (0.3 vs 0.15, 0.2).
BUDGET_TIMES = np.array([1.0, 2.0, 4.0, 1.5, 3.0, 6.0])
BUDGET_MEANS = np.array([0.15, 0.6, 1.6, 0.3, 1.2, 2.4])   # rates 0.15, 0.3, 0.4, 0.2, 0.4, 0.4


def test_stationary_instance_concentrates_on_the_best_arm():
    frac = best_fraction(2)
    assert frac.mean() >= 0.8 and frac.min() >= 0.6, (frac.mean(), frac.min())


def test_drifting_instance_concentrates_on_the_best_arm():
    # every arm's progress decays by 0.95 per pull (0.05x after 60 pulls): a common drift
    frac = best_fraction(2, decay=0.95)
    assert frac.mean() >= 0.7 and frac.min() >= 0.5, (frac.mean(), frac.min())


def test_budget_instance_never_pulls_an_infeasible_arm():
    fracs = []
    for seed in SEEDS:
        picks, forced, feasible = run(seed, means=BUDGET_MEANS, times=BUDGET_TIMES, factor=1.0)
        np.testing.assert_array_equal(feasible, [True, True, False, True, False, False])
        assert feasible[picks].all(), picks
        fracs.append(np.mean(picks[~forced] == 1))
    assert np.mean(fracs) >= 0.7, np.mean(fracs)


if __name__ == "__main__":
    for name, selector in (("detrended (new)", NEW), ("ema (old)", OLD)):
        rows = [("stationary", best_fraction(2, selector=selector)),
                ("drift 0.95/pull", best_fraction(2, decay=0.95, selector=selector))]
        budget = []
        for seed in SEEDS:
            picks, forced, feasible = run(seed, means=BUDGET_MEANS, times=BUDGET_TIMES, factor=1.0,
                                          selector=selector)
            budget.append(np.mean(picks[~forced] == 1))
        rows.append(("budget (best feasible)", np.array(budget)))
        for label, f in rows:
            print(f"{name:16s} {label:24s} mean {f.mean():.3f} min {f.min():.3f}")
