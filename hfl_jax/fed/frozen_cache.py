"""Caching the output of layers that no arm can ever tune (``train.cache_frozen_layers``).

When every arm's fine-tuning depth is at most ``D < L``, the bottom ``L - D`` layers are
never trained by any group: their adapters stay at their init (``B = 0``, so the LoRA term
is exactly zero) and their output is a fixed function of each example. It is computed
once at setup (:func:`attach_hidden`), stored next to the tokens
(``DeviceData.hidden`` / ``EvalBatches.hidden``, float32 ``[..., T, H]``), and training,
probing and evaluation start from it at layer ``L - D``.

Exact only while those layers' adapters stay untouched (``B == 0``): guaranteed by the
depth mask and the layer-wise aggregation (layers no group trains keep their value), and
checked on the adapters at setup and resume by :func:`check_untouched`.
Memory: ``4 * T * H`` bytes per stored example (e.g. T=64, H=384: 96 KiB; 10k examples ~ 1 GiB),
on top of the 12 * T bytes of tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.fed.xla import jit
from hfl_jax.models.encoder import EncoderModel
from hfl_jax.models.lora import LoRA, lowest_trained_layer


def cached_layers(arm_depths, num_layers: int, policy: str = "top") -> int:
    """How many bottom layers no arm can tune: those below every arm's lowest trained layer under the
    layer ``policy`` (:func:`hfl_jax.models.lora.lowest_trained_layer`; ``top``: ``L - max(depths)``,
    ``bottom``: none)."""
    return min(lowest_trained_layer(num_layers, int(d), policy) for d in arm_depths)


@functools.lru_cache(maxsize=8)
def _bottom(model: EncoderModel, stop_layer: int):
    return jit(lambda base, ids, mask, tt: model.bottom_hidden(base, ids, mask, tt, stop_layer=stop_layer))


def bottom_hidden(model: EncoderModel, base: dict, tokens: dict, rows: np.ndarray, stop_layer: int,
                  batch_size: int = 128) -> np.ndarray:
    """Hidden states after the bottom ``stop_layer`` layers for token arrays ``[..., T]``.

    ``rows`` (bool, the arrays' leading shape) selects the rows to compute; the others are
    zeros. Runs in jitted batches of ``batch_size`` (the last one padded). Returns float32
    ``[..., T, H]`` on the host.
    """
    ids = np.asarray(tokens["input_ids"])
    lead, t = ids.shape[:-1], ids.shape[-1]
    flat = {k: np.asarray(tokens[k]).reshape(-1, t) for k in ("input_ids", "attention_mask", "token_type_ids")}
    sel = np.flatnonzero(np.asarray(rows).reshape(-1))
    out = np.zeros((flat["input_ids"].shape[0], t, model.cfg.hidden_size), np.float32)
    fn = _bottom(model, int(stop_layer))
    for i in range(0, len(sel), batch_size):
        idx = sel[i:i + batch_size]
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        h = fn(base, *(jnp.asarray(flat[k][pad]) for k in ("input_ids", "attention_mask", "token_type_ids")))
        out[idx] = np.asarray(h)[:len(idx)]
    return out.reshape(*lead, t, model.cfg.hidden_size)


def attach_hidden(data, model: EncoderModel, base: dict, stop_layer: int, batch_size: int = 128):
    """``data`` (host :class:`~hfl_jax.data.DeviceData` or :class:`~hfl_jax.data.EvalBatches`)
    with ``hidden`` = the bottom ``stop_layer`` layers' output for its valid rows."""
    tokens = {k: getattr(data, k) for k in ("input_ids", "attention_mask", "token_type_ids")}
    hidden = bottom_hidden(model, base, tokens, np.asarray(data.valid), stop_layer, batch_size)
    return data.replace(hidden=hidden, hidden_layer=int(stop_layer))


def check_untouched(lora: LoRA, num_layers: int) -> None:
    """Raises unless every adapter's ``B`` is exactly zero in the bottom ``num_layers`` layers."""
    for t, ab in lora.weights.items():
        if np.any(np.asarray(ab["B"])[:num_layers] != 0):
            raise ValueError(f"train.cache_frozen_layers: the LoRA B of {t!r} is non-zero in the bottom "
                             f"{num_layers} layers, so their cached outputs would be wrong")
