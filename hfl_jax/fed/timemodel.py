"""Analytic cost model of one federated round on simulated devices (host-side, numpy).

HierFedLoRA (arXiv 2503.21213) gives each device a fine-tuning depth ``d``:
the device runs the full forward pass of an ``L``-layer model but back-
propagates only through the top ``d`` layers and trains (and exchanges) only
their LoRA adapters plus the classification head (if the family has one).
Another layer policy (``algorithm.layer_policy``: ``bottom``, ``spread``;
:func:`hfl_jax.models.lora.layer_mask`) trains another set of ``d`` layers: the
backward pass then runs from the top down to the lowest of them (its ``span``,
:func:`backward_span`), through the untrained layers in between without their LoRA
weight gradients, and the device still exchanges ``d`` layers' adapters. This
module turns such a workload into FLOPs, bytes and seconds so that simulated
heterogeneous devices (`profiles.DeviceProfile`) have realistic, depth-dependent
round times.

FLOPs count matrix multiplications only, as XLA's cost analysis counts them:
``2 * m * k * n`` for an ``[m, k] @ [k, n]`` product. The backward pass counts
exactly the products JAX emits when the bottom ``L - d`` layers run under
``lax.stop_gradient`` and the base weights are not differentiated. Elementwise
work and embedding gathers are not counted. See docs/time_model.md for every
formula and assumption.

Each model family owns its formulas; this module validates the arguments, asks
the family (:func:`family_cost`: a model config's ``cost_model``) and adds the
family-independent parts (LoRA parameter counts and bytes, memory totals,
seconds):

* encoders (BERT, RoBERTa, DeBERTa v1/v2/v3): :mod:`hfl_jax.models.encoder_cost`
  (its per-piece helpers, ``projection_flops`` ... ``relative_span``, are
  re-exported here);
* decoder LLMs (Llama, Qwen2, Mistral): :mod:`hfl_jax.models.decoder_cost`.

A family's cost module supplies ``forward_flops(cfg, B, T, r, targets)``,
``backward_flops(cfg, B, T, d, r, targets, span=None)``, ``layer_forward_flops``,
``layer_backward_flops(..., input_live, trained)``, ``base_param_count(cfg)``,
``layer_activation_floats(cfg, B, T, r, targets)`` and ``logits_floats(cfg, B, T)``;
a family with a trained classification head also ``head_param_count(cfg,
num_labels)`` and a ``num_labels`` keyword on the two FLOP counts (a family
without one trains and exchanges LoRA only).

``cfg`` is a model config (``hfl_jax.models.config.EncoderConfig``,
``hfl_jax.models.decoder.DecoderConfig``) or a stand-in for an encoder config
with only ``model_type``, ``hidden_size``, ``num_layers``, ``num_heads``,
``intermediate_size`` and ``num_labels`` (the encoder formulas read optional
fields with ``getattr``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hfl_jax.fed.profiles import DeviceProfile, profiles_to_arrays
from hfl_jax.models import encoder_cost
from hfl_jax.models.config import SUPPORTED_MODEL_TYPES as MODEL_TYPES
from hfl_jax.models.lora import lowest_trained_layer
# Re-exported: the encoders' constants and per-piece formulas (their home is encoder_cost).
from hfl_jax.models.encoder_cost import (ACT_HIDDEN, ACT_INTERMEDIATE, ACT_SCORES,  # noqa: F401
                                         DEFAULT_TARGETS, TARGET_NAMES, _projection_backward,
                                         attention_flops, head_backward_flops, head_forward_flops,
                                         lora_forward_flops, matmul_flops, projection_flops,
                                         relative_position_flops, relative_span)


# ----------------------------------------------------------------------------
# The family, and argument checks
# ----------------------------------------------------------------------------


def family_cost(cfg):
    """The cost module of ``cfg``'s family: ``cfg.cost_model`` (an ``EncoderConfig``'s
    :mod:`hfl_jax.models.encoder_cost`, a ``DecoderConfig``'s :mod:`hfl_jax.models.decoder_cost`).
    A stand-in config without one is counted as an encoder when its ``model_type`` is one
    (:data:`MODEL_TYPES`, the encoder config's). Raises ValueError naming the ``model_type`` otherwise."""
    cost = getattr(cfg, "cost_model", None)
    if cost is not None:
        return cost
    model_type = getattr(cfg, "model_type", None)
    if model_type in MODEL_TYPES:
        return encoder_cost
    raise ValueError(f"unknown model_type {model_type!r}: its config has no cost_model, and a stand-in "
                     f"config is counted only for the encoder model types {MODEL_TYPES}")


def _has_head(cost) -> bool:
    # a family with a trained classification head counts it (num_labels); decoders train LoRA only
    return hasattr(cost, "head_param_count")


def _labels(cost, num_labels: int | None) -> dict:
    return {"num_labels": num_labels} if _has_head(cost) else {}


def _check_targets(targets: Sequence[str], cfg) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    names = tuple(getattr(cfg, "lora_targets", None) or family_cost(cfg).TARGET_NAMES)
    unknown = [t for t in targets if t not in names]
    if unknown or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets must be distinct names from {names}, got {targets}")
    return targets


def _check_depth(cfg, depth) -> int:
    if int(depth) != depth or not 0 <= depth <= cfg.num_layers:
        raise ValueError(f"depth must be an integer in [0, {cfg.num_layers}], got {depth!r}")
    return int(depth)


def backward_span(cfg, depth: int, policy: str = "top") -> int:
    """Layers the backward pass runs through at ``depth`` under the layer ``policy``: from the top
    down to the lowest trained layer (:func:`hfl_jax.models.lora.lowest_trained_layer`); ``d`` for
    ``top``, ``L`` for ``bottom`` at any ``d > 0``, 0 at depth 0."""
    return cfg.num_layers - lowest_trained_layer(cfg.num_layers, _check_depth(cfg, depth), policy)


def _check_positive(**kw) -> None:
    for name, v in kw.items():
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def target_dims(cfg, target: str) -> tuple[int, int]:
    """(in, out) features of a LoRA target, as the config says (``cfg.lora_target_dims``) or
    else its family's cost module (encoders: H->H for query/key/value/attention_output,
    H->I for intermediate, I->H for output)."""
    _check_targets((target,), cfg)
    if hasattr(cfg, "lora_target_dims"):
        return tuple(cfg.lora_target_dims(target))
    return family_cost(cfg).target_dims(cfg, target)


# ----------------------------------------------------------------------------
# FLOPs (the family's formulas)
# ----------------------------------------------------------------------------


def layer_forward_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str]) -> float:
    """Forward FLOPs of one layer with LoRA on `targets` (the family's formula)."""
    return family_cost(cfg).layer_forward_flops(cfg, batch_size, seq_len, rank, targets)


