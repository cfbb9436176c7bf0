"""Rotary position embeddings (RoPE) of the Llama family, as transformers computes them.

A RoPE variant is a frozen, hashable description ``rope = (("rope_theta", 1e4), ("rope_type",
"default"), ...)`` (sorted items; :func:`rope_spec` builds it from a ``config.json``). The types and
their inverse frequencies follow ``transformers.modeling_rope_utils`` (read there, not guessed):

* ``default``: ``inv_freq[i] = 1 / theta^(2i / d)``, ``d = head_dim``;
* ``linear``: the default divided by ``factor``;
* ``dynamic`` (NTK): ``theta`` rescaled to ``theta * (factor * n / P - (factor - 1))^(d / (d - 2))``
  with ``n = max(max(position_ids) + 1, P)`` and ``P = max_position_embeddings`` (so equal to the
  default up to ``P`` tokens); transformers recomputes it each forward call from that call's
  largest position, and so does :func:`cos_sin` (stateless, from the positions it is given);
* ``llama3``: Llama 3.1's band-wise scaling (``factor``, ``low_freq_factor``, ``high_freq_factor``,
  ``original_max_position_embeddings``).

The attention scaling of these four types is 1. ``cos``/``sin`` are ``cat(freqs, freqs)`` and the
rotation is ``x * cos + rotate_half(x) * sin`` (the half-split layout of HF Llama checkpoints,
not the interleaved one), all in float32.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.models.config import ConfigError

Array = jax.Array
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# The parameters each type reads (besides rope_theta and rope_type); the rest of the dict is ignored,
# so the transformers-4 and -5 layouts of one checkpoint give the same (equal, hashable) description.
_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
         "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_spec(hf: Mapping[str, Any], layer_types: tuple[str, ...] = ()) -> tuple:
    """The RoPE description of a ``config.json`` dict, in either layout.

    transformers-4 (as hub checkpoints store it): ``rope_theta`` plus an optional ``rope_scaling``
    dict with ``type`` or ``rope_type``. transformers-5: a ``rope_parameters`` dict holding
    ``rope_theta`` and ``rope_type``. As in transformers, ``rope_scaling`` wins over ``rope_parameters``
    and a missing theta is 10000. Raises :class:`ConfigError` naming ``config.json`` and the key for an
    unsupported type or a partial rotary factor.
    """
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rp = dict(hf.get(key) or {})
    nested = [k for k in rp if k in layer_types]
    if nested:   # per-layer-type parameters (transformers-5); supported when they agree
        first = rp[nested[0]]
        if any(rp[k] != first for k in nested):
            raise ConfigError(f"config.json: per-layer-type '{key}' {rp} differ; hfl_jax applies one RoPE "
                              f"to every layer")
        rp = dict(first)
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise ConfigError(f"config.json: unsupported rope type {rtype!r} (key '{key}'); hfl_jax supports "
                          f"{', '.join(ROPE_TYPES)}")
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise ConfigError(f"config.json: partial_rotary_factor={partial} (key '{key}') is not supported")
    items = {"rope_type": rtype, "rope_theta": float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    for k in _KEYS[rtype]:
        if k == "original_max_position_embeddings":
            items[k] = int(rp.get(k, hf.get("max_position_embeddings", 2048)))
        elif k not in rp:
            raise ConfigError(f"config.json: rope type {rtype!r} needs '{k}' (key '{key}')")
        else:
            items[k] = float(rp[k])
    return tuple(sorted(items.items()))


def default_rope(theta: float = 10000.0) -> tuple:
    """The description of plain RoPE with base ``theta``."""
    return (("rope_theta", float(theta)), ("rope_type", "default"))


def _base_inv_freq(theta, dim: int) -> np.ndarray:
    # transformers: 1 / (theta ** (arange(0, dim, 2).float() / dim)), in float32
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)


def static_inv_freq(rope: tuple, head_dim: int) -> np.ndarray:
    """``[head_dim / 2]`` float32 inverse frequencies of the position-independent types (all but
    ``dynamic``, whose frequencies depend on the sequence: :func:`cos_sin`)."""
    p = dict(rope)
    inv = _base_inv_freq(p["rope_theta"], head_dim)
    if p["rope_type"] == "linear":
        inv = inv / np.float32(p["factor"])
    elif p["rope_type"] == "llama3":
        factor, low, high = (np.float32(p[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = np.float32(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def cos_sin(rope: tuple, head_dim: int, max_position_embeddings: int, positions: Array) -> tuple[Array, Array]:
    """``cos, sin``: ``[B, T, head_dim]`` float32 for int ``positions`` ``[B, T]``."""
    p = dict(rope)
    if p["rope_type"] == "dynamic":
        # transformers' dynamic NTK update, in float32 like its tensor path (module doc)
        factor, P = jnp.float32(p["factor"]), jnp.float32(max_position_embeddings)
        n = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, P)
        base = jnp.float32(p["rope_theta"]) * ((factor * n / P) - (factor - 1)) ** (head_dim / (head_dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    else:
        inv = jnp.asarray(static_inv_freq(rope, head_dim))
    freqs = positions[..., None].astype(jnp.float32) * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x`` ``[B, T, heads, head_dim]`` by ``cos, sin`` ``[B, T, head_dim]``; float32 result."""
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
