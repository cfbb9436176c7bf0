"""What devices upload for grouping instead of label histograms: mean frozen-model embeddings.

Each device runs the frozen base model (no LoRA) over its examples and uploads one vector, the
mean over its examples of the mean over each example's tokens (masked by ``attention_mask``) of
the last layer's hidden states: an ``H``-dimensional summary of its data, no labels
(docs/algorithm.md, "Grouping without label histograms"). Grouping then runs the greedy K-means
on these vectors with the cosine distance (:func:`hfl_jax.algos.grouping.group_by_embedding`).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from hfl_jax.fed.xla import jit

_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@functools.lru_cache(maxsize=8)
def _pooled(model):
    """Jitted ``(params, ids, mask, token types) -> [B, H]``: each example's masked token mean of
    the last layer's hidden states (float32; an all-masked row gives 0)."""
    def pool(params, ids, mask, tt):
        h = model.bottom_hidden(params, ids, mask, tt, stop_layer=model.num_layers).astype(jnp.float32)
        m = mask.astype(jnp.float32)[..., None]
        return (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
    return jit(pool)


def example_embeddings(model, params, tokens: dict, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Pooled last-layer embeddings ``[len(rows), H]`` float64 of the token arrays' ``rows``
    (``tokens``: ``input_ids``, ``attention_mask`` and optionally ``token_type_ids``, ``[N, T]``),
    computed in jitted batches of ``batch_size`` (the last one padded with its first row)."""
    rows = np.asarray(rows, np.int64)
    ids = np.asarray(tokens["input_ids"])
    flat = {k: np.asarray(tokens[k]) if k in tokens else np.zeros_like(ids) for k in _TOKEN_KEYS}
    fn = _pooled(model)
    out = []
    for i in range(0, len(rows), batch_size):
        idx = rows[i:i + batch_size]
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        e = fn(params, *(jnp.asarray(flat[k][pad]) for k in _TOKEN_KEYS))
        out.append(np.asarray(e, np.float64)[:len(idx)])
    return np.concatenate(out) if out else np.zeros((0, 0))


def mean_embeddings(model, params, tokens: dict, parts, batch_size: int = 64) -> np.ndarray:
    """Each device's upload ``[N, H]`` float64: the mean of its examples' pooled embeddings
    (:func:`example_embeddings`; zeros for a device without examples).

    Args:
      model: an encoder or decoder model with ``bottom_hidden`` and ``num_layers``.
      params: the frozen base parameters (no LoRA is applied).
      tokens: the training token arrays ``[N_examples, T]``.
      parts: per-device index arrays into those rows.
      batch_size: examples per jitted call.
    """
    used = np.unique(np.concatenate([np.asarray(p, np.int64) for p in parts] + [np.zeros(0, np.int64)]))
    hidden = int(model.cfg.hidden_size)
    emb = example_embeddings(model, params, tokens, used, batch_size) if used.size else np.zeros((0, hidden))
    where = {int(r): j for j, r in enumerate(used)}
    out = np.zeros((len(parts), hidden))
    for d, p in enumerate(parts):
        if len(p):
            out[d] = emb[[where[int(r)] for r in p]].mean(axis=0)
    return out
