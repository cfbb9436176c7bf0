"""HierFedLoRA (arXiv 2503.21213) and its ablations, as :class:`~hfl_jax.algos.spec.AlgoSpec` presets.

HierFedLoRA: devices are partitioned into near-IID groups by greedy K-means on
label-distribution KL (:func:`hfl_jax.algos.grouping.group_devices`); each group's
R-UCB bandit (:mod:`hfl_jax.algos.rucb`) picks a fine-tuning depth ``d`` and an
intra-group aggregation frequency ``tau`` every global round; groups aggregate
``tau`` times per round, then the cloud aggregates layer-wise
(:func:`hfl_jax.fed.aggregate.layerwise_aggregate`). The round itself is
:func:`hfl_jax.algos.round.run_round`, shared with the baselines.
"""
from __future__ import annotations

from hfl_jax.algos.spec import AlgoSpec, default_depths


def _grid(acfg, num_layers):
    return tuple(acfg.depths) if acfg.depths else default_depths(num_layers)


def hierfedlora(acfg, num_layers: int) -> AlgoSpec:
    """Full method: KL grouping + R-UCB over (depth, tau)."""
    return AlgoSpec("hierfedlora", "kl", acfg.num_groups, "rucb", _grid(acfg, num_layers), tuple(acfg.taus))


def random_groups(acfg, num_layers: int) -> AlgoSpec:
    """Ablation: balanced random groups instead of KL grouping."""
    return AlgoSpec("hierfedlora_random_groups", "random", acfg.num_groups, "rucb", _grid(acfg, num_layers),
                    tuple(acfg.taus))


def fixed_arm(acfg, num_layers: int) -> AlgoSpec:
    """Ablation: KL grouping, one fixed (depth, tau) for every group, no bandit."""
    d = acfg.fixed_depth if acfg.fixed_depth is not None else max(1, num_layers // 2)
    return AlgoSpec("hierfedlora_fixed", "kl", acfg.num_groups, "fixed", (d,), (acfg.fixed_tau,),
                    fixed_arm=(d, acfg.fixed_tau))


def full_depth(acfg, num_layers: int) -> AlgoSpec:
    """Ablation: KL grouping, full depth, bandit over tau only."""
    return AlgoSpec("hierfedlora_full_depth", "kl", acfg.num_groups, "rucb", (num_layers,), tuple(acfg.taus))