def layer_backward_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str],
                         input_live: bool = True, trained: bool = True) -> float:
    """Backward FLOPs of one layer in the backward pass (the family's formula); `input_live` is False
    for the lowest trained layer (its input comes from stop_gradient); `trained` False for an
    untrained layer above it (activation gradients only)."""
    return family_cost(cfg).layer_backward_flops(cfg, batch_size, seq_len, rank, targets, input_live, trained)


def forward_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str] = DEFAULT_TARGETS,
                  num_labels: int | None = None) -> float:
    """Forward (evaluation) FLOPs of one batch [B, T]: L layers plus the head."""
    cost = family_cost(cfg)
    _check_positive(batch_size=batch_size, seq_len=seq_len, rank=rank)
    return cost.forward_flops(cfg, batch_size, seq_len, rank, _check_targets(targets, cfg),
                              **_labels(cost, num_labels))


def backward_flops(cfg, batch_size: int, seq_len: int, depth: int, rank: int,
                   targets: Sequence[str] = DEFAULT_TARGETS, num_labels: int | None = None,
                   policy: str = "top") -> float:
    """Backward FLOPs at fine-tuning depth d: the layers from the top down to the lowest one the
    layer ``policy`` trains (``top``: the top d; the lowest with a dead input; untrained ones in
    between without LoRA weight gradients) and the head."""
    cost = family_cost(cfg)
    depth = _check_depth(cfg, depth)
    targets = _check_targets(targets, cfg)
    _check_positive(batch_size=batch_size, seq_len=seq_len, rank=rank)
    span = {} if policy == "top" else {"span": backward_span(cfg, depth, policy)}
    return cost.backward_flops(cfg, batch_size, seq_len, depth, rank, targets, **_labels(cost, num_labels), **span)


