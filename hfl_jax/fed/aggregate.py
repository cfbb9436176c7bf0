"""Aggregation as jitted pure functions over pytrees (formulas in docs/aggregation.md).

* :func:`weighted_mean` -- intra-group FedAvg over the device axis, weighted by
  sample counts, dropping devices whose update is not finite.
* :func:`layerwise_aggregate` -- HierFedLoRA's global step over groups that
  trained different depths (any layer policy): each layer is averaged over the groups that trained it.
* :func:`pad_rank` / :func:`truncate_rank` / :func:`rank_padded_mean` -- the
  zero-padding aggregation of adapters of different ranks (HetLoRA).
* :func:`svd_product_mean` -- the mean of full products ``A B``, refactored by a
  truncated SVD (FlexLoRA).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hfl_jax.models.lora import LoRA, layer_mask

Array = jax.Array


def all_finite(tree: Any) -> Array:
    """``[M]`` bool: True where every leaf of device ``m``'s slice is finite."""
    # reduce over the trailing axes directly: a reshape first makes XLA:CPU emit a slow reduce-window
    flags = [jnp.isfinite(x).all(axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(tree)]
    if not flags:
        raise ValueError("all_finite: the tree has no arrays")
    return jnp.stack(flags).all(axis=0)


def weighted_mean(tree: Any, weights: Array, fallback: Any | None = None) -> tuple[Any, Array]:
    """Weighted mean over the leading (device) axis: ``sum_m w_m x_m / sum_m w_m``.

    Devices whose slice contains NaN/Inf get weight 0 (their values are zeroed
    before the sum, so they cannot poison it). If the total weight is 0 the
    result is ``fallback`` (or zeros when no fallback is given).

    Args:
      tree: leaves ``[M, ...]``.
      weights: ``[M]`` non-negative (e.g. sample counts times participation).
      fallback: tree without the device axis.

    Returns:
      ``(mean_tree, finite [M] bool)``.
    """
    finite = all_finite(tree)
    w = jnp.where(finite, weights, 0.0).astype(jnp.float32)
    total = w.sum()

    def mean(x, fb=None):
        xs = jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
        avg = jnp.tensordot(w, xs, axes=1) / jnp.maximum(total, 1e-30)
        if fb is None:
            return avg
        return jnp.where(total > 0, avg, fb)

    if fallback is None:
        return jax.tree.map(mean, tree), finite
    return jax.tree.map(mean, tree, fallback), finite


def trained_layers(num_layers: int, depths: Array, policy: str = "top") -> Array:
    """``[K, L]`` bool: group ``k`` trained layer ``l`` at ``depths[k]`` under ``policy``
    (:func:`~hfl_jax.models.lora.layer_mask`; ``top``: iff ``l >= L - depths[k]``)."""
    return layer_mask(num_layers, jnp.asarray(depths)[:, None], policy)


def layerwise_aggregate(group_lora: LoRA, group_heads: Any, depths: Array, weights: Array,
                        prev_lora: LoRA, prev_head: Any = None, policy: str = "top") -> tuple[LoRA, Any]:
    """HierFedLoRA's global, layer-wise aggregation.

    For each layer ``l``: ``W_l = sum_k w_k 1[k trained l] W_{k,l} / sum_k w_k 1[k trained l]``
    (:func:`trained_layers`: ``top``, the paper's, is ``l`` in the top ``d_k``);
    a layer no group trained keeps ``prev_lora``'s value. The head is the
    ``w``-weighted mean over all groups (every group trains it).

    Args:
      group_lora: LoRA with leaves ``[K, L, ...]`` (one per group).
      group_heads: head tree with leaves ``[K, ...]``, or ``None`` (no trainable head: returned as ``None``).
      depths: ``[K]`` int, each group's fine-tuning depth this round.
      weights: ``[K]`` sample counts of the groups (0 for a group that skipped the round).
      prev_lora: the previous global LoRA (leaves ``[L, ...]``).
      prev_head: the previous global head, kept if every group's weight is 0.
      policy: which layers a depth trains (``algorithm.layer_policy``; static).
    """
    num_layers = jax.tree.leaves(prev_lora)[0].shape[0]
    mask = trained_layers(num_layers, depths, policy) & (jnp.asarray(weights) > 0)[:, None]   # [K, L]
    w = mask * jnp.asarray(weights, jnp.float32)[:, None]                             # [K, L]
    total = w.sum(0)                                                                   # [L]

    def per_layer(x, prev):
        avg = jnp.einsum("kl,kl...->l...", w, x) / jnp.maximum(total, 1e-30).reshape((-1,) + (1,) * (x.ndim - 2))
        keep = (total > 0).reshape((-1,) + (1,) * (x.ndim - 2))
        return jnp.where(keep, avg, prev)

    lora = jax.tree.map(per_layer, group_lora, prev_lora)
    if group_heads is None:   # a model without a trainable head (decoder LLMs: LoRA only)
        return lora, None
    head, _ = weighted_mean(group_heads, jnp.asarray(weights, jnp.float32), fallback=prev_head)
    return lora, head


# --- heterogeneous ranks (HetLoRA) -----------------------------------------------------------------

def truncate_rank(lora: LoRA, rank: int) -> LoRA:
    """Keeps the first ``rank`` components: ``A[..., :r]``, ``B[..., :r, :]`` (HetLoRA's download)."""
    return LoRA({t: {"A": ab["A"][..., :rank], "B": ab["B"][..., :rank, :]} for t, ab in lora.weights.items()},
                lora.scale)


def pad_rank(lora: LoRA, rank: int) -> LoRA:
    """Zero-pads the rank dimension up to ``rank``."""
    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, rank - x.shape[axis])
        return jnp.pad(x, widths)
    return LoRA({t: {"A": pad(ab["A"], -1), "B": pad(ab["B"], -2)} for t, ab in lora.weights.items()},
                lora.scale)


