"""Greedy decoding with a preallocated KV cache for :class:`~hfl_jax.models.decoder.DecoderModel`.

Prompts are left-padded (:func:`left_pad`), so every row's last prompt token sits at slot ``T - 1``
and the new tokens at slots ``T, T + 1, ...`` of a cache ``[L, B, T + max_new_tokens, kvh, hd]``.
One prefill call fills slots ``[0, T)``; a ``lax.while_loop`` then decodes one token per step (and
stops early once every row has emitted EOS). Positions are ``cumsum(attention_mask) - 1`` (HF
``generate``'s for left padding), padding slots are masked as keys, and sliding-window layers see
only the last ``sliding_window`` slots, so the tokens equal the argmax of repeated full forward
passes and transformers' ``generate(do_sample=False)``. After its EOS a row emits ``pad_token_id``.
With ``dynamic`` RoPE each step uses that step's frequencies (as transformers does with a cache),
which is not what one full forward over the whole sequence computes.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.models.decoder import DecoderModel
from hfl_jax.models.lora import LoRA

Array = jax.Array


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ``(input_ids, attention_mask)``, int32 ``[B, T]``, padded on the left
    (``T = length`` or the longest sequence)."""
    T = max(len(s) for s in sequences) if length is None else int(length)
    ids = np.full((len(sequences), T), pad_token_id, np.int32)
    mask = np.zeros((len(sequences), T), np.int32)
    for i, s in enumerate(sequences):
        if len(s) > T:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than length={T}")
        if len(s):
            ids[i, T - len(s):] = s
            mask[i, T - len(s):] = 1
    return ids, mask


def greedy_generate(model: DecoderModel, params, lora: LoRA | None, input_ids: Array, attention_mask: Array, *,
                    max_new_tokens: int, eos_token_id: int | Sequence[int] | None, pad_token_id: int) -> Array:
    """Greedy continuation ``[B, max_new_tokens]`` int32 of left-padded prompts ``[B, T]``.

    ``lora``: adapters applied at every step (or ``None``). ``eos_token_id``: one id or several
    (``None``: never stop); a row stops after emitting one and pads the rest with ``pad_token_id``.
    Compiled once per (model, shapes, max_new_tokens, pad_token_id, number of EOS ids).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = [-1] if eos_token_id is None else np.atleast_1d(eos_token_id)   # -1: no token id
    return _greedy(model, params, lora, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                   jnp.asarray(eos, jnp.int32), int(max_new_tokens), int(pad_token_id))


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _greedy(model, params, lora, input_ids, attention_mask, eos, max_new, pad):
    B, T = input_ids.shape
    key_mask = jnp.concatenate([attention_mask, jnp.ones((B, max_new), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    n_prompt = attention_mask.sum(axis=1)   # next position of each row
    is_eos = lambda t: jnp.any(t[:, None] == eos[None, :], axis=1)

    logits, cache = model.cached_logits(params, lora, input_ids, positions, model.init_cache(B, T + max_new),
                                        key_mask, 0)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.full((B, max_new), pad, jnp.int32).at[:, 0].set(tok)
    done = is_eos(tok)

    def cond(carry):
        step, _, done, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, tok, done, cache, out = carry
        pos = (n_prompt + step - 1)[:, None]
        logits, cache = model.cached_logits(params, lora, tok[:, None], pos, cache, key_mask, T + step - 1)
        new = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
        return step + 1, new, done | is_eos(new), cache, out
    return jax.lax.while_loop(cond, body, (jnp.int32(1), tok, done, cache, out))[4]