def step_flops(cfg, batch_size: int, seq_len: int, depth: int, rank: int,
               targets: Sequence[str] = DEFAULT_TARGETS, num_labels: int | None = None,
               policy: str = "top") -> float:
    """Training FLOPs of one local step on a [B, T] batch at fine-tuning depth d.

    Forward through all L layers and the head, backward through the head and
    the top d layers only (HierFedLoRA's depth; another layer ``policy``: down to
    its lowest trained layer, :func:`backward_flops`). `num_labels` defaults to
    ``cfg.num_labels`` (2 if absent). Raises ValueError for depth outside [0, L].
    """
    return (forward_flops(cfg, batch_size, seq_len, rank, targets, num_labels)
            + backward_flops(cfg, batch_size, seq_len, depth, rank, targets, num_labels, policy))


# ----------------------------------------------------------------------------
# Parameters and exchanged bytes
# ----------------------------------------------------------------------------


FACTORS = ("AB", "A", "B")   # which LoRA factors a message carries (FFA-LoRA sends B only, FedSA-LoRA A only)


def lora_layer_param_count(cfg, rank: int, targets: Sequence[str] = DEFAULT_TARGETS, factors: str = "AB") -> int:
    """LoRA parameters of one layer: sum over targets of r*(in + out) (A: [in, r], B: [r, out]);
    ``factors="A"`` counts only r*in, ``"B"`` only r*out."""
    if factors not in FACTORS:
        raise ValueError(f"factors must be one of {FACTORS}, got {factors!r}")
    return sum(rank * (fan_in * ("A" in factors) + fan_out * ("B" in factors))
               for fan_in, fan_out in (target_dims(cfg, t) for t in _check_targets(targets, cfg)))


def lora_param_count(cfg, depth: int, rank: int, targets: Sequence[str] = DEFAULT_TARGETS) -> int:
    """LoRA parameters of `depth` layers (the ones a device trains, under any layer policy)."""
    return _check_depth(cfg, depth) * lora_layer_param_count(cfg, rank, targets)


def _layer_count(cfg, layers) -> np.ndarray:
    """Layer counts from a count (scalar or array) or a bool mask [..., L]."""
    layers = np.asarray(layers)
    if layers.dtype == bool:
        if layers.ndim == 0 or layers.shape[-1] != cfg.num_layers:
            raise ValueError(f"a layer mask must have shape [..., {cfg.num_layers}], got {layers.shape}")
        return layers.sum(axis=-1)
    if not np.issubdtype(layers.dtype, np.integer) and not np.all(np.mod(layers, 1) == 0):
        raise ValueError(f"layer counts must be integers, got {layers}")
    if np.any(layers < 0) or np.any(layers > cfg.num_layers):
        raise ValueError(f"layer counts must be in [0, {cfg.num_layers}], got {layers}")
    return layers.astype(np.int64)


def lora_bytes(cfg, layers, rank: int, targets: Sequence[str] = DEFAULT_TARGETS,
               bytes_per_param: int = 4, factors: str = "AB"):
    """Bytes of the LoRA adapters of `layers` layers (only the given ``factors``).

    Args:
      layers: a count (int or int array [N]) or a bool layer mask ([L] or [N, L]).
    Returns:
      float, or float64 array [N] for array inputs.
    """
    out = _layer_count(cfg, layers) * float(lora_layer_param_count(cfg, rank, targets, factors) * bytes_per_param)
    return float(out) if np.ndim(out) == 0 else out


