"""The cost model of a decoder LLM (Llama, Qwen2, Mistral): FLOPs, parameters, activations.

The decoder family's part of :mod:`hfl_jax.fed.timemodel` (which asks a model config for its
``cost_model``). Conventions as there: matrix products only, ``2 * m * k * n`` per
``[m, k] @ [k, n]``; the backward pass counts the products JAX emits when the bottom
``L - d`` layers run under ``stop_gradient`` and the frozen weights are not differentiated
(another layer policy: the top ``span`` layers down to the lowest trained one, the untrained
ones among them counted without LoRA weight gradients, as :mod:`hfl_jax.models.encoder_cost`).

One layer on ``N = B * T`` tokens, with ``Dq = heads * head_dim`` and ``Dkv = kv_heads * head_dim``:

* projections ``q: H->Dq``, ``k, v: H->Dkv``, ``o: Dq->H``, ``gate, up: H->I``, ``down: I->H``;
* attention: scores ``Q K^T`` and context ``P V``, each ``2 * N * T * Dq`` (grouped-query
  attention shares K and V between heads but every query head still multiplies);
* LoRA on a target ``in -> out``: ``2 N r (in + out)`` forward;
* the LM head ``H -> V`` on every token (the loss needs every position's logits), frozen: its
  backward is ``dx`` only, and only when some layer is trained (depth > 0).

Sliding windows are not discounted (XLA computes the full ``T x T`` scores and masks them).
"""
from __future__ import annotations

from collections.abc import Sequence

# frozen dx when the input is live; LoRA dB, dy B^T, dA and (input live) dx through A; an untrained
# adapter only dy B^T and dx through A (the encoders' rule, the same products)
from hfl_jax.models.encoder_cost import _projection_backward as _proj_backward

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _mm(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


def dims(cfg, target: str) -> tuple[int, int]:
    """(in, out) features of one of the layer's projections."""
    return tuple(cfg.lora_target_dims(target))


def layer_forward_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str]) -> float:
    """Forward FLOPs of one decoder layer with LoRA on ``targets``."""
    n = batch_size * seq_len
    flops = sum(_mm(n, *dims(cfg, p)) for p in PROJECTIONS)
    flops += 2 * _mm(n, cfg.num_heads * cfg.head_dim, seq_len)
    flops += sum(_mm(n, dims(cfg, t)[0], rank) + _mm(n, rank, dims(cfg, t)[1]) for t in targets)
    return flops


def head_forward_flops(cfg, batch_size: int, seq_len: int) -> float:
    """The LM head on every token: ``2 * N * H * V``."""
    return _mm(batch_size * seq_len, cfg.hidden_size, cfg.vocab_size)


def forward_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str]) -> float:
    """Forward FLOPs of one batch ``[B, T]``: ``L`` layers and the LM head."""
    return cfg.num_layers * layer_forward_flops(cfg, batch_size, seq_len, rank, targets) \
        + head_forward_flops(cfg, batch_size, seq_len)


def layer_backward_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str],
                         input_live: bool = True, trained: bool = True) -> float:
    """Backward FLOPs of one layer in the backward pass (``input_live`` False for the lowest trained
    one; ``trained`` False for an untrained one above it: activation gradients only)."""
    n = batch_size * seq_len
    t = set(targets)
    flops, live = 0.0, {}
    for p in ("q_proj", "k_proj", "v_proj"):
        f, live[p] = _proj_backward(n, *dims(cfg, p), rank, p in t, input_live, trained)
        flops += f
    probs_live = live["q_proj"] or live["k_proj"]
    context_live = probs_live or live["v_proj"]
    score = _mm(n, cfg.num_heads * cfg.head_dim, seq_len)
    flops += score * (probs_live + live["v_proj"] + live["q_proj"] + live["k_proj"])   # dP, dV, dQ, dK
    f, o_live = _proj_backward(n, *dims(cfg, "o_proj"), rank, "o_proj" in t, context_live, trained)
    flops += f
    mlp_in_live = o_live or input_live   # residual around attention
    f, gate_live = _proj_backward(n, *dims(cfg, "gate_proj"), rank, "gate_proj" in t, mlp_in_live, trained)
    flops += f
    f, up_live = _proj_backward(n, *dims(cfg, "up_proj"), rank, "up_proj" in t, mlp_in_live, trained)
    flops += f
    f, _ = _proj_backward(n, *dims(cfg, "down_proj"), rank, "down_proj" in t, gate_live or up_live, trained)
    return flops + f


def backward_flops(cfg, batch_size: int, seq_len: int, depth: int, rank: int, targets: Sequence[str],
                   span: int | None = None) -> float:
    """Backward FLOPs at fine-tuning depth ``d``: the LM head's ``dx`` (when ``d > 0``) and the top
    ``span`` layers (default ``d``, the ``top`` layer policy), the lowest trained one with a dead input,
    ``d - 1`` more trained ones and ``span - d`` untrained ones (activation gradients only)."""
    if depth == 0 or not targets:
        return 0.0
    span = depth if span is None else span
    head = _mm(batch_size * seq_len, cfg.vocab_size, cfg.hidden_size)
    flops = (head + layer_backward_flops(cfg, batch_size, seq_len, rank, targets, input_live=False)
             + (depth - 1) * layer_backward_flops(cfg, batch_size, seq_len, rank, targets, input_live=True))
    if span > depth:
        flops += (span - depth) * layer_backward_flops(cfg, batch_size, seq_len, rank, targets,
                                                       input_live=True, trained=False)
    return flops


def base_param_count(cfg) -> int:
    """Frozen parameters: embeddings (and an untied LM head), ``L`` layers (projections, biases,
    two RMSNorms), the final norm."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    dq, dkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = H * dq + 2 * H * dkv + dq * H + 3 * H * I + 2 * H
    if getattr(cfg, "qkv_bias", False):
        layer += dq + 2 * dkv
    if getattr(cfg, "o_bias", False):
        layer += H
    if getattr(cfg, "mlp_bias", False):
        layer += 2 * I + H
    emb = cfg.vocab_size * H * (1 if cfg.tie_word_embeddings else 2)
    return emb + cfg.num_layers * layer + H


def layer_activation_floats(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str]) -> float:
    """Floats one trained layer keeps for its backward pass (rough): per token the layer input, its
    norm, q, k, v, the context, the attention output and its norm (8 vectors of about ``H``), gate,
    up and their product (3 of ``I``), ``x A`` per target; per head the ``T x T`` probabilities and
    scores."""
    tokens = batch_size * seq_len
    per_token = 8 * cfg.hidden_size + 3 * cfg.intermediate_size + rank * len(targets)
    return float(tokens * per_token + batch_size * cfg.num_heads * seq_len * seq_len * 2)


def logits_floats(cfg, batch_size: int, seq_len: int) -> float:
    """The float32 logits and their gradient: ``2 * B * T * V`` (a large share for big vocabularies)."""
    return 2.0 * batch_size * seq_len * cfg.vocab_size
