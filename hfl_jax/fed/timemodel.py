"""Analytic cost model of one federated round on simulated devices (host-side, numpy).

HierFedLoRA (arXiv 2503.21213) gives each device a fine-tuning depth ``d``:
the device runs the full forward pass of an ``L``-layer encoder but back-
propagates only through the top ``d`` layers and trains (and exchanges) only
their LoRA adapters plus the classification head. This module turns such a
workload into FLOPs, bytes and seconds so that simulated heterogeneous devices
(`profiles.DeviceProfile`) have realistic, depth-dependent round times.

FLOPs count matrix multiplications only, as XLA's cost analysis counts them:
``2 * m * k * n`` for an ``[m, k] @ [k, n]`` product. The backward pass counts
exactly the products JAX emits when the bottom ``L - d`` layers run under
``lax.stop_gradient`` and the base weights are not differentiated: a frozen
weight in ``y = x W`` costs one product (``dx = dy W^T``), and only when ``x``
depends on trained parameters; a LoRA pair costs ``dB``, ``dy B^T``, ``dA`` and,
again only when ``x`` is live, ``dx``. Elementwise work (layer norm, softmax,
GELU, residuals, scaling) and embedding gathers are not counted. See
docs/time_model.md for every formula and assumption.

``cfg`` is any object with ``model_type``, ``hidden_size``, ``num_layers``,
``num_heads``, ``intermediate_size`` and ``num_labels`` (e.g.
``hfl_jax.models.config.EncoderConfig``); optional fields are read with
``getattr`` and the defaults named where they are used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hfl_jax.fed.profiles import DeviceProfile, profiles_to_arrays

TARGET_NAMES = ("query", "key", "value", "attention_output", "intermediate", "output")
DEFAULT_TARGETS = ("query", "value")
MODEL_TYPES = ("bert", "roberta", "deberta", "deberta-v2")

# Floats kept per trained layer for the backward pass (rough; see memory_needed):
# per token, ACT_HIDDEN vectors of size H (layer input, q, k, v, attention
# context, attention output before its layer norm, its normalised output, FFN
# output before the last layer norm) and ACT_INTERMEDIATE of size I (GELU input
# and output); per head, ACT_SCORES [T, T] maps (softmax output and its input or
# a dropout mask).
ACT_HIDDEN = 8
ACT_INTERMEDIATE = 2
ACT_SCORES = 2


# ----------------------------------------------------------------------------
# Configuration helpers
# ----------------------------------------------------------------------------


def family_cost(cfg):
    """The cost module a model family supplies (``cfg.cost_model``: a decoder's
    :mod:`hfl_jax.models.decoder_cost`), or ``None`` for the encoders counted in this module."""
    return getattr(cfg, "cost_model", None)


def _check_cfg(cfg) -> None:
    if family_cost(cfg) is not None:
        return
    if cfg.model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {cfg.model_type!r}; expected one of {MODEL_TYPES}")


def _check_targets(targets: Sequence[str], cfg=None) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    names = tuple(getattr(cfg, "lora_targets", TARGET_NAMES)) if cfg is not None else TARGET_NAMES
    unknown = [t for t in targets if t not in names]
    if unknown or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets must be distinct names from {names}, got {targets}")
    return targets


def _check_depth(cfg, depth) -> int:
    if int(depth) != depth or not 0 <= depth <= cfg.num_layers:
        raise ValueError(f"depth must be an integer in [0, {cfg.num_layers}], got {depth!r}")
    return int(depth)


def _check_positive(**kw) -> None:
    for name, v in kw.items():
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def target_dims(cfg, target: str) -> tuple[int, int]:
    """(in, out) features of a LoRA target: H->H for query/key/value/attention_output,
    H->I for intermediate, I->H for output; a family that owns its targets answers itself
    (``cfg.lora_target_dims``)."""
    if hasattr(cfg, "lora_target_dims"):
        _check_targets((target,), cfg)
        return tuple(cfg.lora_target_dims(target))
    _check_targets((target,))
    H, I = cfg.hidden_size, cfg.intermediate_size
    return {"intermediate": (H, I), "output": (I, H)}.get(target, (H, H))


def _num_labels(cfg, num_labels: int | None) -> int:
    return int(getattr(cfg, "num_labels", 2) if num_labels is None else num_labels)


def _pooler_size(cfg) -> int:
    return int(getattr(cfg, "pooler_hidden_size", None) or cfg.hidden_size)


def _is_deberta(cfg) -> bool:
    return cfg.model_type in ("deberta", "deberta-v2") and getattr(cfg, "relative_attention", True)


def _pos_att_types(cfg) -> tuple[str, ...]:
    return tuple(getattr(cfg, "pos_att_type", None) or ("c2p", "p2c")) if _is_deberta(cfg) else ()


def _shares_att_key(cfg) -> bool:
    # HF default for DeBERTa-v2/v3 checkpoints: position projections reuse the
    # query/key projections (and therefore their LoRA adapters).
    return bool(getattr(cfg, "share_att_key", cfg.model_type == "deberta-v2"))


def _max_relative_positions(cfg) -> int:
    m = int(getattr(cfg, "max_relative_positions", -1))
    return m if m >= 1 else int(getattr(cfg, "max_position_embeddings", 512))


def relative_span(cfg, seq_len: int) -> int:
    """DeBERTa attention span S; the relative-position table used per layer has 2*S rows.

    As in Hugging Face: DeBERTa-v2/v3 uses ``position_buckets`` if positive, else
    ``max_relative_positions`` (which defaults to ``max_position_embeddings``),
    independent of T; DeBERTa (v1) uses ``min(T, max_relative_positions)``.
    Zero for BERT/RoBERTa.
    """
    if not _is_deberta(cfg):
        return 0
    if cfg.model_type == "deberta-v2":
        buckets = int(getattr(cfg, "position_buckets", -1))
        return buckets if buckets > 0 else _max_relative_positions(cfg)
    return min(int(seq_len), _max_relative_positions(cfg))


# ----------------------------------------------------------------------------
# Forward FLOPs, one helper per piece
# ----------------------------------------------------------------------------


def matmul_flops(m: float, k: float, n: float) -> float:
    """FLOPs of an [m, k] @ [k, n] product: 2*m*k*n (XLA's convention)."""
    return 2.0 * m * k * n


def projection_flops(cfg, tokens: int) -> float:
    """Frozen dense projections of one layer for `tokens` = B*T rows:
    Q, K, V, O (H->H each) and FFN in (H->I) and out (I->H)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    return 4 * matmul_flops(tokens, H, H) + matmul_flops(tokens, H, I) + matmul_flops(tokens, I, H)


def attention_flops(cfg, batch_size: int, seq_len: int) -> float:
    """Scores Q K^T and context P V of one layer, summed over heads: 2 * 2*B*T*T*H."""
    return 2 * matmul_flops(batch_size * seq_len, cfg.hidden_size, seq_len)


def lora_forward_flops(cfg, tokens: int, rank: int, targets: Sequence[str]) -> float:
    """x @ A and (x A) @ B of one layer: sum over targets of 2*N*r*(in + out)."""
    total = 0.0
    for t in _check_targets(targets):
        fan_in, fan_out = target_dims(cfg, t)
        total += matmul_flops(tokens, fan_in, rank) + matmul_flops(tokens, rank, fan_out)
    return total


def relative_position_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str]) -> float:
    """DeBERTa disentangled attention extras of one layer (0 for BERT/RoBERTa).

    Per type in ``pos_att_type`` (default c2p and p2c): projecting the 2S-row
    relative embedding table (2*2S*H*H, batch-independent), plus the LoRA of the
    shared query/key projection on those rows when ``share_att_key`` and that
    projection is a target, plus the score-sized product with the content
    queries/keys, [B*T, H] x [H, 2S] (2*B*T*2S*H) before the gather.
    """
    H, P = cfg.hidden_size, 2 * relative_span(cfg, seq_len)
    targets = _check_targets(targets)
    total = 0.0
    for kind, proj in (("c2p", "key"), ("p2c", "query")):
        if kind not in _pos_att_types(cfg):
            continue
        total += matmul_flops(P, H, H) + matmul_flops(batch_size * seq_len, H, P)
        if _shares_att_key(cfg) and proj in targets:
            total += lora_forward_flops(cfg, P, rank, (proj,))
    return total


def head_forward_flops(cfg, batch_size: int, num_labels: int | None = None) -> float:
    """Classification head on the first token: dense H->Hp (pooler) and classifier Hp->C."""
    H, Hp, C = cfg.hidden_size, _pooler_size(cfg), _num_labels(cfg, num_labels)
    return matmul_flops(batch_size, H, Hp) + matmul_flops(batch_size, Hp, C)


def layer_forward_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str]) -> float:
    """Forward FLOPs of one encoder layer with LoRA on `targets`."""
    tokens = batch_size * seq_len
    return (projection_flops(cfg, tokens) + attention_flops(cfg, batch_size, seq_len)
            + lora_forward_flops(cfg, tokens, rank, targets)
            + relative_position_flops(cfg, batch_size, seq_len, rank, targets))


def forward_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str] = DEFAULT_TARGETS,
                  num_labels: int | None = None) -> float:
    """Forward (evaluation) FLOPs of one batch [B, T]: L layers plus the head."""
    _check_cfg(cfg)
    _check_positive(batch_size=batch_size, seq_len=seq_len, rank=rank)
    if family_cost(cfg) is not None:
        return family_cost(cfg).forward_flops(cfg, batch_size, seq_len, rank, _check_targets(targets, cfg))
    return (cfg.num_layers * layer_forward_flops(cfg, batch_size, seq_len, rank, targets)
            + head_forward_flops(cfg, batch_size, num_labels))


# ----------------------------------------------------------------------------
# Backward FLOPs
# ----------------------------------------------------------------------------


def _projection_backward(tokens: int, fan_in: int, fan_out: int, rank: int, adapted: bool,
                         input_live: bool) -> tuple[float, bool]:
    """Backward of y = x W (+ (x A) B); returns (FLOPs, whether y is live).

    "Live" means the value depends on trained parameters, so JAX carries a
    cotangent for it. W is frozen: dx = dy W^T only if x is live. LoRA: dB =
    (xA)^T dy, g = dy B^T, dA = x^T g, and dx += g A^T only if x is live.
    """
    out_live = input_live or adapted
    flops = matmul_flops(tokens, fan_out, fan_in) if input_live else 0.0
    if adapted:
        flops += (matmul_flops(rank, tokens, fan_out)      # dB
                  + matmul_flops(tokens, fan_out, rank)    # g = dy B^T
                  + matmul_flops(fan_in, tokens, rank))    # dA
        if input_live:
            flops += matmul_flops(tokens, rank, fan_in)    # dx through A
    return flops, out_live


def layer_backward_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str],
                         input_live: bool = True) -> float:
    """Backward FLOPs of one trained layer.

    `input_live` is False for the lowest trained layer (its input comes from
    stop_gradient), which then skips every product that would only carry a
    gradient further down. For a layer with a live input this is the forward
    projections once more (dx), the two attention products twice (both
    operands need gradients) and the LoRA products twice.
    """
    targets = _check_targets(targets)
    H, I, N = cfg.hidden_size, cfg.intermediate_size, batch_size * seq_len
    flops, live = 0.0, {}
    for proj in ("query", "key", "value"):
        f, live[proj] = _projection_backward(N, H, H, rank, proj in targets, input_live)
        flops += f
    probs_live = live["query"] or live["key"]
    context_live = probs_live or live["value"]
    score = matmul_flops(N, H, seq_len)  # any one of the four attention-backward products
    flops += score * (probs_live + live["value"] + live["query"] + live["key"])  # dP, dV, dQ, dK
    flops += _relative_position_backward(cfg, batch_size, seq_len, rank, targets, live)
    f, attn_out_live = _projection_backward(N, H, H, rank, "attention_output" in targets, context_live)
    flops += f
    ffn_in_live = attn_out_live or input_live  # residual around attention
    f, inter_live = _projection_backward(N, H, I, rank, "intermediate" in targets, ffn_in_live)
    flops += f
    f, _ = _projection_backward(N, I, H, rank, "output" in targets, inter_live)
    return flops + f


def _relative_position_backward(cfg, batch_size: int, seq_len: int, rank: int, targets: tuple[str, ...],
                                live: Mapping[str, bool]) -> float:
    """DeBERTa c2p/p2c backward: gradient to the content side (dQ for c2p, dK for p2c)
    when live, and to the position side only when it carries a shared, adapted
    query/key projection (then also that LoRA's dB, dy B^T, dA on 2S rows)."""
    H, N, P = cfg.hidden_size, batch_size * seq_len, 2 * relative_span(cfg, seq_len)
    flops = 0.0
    for kind, content, proj in (("c2p", "query", "key"), ("p2c", "key", "query")):
        if kind not in _pos_att_types(cfg):
            continue
        if live[content]:
            flops += matmul_flops(N, P, H)
        if _shares_att_key(cfg) and proj in targets:
            flops += matmul_flops(P, N, H) + _projection_backward(P, H, H, rank, True, False)[0]
    return flops


def head_backward_flops(cfg, batch_size: int, num_labels: int | None = None, input_live: bool = True) -> float:
    """Backward of the (trained) head: dW and dx of the classifier, dW of the dense
    layer, and its dx only if the encoder output is live (depth > 0)."""
    H, Hp, C = cfg.hidden_size, _pooler_size(cfg), _num_labels(cfg, num_labels)
    flops = matmul_flops(Hp, batch_size, C) + matmul_flops(batch_size, C, Hp)  # classifier dW, dx
    flops += matmul_flops(H, batch_size, Hp)  # dense dW
    if input_live:
        flops += matmul_flops(batch_size, Hp, H)  # dense dx
    return flops


def backward_flops(cfg, batch_size: int, seq_len: int, depth: int, rank: int,
                   targets: Sequence[str] = DEFAULT_TARGETS, num_labels: int | None = None) -> float:
    """Backward FLOPs at fine-tuning depth d: top d layers (the lowest with a dead input) and the head."""
    _check_cfg(cfg)
    depth = _check_depth(cfg, depth)
    targets = _check_targets(targets, cfg)
    _check_positive(batch_size=batch_size, seq_len=seq_len, rank=rank)
    if family_cost(cfg) is not None:
        return family_cost(cfg).backward_flops(cfg, batch_size, seq_len, depth, rank, targets)
    flops = 0.0
    if depth > 0:
        flops += layer_backward_flops(cfg, batch_size, seq_len, rank, targets, input_live=False)
        flops += (depth - 1) * layer_backward_flops(cfg, batch_size, seq_len, rank, targets, input_live=True)
    encoder_live = depth > 0 and bool(targets)
    return flops + head_backward_flops(cfg, batch_size, num_labels, input_live=encoder_live)


def step_flops(cfg, batch_size: int, seq_len: int, depth: int, rank: int,
               targets: Sequence[str] = DEFAULT_TARGETS, num_labels: int | None = None) -> float:
    """Training FLOPs of one local step on a [B, T] batch at fine-tuning depth d.

    Forward through all L layers and the head, backward through the head and
    the top d layers only (HierFedLoRA's depth). `num_labels` defaults to
    ``cfg.num_labels`` (2 if absent). Raises ValueError for depth outside [0, L].
    """
    return (forward_flops(cfg, batch_size, seq_len, rank, targets, num_labels)
            + backward_flops(cfg, batch_size, seq_len, depth, rank, targets, num_labels))


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
    """LoRA parameters of the top `depth` layers (the ones a device trains)."""
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
    """Head parameters: dense H->Hp with bias and classifier Hp->C with bias (0 for a family
    without a trainable head: decoders train LoRA only)."""
    if family_cost(cfg) is not None:
        return 0
    H, Hp, C = cfg.hidden_size, _pooler_size(cfg), _num_labels(cfg, num_labels)
    return H * Hp + Hp + Hp * C + C


def head_bytes(cfg, num_labels: int | None = None, bytes_per_param: int = 4) -> float:
    """Bytes of the classification head (always trained and exchanged)."""
    return float(head_param_count(cfg, num_labels) * bytes_per_param)


def base_param_count(cfg) -> int:
    """Frozen backbone parameters (rough): embeddings + L layers (+ DeBERTa position tables).

    Embeddings: vocab_size*E word table, max_position_embeddings*E absolute
    positions (unless ``position_biased_input`` is False), type_vocab_size*E
    token types, a layer norm, and an E->H projection when E != H. A layer:
    Q, K, V, O (4H^2 + 4H), FFN (2HI + I + H), two layer norms (4H), and, for
    DeBERTa without shared keys, separate position projections (2H^2 + H).
    DeBERTa adds the 2S*H relative-embedding table. Other families count themselves
    (:func:`family_cost`).
    """
    if family_cost(cfg) is not None:
        return family_cost(cfg).base_param_count(cfg)
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    E = int(getattr(cfg, "embedding_size", None) or H)
    positions = int(getattr(cfg, "max_position_embeddings", 512))
    if not getattr(cfg, "position_biased_input", cfg.model_type != "deberta-v2"):
        positions = 0
    types = int(getattr(cfg, "type_vocab_size", 2))
    emb = (int(getattr(cfg, "vocab_size", 30522)) + positions + types) * E + 2 * E + (E * H + H if E != H else 0)
    layer = 4 * H * H + 4 * H + 2 * H * I + I + H + 4 * H
    if _is_deberta(cfg):
        if not _shares_att_key(cfg):
            layer += 2 * H * H + H
        emb += 2 * relative_span(cfg, _max_relative_positions(cfg)) * H + 2 * H
    return emb + L * layer


# ----------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------


def layer_activation_floats(cfg, batch_size: int, seq_len: int, rank: int,
                            targets: Sequence[str] = DEFAULT_TARGETS) -> float:
    """Floats one layer keeps for its backward pass (rough estimate):
    B*T*(8H + 2I + r*|targets|) + B*heads*T*T*2 (see ACT_* constants); other families count
    themselves (:func:`family_cost`)."""
    if family_cost(cfg) is not None:
        return family_cost(cfg).layer_activation_floats(cfg, batch_size, seq_len, rank, _check_targets(targets, cfg))
    tokens = batch_size * seq_len
    per_token = (ACT_HIDDEN * cfg.hidden_size + ACT_INTERMEDIATE * cfg.intermediate_size
                 + rank * len(_check_targets(targets)))
    return float(tokens * per_token + batch_size * cfg.num_heads * seq_len * seq_len * ACT_SCORES)


def memory_breakdown(cfg, batch_size: int, seq_len: int, depth: int, rank: int,
                     targets: Sequence[str] = DEFAULT_TARGETS, num_labels: int | None = None,
                     bytes_per_param: int = 4) -> dict[str, float]:
    """Training memory in bytes, by component (see memory_needed)."""
    _check_cfg(cfg)
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
        "activations": depth * act * b,
        "working_set": act * b + (family_cost(cfg).logits_floats(cfg, batch_size, seq_len) * b
                                  if family_cost(cfg) is not None else 0.0),
    }


def memory_needed(cfg, batch_size: int, seq_len: int, depth: int, rank: int,
                  targets: Sequence[str] = DEFAULT_TARGETS, num_labels: int | None = None,
                  bytes_per_param: int = 4) -> float:
    """Peak training memory in bytes at depth d (rough).

    Frozen base weights + LoRA adapters of all layers + head + gradients and
    Adam moments (2x) of the trainable part (top-d LoRA + head) + activations
    stored for backward in the top d layers + one layer's forward working set.
    """
    return float(sum(memory_breakdown(cfg, batch_size, seq_len, depth, rank, targets, num_labels,
                                      bytes_per_param).values()))


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
                      down_layers=None, bytes_per_param: int = 4, factors: str = "AB"):
    """Seconds for each device to run one round.

    Device i runs `local_steps[i]` steps of `step_flops` at depth `depth[i]`,
    uploads the adapters of its top `depth[i]` layers plus the head, and
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
            cache[key] = step_flops(cfg, key[0], seq_len, key[1], rank, targets, num_labels)
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