def head_param_count(cfg, num_labels: int | None = None) -> int:
    """Trained head parameters, as the family counts them (encoders: dense H->Hp with bias and
    classifier Hp->C with bias); 0 for a family without a trainable head (decoders train LoRA only)."""
    cost = family_cost(cfg)
    return cost.head_param_count(cfg, num_labels) if _has_head(cost) else 0


def head_bytes(cfg, num_labels: int | None = None, bytes_per_param: int = 4) -> float:
    """Bytes of the classification head (always trained and exchanged)."""
    return float(head_param_count(cfg, num_labels) * bytes_per_param)


def base_param_count(cfg) -> int:
    """Frozen backbone parameters (rough), as the family counts them (encoders: embeddings, L layers,
    DeBERTa's position tables; decoders: embeddings and an untied LM head, L layers, the final norm)."""
    return family_cost(cfg).base_param_count(cfg)


# ----------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------


def layer_activation_floats(cfg, batch_size: int, seq_len: int, rank: int,
                            targets: Sequence[str] = DEFAULT_TARGETS) -> float:
    """Floats one layer keeps for its backward pass (rough estimate, the family's: encoders
    B*T*(8H + 2I + r*|targets|) + B*heads*T*T*2, see the ACT_* constants)."""
    return family_cost(cfg).layer_activation_floats(cfg, batch_size, seq_len, rank, _check_targets(targets, cfg))


def memory_breakdown(cfg, batch_size: int, seq_len: int, depth: int, rank: int,
                     targets: Sequence[str] = DEFAULT_TARGETS, num_labels: int | None = None,
                     bytes_per_param: int = 4, policy: str = "top") -> dict[str, float]:
    """Training memory in bytes, by component (see memory_needed)."""
    cost = family_cost(cfg)
    depth = _check_depth(cfg, depth)
    _check_positive(batch_size=batch_size, seq_len=seq_len, rank=rank)
    trainable = lora_param_count(cfg, depth, rank, targets) + head_param_count(cfg, num_labels)
    act = layer_activation_floats(cfg, batch_size, seq_len, rank, targets)
    b = float(bytes_per_param)
    return {
        "base_weights": base_param_count(cfg) * b,
        # the device holds the adapters of all L layers (lower ones frozen)
        "lora_weights": lora_param_count(cfg, cfg.num_layers, rank, targets) * b,
        "head_weights": head_param_count(cfg, num_labels) * b,
        "gradients": trainable * b,
        "adam_state": 2 * trainable * b,
        # kept for the backward pass by every layer it runs through (top: the top d)
        "activations": backward_span(cfg, depth, policy) * act * b,
        # one layer's forward, and the logits a family keeps beside it (decoders: [B, T, V])
        "working_set": act * b + cost.logits_floats(cfg, batch_size, seq_len) * b,
    }


def memory_needed(cfg, batch_size: int, seq_len: int, depth: int, rank: int,
                  targets: Sequence[str] = DEFAULT_TARGETS, num_labels: int | None = None,
                  bytes_per_param: int = 4, policy: str = "top") -> float:
    """Peak training memory in bytes at depth d (rough).

    Frozen base weights + LoRA adapters of all layers + head + gradients and
    Adam moments (2x) of the trainable part (d layers' LoRA + head) + activations
    stored for backward in the layers the backward pass runs through (the top d
    under the ``top`` layer ``policy``) + one layer's forward working set.
    """
    return float(sum(memory_breakdown(cfg, batch_size, seq_len, depth, rank, targets, num_labels,
                                      bytes_per_param, policy).values()))


# ----------------------------------------------------------------------------
# Seconds
# ----------------------------------------------------------------------------


