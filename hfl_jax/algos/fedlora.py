"""FedLoRA: flat FedAvg of LoRA adapters over all devices, full depth, one aggregation per round.

Every device trains every layer's adapters and talks to the cloud directly (no edge tier).
:func:`flat` is the round shared by the flat baselines (HetLoRA, FFA-LoRA, FlexLoRA, FedProx,
FedSA-LoRA): they
change what devices train (optimizer, ranks), how the server aggregates, or what crosses
the link, not the round.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from hfl_jax.algos import stages
from hfl_jax.algos.api import AlgoState, FedAlgorithm
from hfl_jax.fed.group_aggregators import FedAvg


def one_group(label_counts, speeds, seed):
    """Every device in group 0."""
    return np.zeros(len(label_counts), np.int64)


def flat(name: str, num_layers: int, *, aggregator: Any = FedAvg(), optimizer: Callable | None = None,
         factors: str = "AB", init_host: Callable = lambda env: {}, ranks_of: Callable | None = None,
         after_round: Callable | None = None, describe: Callable = lambda host: {},
         personal: Any = None) -> FedAlgorithm:
    """A flat algorithm: one group of all devices at full depth, tau 1, no edge tier.

    Args:
      aggregator: the server's aggregator (:mod:`hfl_jax.fed.group_aggregators`).
      optimizer: ``env.optimizer -> device optimizer`` (e.g. FFA-LoRA's frozen A); default as is.
      factors: the LoRA factors devices exchange (traffic).
      init_host: ``env -> host state`` (e.g. per-device ranks); ranks_of: ``host -> [N] ranks``.
      after_round: ``(host, new global trainable) -> host`` (e.g. HetLoRA's rank pruning);
      describe: ``host -> extra record fields`` (e.g. the mean rank).
      personal: per-device adapter state kept across rounds (FedSA-LoRA's ``B``): an object with
        ``init(env) -> device tree``, ``starts(lora, device) -> [S] LoRA each device starts from``
        and ``update(device, trained [S] LoRA, kept [S] bool) -> device``.
    """
    traffic = dict(hierarchical=False, probe=False, factors=factors)

    def init(env, key) -> AlgoState:
        return AlgoState(round=0, trainable=env.initial, host=init_host(env),
                         device=personal.init(env) if personal else None)

    def round_(env, state: AlgoState, key):
        present = stages.participants(env, stages.round_rng(env, state.round))
        ranks = ranks_of(state.host) if ranks_of else stages.full_ranks(env)
        g = stages.group_view(env, 0, present, ranks)
        if g.skipped:
            new, record = stages.finish_round(state, state.trainable, [], [dict(g.record(), skipped=True)], [])
            return new, dict(record, **describe(state.host))
        opt = optimizer(env.optimizer) if optimizer else None
        starts = personal.starts(state.trainable["lora"], state.device) if personal else None
        tr, out = stages.train_group(env, state.trainable, g, depth=num_layers, tau=1,
                                     key=jax.random.fold_in(key, 0), aggregator=aggregator, optimizer=opt,
                                     device_lora=starts)
        device = (personal.update(state.device, out.devices["lora"], env.axis.put(g.present & ~out.dropped))
                  if personal else None)
        cost = stages.group_cost(env, g, num_layers, 1, **traffic)
        bad_ids = [int(i) for i in g.ids[out.dropped]]
        rec = dict(g.record(), skipped=False, arm=0, depth=num_layers, tau=1, time=cost["time"],
                   train_loss=out.train_loss, dropped=bad_ids)
        trainable = stages.global_aggregate(state.trainable, [(tr, num_layers, out.kept_weight)])
        host = after_round(state.host, trainable) if after_round else state.host
        new, record = stages.finish_round(state, trainable, [cost], [rec], bad_ids, host=host, device=device)
        return new, dict(record, **describe(host))

    def programs(env, state: AlgoState) -> list:
        return stages.programs(
            env, state.trainable, depths=(num_layers,), aggregator=aggregator,
            optimizer=optimizer(env.optimizer) if optimizer else None,
            device_lora=personal.starts(state.trainable["lora"], state.device) if personal else None,
            ranks=ranks_of(state.host) if ranks_of else None)

    return FedAlgorithm(name, (num_layers,), one_group, init, round_, programs=programs)


def build(cfg, num_layers: int) -> FedAlgorithm:
    """FedLoRA: sample-weighted FedAvg of full-rank, full-depth adapters."""
    return flat("fedlora", num_layers)