def rank_mask(ranks: Array, max_rank: int) -> Array:
    """``[M, r_max]`` bool: device ``m`` holds rank components ``< ranks[m]``."""
    return jnp.arange(max_rank)[None, :] < jnp.asarray(ranks)[:, None]


def rank_padded_mean(lora: LoRA, ranks: Array, weights: Array, prev: LoRA | None = None, *,
                     padding: str = "zeros") -> LoRA:
    """Zero-padding aggregation of adapters with different ranks (HetLoRA).

    ``lora`` leaves are ``[M, L, in, r_max]`` (A) and ``[M, L, r_max, out]`` (B),
    each device zero-padded beyond its own rank. ``padding`` says what the padded zeros count for:

    * ``"zeros"`` (HetLoRA, Cho et al. 2024, Fig. 2): every device's zero-padded adapter enters one
      weighted mean, ``X_j = sum_m w_m 1[j < r_m] X_{m,j} / sum_m w_m``, so a component held by few
      devices is diluted by the others' zeros;
    * ``"holders"``: component ``j`` is the weighted mean over the devices that hold it,
      ``sum_m w_m 1[j < r_m] X_{m,j} / sum_m w_m 1[j < r_m]`` (HeteroFL-style, no dilution).

    A component no (weighted) device holds keeps ``prev``'s value (0 without ``prev``).
    HetLoRA's sparsity weights are passed in ``weights`` (see :mod:`hfl_jax.algos.hetlora`).
    """
    if padding not in ("zeros", "holders"):
        raise ValueError(f"padding must be 'zeros' or 'holders', got {padding!r}")
    r_max = lora.rank
    w = jnp.asarray(weights, jnp.float32)
    wm = rank_mask(ranks, r_max) * w[:, None]                                    # [M, r]
    held = wm.sum(0) > 0                                                         # [r]
    norm = wm.sum(0) if padding == "holders" else jnp.broadcast_to(w.sum(), held.shape)
    total = jnp.maximum(norm, 1e-30)                                             # [r]
    out = {}
    for t, ab in lora.weights.items():
        A = jnp.einsum("mr,m...r->...r", wm, ab["A"]) / total
        B = jnp.einsum("mr,m...ro->...ro", wm, ab["B"]) / total[:, None]
        if prev is not None:
            A = jnp.where(held, A, prev.weights[t]["A"])
            B = jnp.where(held[:, None], B, prev.weights[t]["B"])
        out[t] = {"A": A, "B": B}
    return LoRA(out, lora.scale)


def svd_product_mean(lora: LoRA, weights: Array, prev: LoRA | None = None) -> LoRA:
    """FlexLoRA's server step: the weighted mean of the full products, refactored at the global rank.

    ``lora`` leaves are ``[M, L, in, r]`` (A) and ``[M, L, r, out]`` (B), devices of lower rank
    zero beyond it. Per layer ``P = sum_m w_m A_m B_m / sum_m w_m`` (``[in, out]``), then the
    truncated SVD ``P ~ U_r S_r V_r^T`` gives ``A = U_r S_r^{1/2}``, ``B = S_r^{1/2} V_r^T`` with
    components in decreasing singular value, so the first ``k`` components are the best rank-``k``
    approximation of ``P`` (Eckart-Young). With zero total weight the result is ``prev``.
    """
    r = lora.rank
    w = jnp.asarray(weights, jnp.float32)
    total = w.sum()
    out = {}
    for t, ab in lora.weights.items():
        prod = jnp.einsum("m,m...ir,m...ro->...io", w, ab["A"], ab["B"]) / jnp.maximum(total, 1e-30)
        u, s, vt = jnp.linalg.svd(prod, full_matrices=False)
        root = jnp.sqrt(s[..., :r])
        A = u[..., :, :r] * root[..., None, :]
        B = root[..., :, None] * vt[..., :r, :]
        if prev is not None:
            A = jnp.where(total > 0, A, prev.weights[t]["A"])
            B = jnp.where(total > 0, B, prev.weights[t]["B"])
        out[t] = {"A": A, "B": B}
    return LoRA(out, lora.scale)
