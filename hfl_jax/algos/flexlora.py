"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources", NeurIPS 2024).

Devices hold LoRA of different ranks ``r_i`` (by compute tier, like HetLoRA's initial ranks).
The server averages the full products ``B_i A_i`` (sample-weighted) and refactors the mean by
SVD; each device downloads the rank-``r_i`` truncated SVD of the average
(:class:`hfl_jax.fed.group_aggregators.SVDProductMean`: the global adapter holds the top
``lora.rank`` singular components, a device keeps its first ``r_i``). No rank pruning.
The flat round is :func:`hfl_jax.algos.fedlora.flat`.
"""
from __future__ import annotations

import numpy as np

from hfl_jax.algos.api import FedAlgorithm
from hfl_jax.algos.fedlora import flat
from hfl_jax.algos.hetlora import assign_ranks, device_ranks
from hfl_jax.fed.group_aggregators import SVDProductMean


def build(cfg, num_layers: int) -> FedAlgorithm:
    """FlexLoRA: heterogeneous ranks ``algorithm.flexlora.ranks`` (null: derived from ``lora.rank``,
    :func:`hfl_jax.algos.hetlora.default_ranks`), product averaging + truncated SVD."""
    ranks = device_ranks(cfg.algorithm.flexlora.ranks, cfg.lora.rank, "algorithm.flexlora.ranks")
    return flat("flexlora", num_layers, aggregator=SVDProductMean(),
                init_host=lambda env: {"ranks": assign_ranks(env.profiles["flops"], ranks)},
                ranks_of=lambda host: host["ranks"],
                describe=lambda host: {"mean_rank": float(np.mean(host["ranks"]))})
