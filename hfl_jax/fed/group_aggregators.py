"""Group aggregators: how a group's devices' trained adapters become the group model.

Each is a small frozen (hashable) object called inside the compiled group round
(:func:`hfl_jax.fed.engine.make_group_round`):

    aggregator(new, old, weights, ranks) -> (aggregate, finite [M], used [M])

``new``: the devices' trainables (leaves ``[M, ...]``); ``old``: the group model they started
from; ``weights``: ``[M]`` sample counts (0 for absent/padding slots); ``ranks``: ``[M]`` the
devices' LoRA ranks. Devices whose update is not finite are dropped (``finite``), ``used`` is
the weight each device actually got. The head is always the sample-weighted mean.
Formulas: ``docs/aggregation.md``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hfl_jax.fed.aggregate import rank_padded_mean, svd_product_mean, weighted_mean

Array = jax.Array


def adapter_norms(new: Any, old: Any, ranks: Array) -> Array:
    """``[M]`` ``sqrt(sum_targets,layers ||A'_m B'_m||_F^2)``: the norm of each device's whole adapter."""
    sq = [jnp.square(jnp.einsum("m...ir,m...ro->m...io", ab["A"], ab["B"])).reshape(ab["A"].shape[0], -1).sum(1)
          for ab in new["lora"].weights.values()]
    return jnp.sqrt(sum(sq))


def update_norms(new: Any, old: Any, ranks: Array) -> Array:
    """``[M]`` HetLoRA sparsity weights: ``sqrt(sum_targets,layers ||A'_m B'_m - A_{:r_m} B_{:r_m}||_F^2)``,
    each device's update against the rank-``r_m`` truncation it received."""
    keep = (jnp.arange(old["lora"].rank)[None, :] < ranks[:, None]).astype(jnp.float32)   # [M, r]

    def delta(ab_new, ab_old):
        a_old = ab_old["A"][None] * keep.reshape(keep.shape[0], *(1,) * (ab_old["A"].ndim - 1), -1)
        return (jnp.einsum("m...ir,m...ro->m...io", ab_new["A"], ab_new["B"])
                - jnp.einsum("m...ir,...ro->m...io", a_old, ab_old["B"]))
    sq = [jnp.square(delta(new["lora"].weights[t], old["lora"].weights[t])).reshape(
        keep.shape[0], -1).sum(1) for t in new["lora"].weights]
    return jnp.sqrt(sum(sq))


def no_sparsity(new: Any, old: Any, ranks: Array) -> Array:
    """``[M]`` ones: sample counts alone weight the devices."""
    return jnp.ones(ranks.shape, jnp.float32)


# HetLoRA's per-device aggregation weight s_m (times the sample count), by config name.
SPARSITY = {"update": update_norms, "adapter": adapter_norms, "none": no_sparsity}


def _zero_dropped(new: Any, finite: Array) -> Any:
    return jax.tree.map(lambda x: jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0), new)


@dataclasses.dataclass(frozen=True)
class FedAvg:
    """Sample-weighted mean of every leaf (McMahan et al., 2017)."""

    def __call__(self, new, old, weights, ranks):
        agg, finite = weighted_mean(new, weights, fallback=old)
        return agg, finite, jnp.where(finite, weights, 0.0)


@dataclasses.dataclass(frozen=True)
class RankPadded:
    """HetLoRA (Cho et al., 2024): zero-padded mean of heterogeneous-rank adapters, each device
    weighted by ``samples x sparsity`` (:data:`SPARSITY`); ``padding`` ``"zeros"`` (the paper: the
    padded zeros enter the mean) or ``"holders"`` (each component averaged over its holders); rank
    components no device holds keep their previous value (:func:`~hfl_jax.fed.aggregate.rank_padded_mean`)."""
    sparsity: str = "adapter"
    padding: str = "zeros"

    def __call__(self, new, old, weights, ranks):
        agg, finite, used = FedAvg()(new, old, weights, ranks)
        clean = _zero_dropped(new, finite)
        s = used * SPARSITY[self.sparsity](clean, old, ranks)   # x 1 for "none" is exact
        return dict(agg, lora=rank_padded_mean(clean["lora"], ranks, s, prev=old["lora"],
                                                 padding=self.padding)), finite, used


@dataclasses.dataclass(frozen=True)
class SVDProductMean:
    """FlexLoRA (Bai et al., 2024): the sample-weighted mean of the full products ``A_m B_m``,
    refactored by a truncated SVD to the global rank (:func:`~hfl_jax.fed.aggregate.svd_product_mean`);
    a device of rank ``r_m`` then takes the first ``r_m`` components, i.e. the rank-``r_m``
    truncated SVD of the mean."""

    def __call__(self, new, old, weights, ranks):
        agg, finite, used = FedAvg()(new, old, weights, ranks)
        lora = svd_product_mean(_zero_dropped(new, finite)["lora"], used, prev=old["lora"])
        return dict(agg, lora=lora), finite, used


# Group aggregators by name (algorithm files compose them; config options select their settings).
GROUP_AGGREGATORS = {"fedavg": FedAvg, "rank_padded": RankPadded, "svd_product_mean": SVDProductMean}
