"""HetLoRA baseline (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", 2024): per-device ranks from device capability, rank truncation on
download, zero-padding aggregation with sparsity (update-norm) weights, rank self-pruning.

The aggregation itself is :func:`hfl_jax.fed.aggregate.rank_padded_mean`, applied in the
group round (``aggregator="hetlora"``, :func:`hfl_jax.fed.engine.make_group_round`).
Reconstruction notes are in docs/algorithm.md.
"""
from __future__ import annotations

import jax
import numpy as np

from hfl_jax.algos.spec import AlgoSpec
from hfl_jax.models.lora import LoRA


def hetlora(acfg, num_layers: int) -> AlgoSpec:
    """One group of all devices; full depth; tau 1; heterogeneous ranks; no edge tier."""
    return AlgoSpec("hetlora", "single", 1, "fixed", (num_layers,), (1,), fixed_arm=(num_layers, 1),
                    aggregator="hetlora", hierarchical=False)


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
