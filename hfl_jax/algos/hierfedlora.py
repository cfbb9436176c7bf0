"""HierFedLoRA (arXiv 2503.21213) and its ablations.

Devices are partitioned into near-IID groups by greedy K-means on label-distribution KL
(:func:`hfl_jax.algos.grouping.group_devices`). Every global round, each group's selector
(R-UCB, :mod:`hfl_jax.algos.rucb`) picks a fine-tuning depth ``d`` and an intra-group
aggregation frequency ``tau`` within the resource limits; the group's devices train LoRA on
their top ``d`` layers (or another set, ``algorithm.layer_policy``) and aggregate at the group's
edge node ``tau`` times; the cloud then aggregates layer-wise over groups
(:func:`hfl_jax.fed.aggregate.layerwise_aggregate`) and each bandit learns from its group's progress
per second (the default ``detrended`` reward: of the global round, the slowest group's time, known
once every group has run; ``ema``: of the group's own time).

Ablations swap one part: random groups, one fixed arm, full depth only.
"""
from __future__ import annotations

import jax
import numpy as np

from hfl_jax.algos import grouping as grouping_lib
from hfl_jax.algos import privacy
from hfl_jax.algos import stages
from hfl_jax.algos.api import AlgoState, FedAlgorithm
from hfl_jax.algos.rucb import make_arms
from hfl_jax.algos.selectors import RUCB, Feedback, FixedArm, RandomArm


def default_depths(num_layers: int) -> tuple[int, ...]:
    """1, 2, 4, ... below L, and L (e.g. L=6 -> (1, 2, 4, 6); L=12 -> (1, 2, 4, 8, 12))."""
    out, d = [], 1
    while d < num_layers:
        out.append(d)
        d *= 2
    return tuple(out) + (num_layers,)


KL_SIGNALS = ("labels", "embedding")   # what KL grouping's greedy K-means can read (algorithm.grouping.signal)


def kl_groups(acfg):
    """Greedy K-means on label KL (plus ``lam`` x speed spread and ``sample_balance`` x sample
    imbalance) into ``acfg.num_groups`` groups. ``acfg.grouping`` (docs/algorithm.md, "Grouping
    without label histograms"): with ``signal: labels`` each device's histogram first goes through
    its privacy ``mechanism`` (:func:`hfl_jax.algos.privacy.private_label_counts`, noise seeded by
    the grouping seed); with ``signal: embedding`` the K-means runs on the devices' mean embeddings
    (``embeddings`` [N, H], weighted by the label counts' row sums) with the cosine distance."""
    g = getattr(acfg, "grouping", None)

    def group(label_counts, speeds, seed, embeddings=None):
        kw = dict(speeds=speeds, lam=acfg.lam, balance=acfg.sample_balance, seed=seed)
        if g is not None and g.signal == "embedding":
            if embeddings is None:
                raise ValueError("algorithm.grouping.signal: embedding needs the devices' mean embeddings")
            return grouping_lib.group_by_embedding(embeddings, np.asarray(label_counts).sum(axis=1),
                                                   acfg.num_groups, **kw)
        if g is not None:
            label_counts = privacy.private_label_counts(label_counts, g.mechanism, g.epsilon, g.delta, seed=seed)
        return grouping_lib.group_devices(label_counts, acfg.num_groups, **kw)

    return group


def random_groups_of(acfg):
    """Balanced random groups of ``acfg.num_groups``."""
    return lambda label_counts, speeds, seed, embeddings=None: grouping_lib.random_groups(
        len(label_counts), acfg.num_groups, seed=seed)