ProfileLike = DeviceProfile | Sequence[DeviceProfile] | Mapping[str, Any]


def _field(profile: ProfileLike, name: str) -> np.ndarray:
    if isinstance(profile, DeviceProfile):
        return np.asarray(getattr(profile, name), dtype=np.float64)
    if isinstance(profile, Mapping):
        return np.asarray(profile[name], dtype=np.float64)
    return profiles_to_arrays(profile)[name]


def _out(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


def compute_time(flops, profile: ProfileLike):
    """Seconds to execute `flops` (scalar or [N]) on a profile (or [N] profiles): flops / profile.flops."""
    return _out(np.asarray(flops, dtype=np.float64) / _field(profile, "flops"))


def comm_time(bytes_up, bytes_down, profile: ProfileLike):
    """Seconds to upload and download: bytes_up / up_bw + bytes_down / down_bw (broadcast over [N])."""
    up = np.asarray(bytes_up, dtype=np.float64) / _field(profile, "up_bw")
    down = np.asarray(bytes_down, dtype=np.float64) / _field(profile, "down_bw")
    return _out(up + down)


def device_round_time(cfg, profiles: ProfileLike, *, local_steps, batch_size, seq_len: int, depth,
                      rank: int, targets: Sequence[str] = DEFAULT_TARGETS, num_labels: int | None = None,
                      down_layers=None, bytes_per_param: int = 4, factors: str = "AB", policy: str = "top"):
    """Seconds for each device to run one round.

    Device i runs `local_steps[i]` steps of `step_flops` at depth `depth[i]` (layer `policy`),
    uploads the adapters of its `depth[i]` trained layers plus the head, and
    downloads the adapters of `down_layers[i]` layers (default: its depth) plus
    the head. Arguments marked [N] may be scalars or arrays broadcast over
    devices. ``factors`` says which LoRA factors are exchanged (see :func:`lora_bytes`).

    Args:
      profiles: a DeviceProfile, a list of N, or `profiles_to_arrays` output.
      local_steps, batch_size, depth, down_layers: scalar or int [N].
    Returns:
      float64 [N] seconds (a float for a single DeviceProfile).
    """
    depth = np.asarray(depth)
    steps, batch, depth = np.broadcast_arrays(np.asarray(local_steps), np.asarray(batch_size), depth)
    down = depth if down_layers is None else np.broadcast_to(np.asarray(down_layers), depth.shape)
    flops = np.empty(depth.shape, dtype=np.float64)
    cache: dict[tuple[int, int], float] = {}
    for idx in np.ndindex(depth.shape):
        key = (int(batch[idx]), int(depth[idx]))
        if key not in cache:
            cache[key] = step_flops(cfg, key[0], seq_len, key[1], rank, targets, num_labels, policy)
        flops[idx] = cache[key]
    head = head_bytes(cfg, num_labels, bytes_per_param)
    up = lora_bytes(cfg, depth, rank, targets, bytes_per_param, factors) + head
    down_bytes = lora_bytes(cfg, down, rank, targets, bytes_per_param, factors) + head
    return _out(compute_time(steps * flops, profiles) + comm_time(up, down_bytes, profiles))


def group_round_time(device_times, mask=None):
    """Round time of a group: its slowest present member.

    Args:
      device_times: float [..., M] seconds (>= 0).
      mask: optional bool [..., M]; False entries (absent devices) are ignored.
    Returns:
      max over the last axis; 0 for an empty or all-absent group.
    """
    t = np.asarray(device_times, dtype=np.float64)
    if np.any(t < 0):
        raise ValueError("device times must be non-negative")
    if mask is not None:
        t = np.where(np.asarray(mask, dtype=bool), t, 0.0)
    return _out(np.max(t, axis=-1, initial=0.0))


def global_round_time(group_times, mask=None):
    """Round time of the whole system: the slowest group (0 if none). Shapes as group_round_time."""
    return group_round_time(group_times, mask)
