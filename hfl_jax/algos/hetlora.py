"""HetLoRA baseline (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", 2024): per-device ranks from device capability, rank truncation on
download, zero-padding aggregation with sparsity weights (``algorithm.hetlora.sparsity``: by default the
adapter's norm ||A'B'||_F, or the update's norm), rank self-pruning.

The flat round is :func:`hfl_jax.algos.fedlora.flat`; the aggregation is
:class:`hfl_jax.fed.group_aggregators.RankPadded`. Reconstruction notes: docs/algorithm.md.
"""
from __future__ import annotations

import numpy as np

from hfl_jax.algos.api import FedAlgorithm
from hfl_jax.algos.fedlora import flat
from hfl_jax.errors import ConfigError
from hfl_jax.fed.group_aggregators import RankPadded
from hfl_jax.models.lora import LoRA


def build(cfg, num_layers: int) -> FedAlgorithm:
    """One group of all devices; full depth; tau 1; heterogeneous ranks pruned after each round."""
    h = cfg.algorithm.hetlora
    ranks = device_ranks(h.ranks, cfg.lora.rank, "algorithm.hetlora.ranks")

    def prune(host, trainable):
        norms = component_norms(trainable["lora"])
        return {"ranks": prune_ranks(host["ranks"], norms, h.prune_factor, h.prune_threshold, h.min_rank)}

    return flat("hetlora", num_layers, aggregator=RankPadded(h.sparsity, h.padding),
                init_host=lambda env: {"ranks": assign_ranks(env.profiles["flops"], ranks)},
                ranks_of=lambda host: host["ranks"], after_round=prune,
                describe=lambda host: {"mean_rank": float(np.mean(host["ranks"]))})


def default_ranks(lora_rank: int) -> tuple[int, ...]:
    """The device ranks when ``algorithm.{hetlora,flexlora}.ranks`` is null: ``r // 4``, ``r // 2``
    and ``r`` for ``r = lora.rank`` (each at least 1), deduplicated and sorted (slow -> fast tiers):
    ``(2, 4, 8)`` for rank 8 (the fixed default of earlier versions), ``(1, 2, 4)`` for rank 4,
    ``(1, 2)`` for rank 2, ``(1,)`` for rank 1."""
    r = int(lora_rank)
    return tuple(sorted({max(1, r // 4), max(1, r // 2), max(1, r)}))


def device_ranks(ranks, lora_rank: int, key: str) -> tuple[int, ...]:
    """``ranks`` checked against ``lora.rank`` (:func:`check_ranks`), or :func:`default_ranks` when ``None``."""
    if ranks is None:
        return default_ranks(lora_rank)
    check_ranks(ranks, lora_rank, key)
    return tuple(ranks)


def check_ranks(ranks, lora_rank: int, key: str) -> None:
    """Device ranks must be ints in ``[1, lora.rank]`` (the global adapters hold the largest)."""
    if not ranks or min(ranks) < 1 or max(ranks) > lora_rank:
        raise ConfigError(f"{key}: must be ints in [1, lora.rank={lora_rank}], got {list(ranks)}")


def assign_ranks(flops: np.ndarray, ranks: tuple[int, ...]) -> np.ndarray:
    """``[N]`` initial ranks: devices sorted by compute speed are split into ``len(ranks)``
    equal tiers, the slowest tier getting ``ranks[0]`` (ties by device index)."""
    flops = np.asarray(flops, np.float64)
    order = np.argsort(flops, kind="stable")
    tiers = np.empty(len(flops), np.int64)
    tiers[order] = np.arange(len(flops)) * len(ranks) // max(len(flops), 1)
    return np.asarray(ranks, np.int32)[tiers]


def component_norms(lora: LoRA) -> np.ndarray:
    """``[r]`` norm of each rank component over all targets and layers: ``||A[..., j]|| * ||B[..., j, :]||``
    summed in quadrature (the component's contribution to ``delta W``, up to cross terms)."""
    total = 0.0
    for ab in lora.weights.values():
        a = np.asarray(ab["A"], np.float64)   # [L, in, r]
        b = np.asarray(ab["B"], np.float64)   # [L, r, out]
        total = total + (np.square(a).sum(1) * np.square(b).sum(2)).sum(0)   # [r]
    return np.sqrt(total)


def prune_ranks(ranks: np.ndarray, norms: np.ndarray, factor: float, threshold: float,
                min_rank: int) -> np.ndarray:
    """Rank self-pruning: a device of rank ``r`` drops to ``r' = max(min_rank, floor(factor r))``
    when the components it would drop carry little weight:
    ``||norms[r':r]|| <= threshold * ||norms[:r']||``. Pure; returns new ``[N]`` ranks."""
    ranks = np.asarray(ranks, np.int32).copy()
    for i, r in enumerate(ranks):
        r_new = max(int(min_rank), int(np.floor(factor * r)))
        if r_new >= r:
            continue
        dropped = np.linalg.norm(norms[r_new:r])
        kept = np.linalg.norm(norms[:r_new])
        if dropped <= threshold * kept:
            ranks[i] = r_new
    return ranks