def hierarchical(name: str, *, group, selector, arm_depths, arm_taus, group_signals=("labels",)) -> FedAlgorithm:
    """A HierFedLoRA-shaped algorithm: ``group`` devices, pick each group's arm with ``selector``
    from the grid ``(arm_depths[a], arm_taus[a])``, train and aggregate at the edge, then in the cloud."""
    arm_depths, arm_taus = np.asarray(arm_depths), np.asarray(arm_taus)
    traffic = dict(hierarchical=True, probe=selector.probes)

    def init(env, key) -> AlgoState:
        return AlgoState(round=0, trainable=env.initial, host={"selector": selector.init(env.num_groups)})

    def round_(env, state: AlgoState, key):
        rng = stages.round_rng(env, state.round)
        present = stages.participants(env, rng)
        ranks = stages.full_ranks(env)
        sel = state.host["selector"]
        results, costs, groups, dropped, pulls = [], [], [], [], []
        for k in range(env.num_groups):
            g = stages.group_view(env, k, present, ranks)
            if g.skipped:
                groups.append(dict(g.record(), skipped=True))
                continue
            arm, rec = selector.select(sel, k, lambda: stages.arm_costs(
                env, g, arm_depths, arm_taus, time_budget=selector.time_budget, **traffic), rng)
            depth, tau = int(arm_depths[arm]), int(arm_taus[arm])
            gkey = jax.random.fold_in(key, k)
            before = stages.probe(env, state.trainable, g, gkey) if selector.probes else None
            tr, out = stages.train_group(env, state.trainable, g, depth=depth, tau=tau, key=gkey)
            after = stages.probe(env, tr, g, gkey) if selector.probes else None
            cost = stages.group_cost(env, g, depth, tau, **traffic)
            probe_rec = {"loss_before": before, "loss_after": after} if selector.probes else {}
            bad_ids = [int(i) for i in g.ids[out.dropped]]
            dropped += bad_ids
            results.append((tr, depth, out.kept_weight))
            costs.append(cost)
            groups.append(dict(g.record(), **rec, skipped=False, arm=int(arm), depth=depth, tau=tau,
                               time=cost["time"], **probe_rec, train_loss=out.train_loss, dropped=bad_ids))
            fb = Feedback(cost["time"], before, after, budget=rec.get("time_budget"))
            pulls.append((k, arm, groups[-1], fb))
        # every bandit learns once the round's global time (the slowest group's) is known
        seconds = stages.round_time(costs)
        for k, arm, record, fb in pulls:
            sel, learned = selector.update(sel, k, arm, fb._replace(round_time=seconds))
            record.update(learned)
        trainable = stages.global_aggregate(state.trainable, results, groups=env.num_groups,
                                            policy=env.model.layer_policy)
        return stages.finish_round(state, trainable, costs, groups, dropped, host={"selector": sel})

    depths = tuple(sorted(set(arm_depths.tolist())))
    return FedAlgorithm(name, depths, group, init, round_, probes=selector.probes, intra_rounds=int(arm_taus.max()),
                        programs=lambda env, state: stages.programs(env, state.trainable, depths=depths,
                                                                    probes=selector.probes, pad_groups=True),
                        group_signals=tuple(group_signals))


def _grid(acfg, num_layers):
    # an empty list is refused by config validation ("algorithm.depths: the arm grid is empty")
    return tuple(acfg.depths) if acfg.depths else default_depths(num_layers)


def _rucb(acfg, num_arms: int) -> RUCB:
    b = acfg.bandit
    return RUCB(num_arms, phi=b.phi, gamma=b.gamma, nu=b.nu, time_budget=b.time_budget, reward=b.reward,
                time_budget_factor=b.time_budget_factor)


def _bandit(name: str, acfg, group, depths, group_signals=KL_SIGNALS) -> FedAlgorithm:
    arm_depths, arm_taus = make_arms(depths, acfg.taus)
    return hierarchical(name, group=group, selector=_rucb(acfg, len(arm_depths)), arm_depths=arm_depths,
                        arm_taus=arm_taus, group_signals=group_signals)


def build(cfg, num_layers: int) -> FedAlgorithm:
    """HierFedLoRA: KL groups + R-UCB over (depth, tau)."""
    acfg = cfg.algorithm
    return _bandit("hierfedlora", acfg, kl_groups(acfg), _grid(acfg, num_layers))


def build_random_groups(cfg, num_layers: int) -> FedAlgorithm:
    """Ablation: balanced random groups instead of KL grouping."""
    acfg = cfg.algorithm
    return _bandit("hierfedlora_random_groups", acfg, random_groups_of(acfg), _grid(acfg, num_layers),
                   group_signals=("labels",))


def build_full_depth(cfg, num_layers: int) -> FedAlgorithm:
    """Ablation: KL groups, every group at full depth, R-UCB over tau only."""
    return _bandit("hierfedlora_full_depth", cfg.algorithm, kl_groups(cfg.algorithm), (num_layers,))


def build_random_arm(cfg, num_layers: int) -> FedAlgorithm:
    """Control: KL groups, a uniformly random arm of the same grid and budgets every round (no bandit)."""
    acfg = cfg.algorithm
    arm_depths, arm_taus = make_arms(_grid(acfg, num_layers), acfg.taus)
    b = acfg.bandit
    selector = RandomArm(len(arm_depths), time_budget=b.time_budget, time_budget_factor=b.time_budget_factor)
    return hierarchical("hierfedlora_random_arm", group=kl_groups(acfg), selector=selector, arm_depths=arm_depths, group_signals=KL_SIGNALS,
                        arm_taus=arm_taus)


def build_fixed(cfg, num_layers: int) -> FedAlgorithm:
    """Ablation: KL groups, one fixed (depth, tau) for every group, no bandit."""
    acfg = cfg.algorithm
    d = acfg.fixed_depth if acfg.fixed_depth is not None else max(1, num_layers // 2)
    return hierarchical("hierfedlora_fixed", group=kl_groups(acfg), selector=FixedArm(), arm_depths=[d], group_signals=KL_SIGNALS,
                        arm_taus=[acfg.fixed_tau])
