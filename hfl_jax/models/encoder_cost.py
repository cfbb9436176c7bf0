"""The cost model of the encoders (BERT, RoBERTa, DeBERTa v1 and v2/v3): FLOPs, parameters, activations.

The encoder families' part of :mod:`hfl_jax.fed.timemodel` (which asks a model config for its
``cost_model``: :class:`~hfl_jax.models.config.EncoderConfig` answers with this module), the
counterpart of :mod:`hfl_jax.models.decoder_cost`. Conventions as there: matrix products only,
``2 * m * k * n`` per ``[m, k] @ [k, n]`` (:func:`matmul_flops`); the backward pass counts exactly
the products JAX emits when the bottom ``L - d`` layers run under ``stop_gradient`` and the frozen
weights are not differentiated: a frozen weight in ``y = x W`` costs one product
(``dx = dy W^T``), and only when ``x`` depends on trained parameters; a LoRA pair costs ``dB``,
``dy B^T``, ``dA`` and, again only when ``x`` is live, ``dx``. Under the ``bottom`` and ``spread``
layer policies the backward pass runs through the ``span`` layers from the lowest trained one
up; the untrained ones among them are counted as a device that does not differentiate frozen
adapters runs them (activation gradients, ``dy B^T`` and ``dx`` through a frozen pair, no ``dB``,
``dA``); the JAX program here also computes those weight gradients and discards them. Elementwise work (layer norm,
softmax, GELU, residuals, scaling) and embedding gathers are not counted. docs/time_model.md
has every formula and assumption.

One layer on ``N = B * T`` tokens: projections ``Q, K, V, O: H->H``, FFN ``H->I`` and ``I->H``;
attention ``Q K^T`` and ``P V``; LoRA on a target ``in -> out``: ``2 N r (in + out)`` forward;
DeBERTa's disentangled attention adds the relative-position projections and scores
(:func:`relative_position_flops`). The trained classification head (pooler/dense ``H->Hp`` and
classifier ``Hp->C``) runs on the first token only.

``cfg`` is an :class:`~hfl_jax.models.config.EncoderConfig` or any object with ``model_type``,
``hidden_size``, ``num_layers``, ``num_heads``, ``intermediate_size`` (and ``num_labels``);
optional fields are read with ``getattr`` and the defaults named where they are used. Pure
Python: no array library.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

# The encoder LoRA targets (as hfl_jax.models.lora.TARGETS) and the default pair.
TARGET_NAMES = ("query", "key", "value", "attention_output", "intermediate", "output")
DEFAULT_TARGETS = ("query", "value")

# Floats kept per trained layer for the backward pass (rough; see layer_activation_floats):
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


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in targets if t not in TARGET_NAMES]
    if unknown or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets must be distinct names from {TARGET_NAMES}, got {targets}")
    return targets


def target_dims(cfg, target: str) -> tuple[int, int]:
    """(in, out) features of a LoRA target: H->H for query/key/value/attention_output,
    H->I for intermediate, I->H for output."""
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
    return (cfg.num_layers * layer_forward_flops(cfg, batch_size, seq_len, rank, targets)
            + head_forward_flops(cfg, batch_size, num_labels))


# ----------------------------------------------------------------------------
# Backward FLOPs
# ----------------------------------------------------------------------------


def _projection_backward(tokens: int, fan_in: int, fan_out: int, rank: int, adapted: bool,
                         input_live: bool, trained: bool = True) -> tuple[float, bool]:
    """Backward of y = x W (+ (x A) B); returns (FLOPs, whether y is live).

    "Live" means the value depends on trained parameters, so JAX carries a
    cotangent for it. W is frozen: dx = dy W^T only if x is live. LoRA: dB =
    (xA)^T dy, g = dy B^T, dA = x^T g, and dx += g A^T only if x is live.
    An adapter that is not ``trained`` (a layer the layer policy skips, above the
    lowest trained one) costs only its share of dx: g = dy B^T and g A^T, when x is live.
    """
    out_live = input_live or (adapted and trained)
    flops = matmul_flops(tokens, fan_out, fan_in) if input_live else 0.0
    if adapted and trained:
        flops += (matmul_flops(rank, tokens, fan_out)      # dB
                  + matmul_flops(tokens, fan_out, rank)    # g = dy B^T
                  + matmul_flops(fan_in, tokens, rank))    # dA
        if input_live:
            flops += matmul_flops(tokens, rank, fan_in)    # dx through A
    elif adapted and input_live:
        flops += matmul_flops(tokens, fan_out, rank) + matmul_flops(tokens, rank, fan_in)   # g, dx through A
    return flops, out_live


def layer_backward_flops(cfg, batch_size: int, seq_len: int, rank: int, targets: Sequence[str],
                         input_live: bool = True, trained: bool = True) -> float:
    """Backward FLOPs of one layer in the backward pass.

    `input_live` is False for the lowest trained layer (its input comes from
    stop_gradient), which then skips every product that would only carry a
    gradient further down. For a layer with a live input this is the forward
    projections once more (dx), the two attention products twice (both
    operands need gradients) and the LoRA products twice. `trained` False: a layer
    the layer policy skips above the lowest trained one (its input is live): the
    activation gradients only, no LoRA weight gradients.
    """
    targets = _check_targets(targets)
    H, I, N = cfg.hidden_size, cfg.intermediate_size, batch_size * seq_len
    flops, live = 0.0, {}
    for proj in ("query", "key", "value"):
        f, live[proj] = _projection_backward(N, H, H, rank, proj in targets, input_live, trained)
        flops += f
    probs_live = live["query"] or live["key"]
    context_live = probs_live or live["value"]
    score = matmul_flops(N, H, seq_len)  # any one of the four attention-backward products
    flops += score * (probs_live + live["value"] + live["query"] + live["key"])  # dP, dV, dQ, dK
    flops += _relative_position_backward(cfg, batch_size, seq_len, rank, targets, live, trained)
    f, attn_out_live = _projection_backward(N, H, H, rank, "attention_output" in targets, context_live, trained)
    flops += f
    ffn_in_live = attn_out_live or input_live  # residual around attention
    f, inter_live = _projection_backward(N, H, I, rank, "intermediate" in targets, ffn_in_live, trained)
    flops += f
    f, _ = _projection_backward(N, I, H, rank, "output" in targets, inter_live, trained)
    return flops + f


def _relative_position_backward(cfg, batch_size: int, seq_len: int, rank: int, targets: tuple[str, ...],
                                live: Mapping[str, bool], trained: bool = True) -> float:
    """DeBERTa c2p/p2c backward: gradient to the content side (dQ for c2p, dK for p2c)
    when live, and to the position side only when it carries a shared, adapted and trained
    query/key projection (then also that LoRA's dB, dy B^T, dA on 2S rows)."""
    H, N, P = cfg.hidden_size, batch_size * seq_len, 2 * relative_span(cfg, seq_len)
    flops = 0.0
    for kind, content, proj in (("c2p", "query", "key"), ("p2c", "key", "query")):
        if kind not in _pos_att_types(cfg):
            continue
        if live[content]:
            flops += matmul_flops(N, P, H)
        if _shares_att_key(cfg) and proj in targets and trained:
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
                   targets: Sequence[str] = DEFAULT_TARGETS, num_labels: int | None = None,
                   span: int | None = None) -> float:
    """Backward FLOPs at fine-tuning depth d: the top ``span`` layers (default ``d``, the ``top``
    layer policy), down to the lowest trained one (a dead input), of which ``d`` are trained and
    ``span - d`` only pass activation gradients, and the head (its dense ``dx`` only when the
    encoder is live: ``d > 0`` and some target)."""
    span = depth if span is None else span
    flops = 0.0
    if depth > 0:
        flops += layer_backward_flops(cfg, batch_size, seq_len, rank, targets, input_live=False)
        flops += (depth - 1) * layer_backward_flops(cfg, batch_size, seq_len, rank, targets, input_live=True)
        if span > depth:
            flops += (span - depth) * layer_backward_flops(cfg, batch_size, seq_len, rank, targets,
                                                           input_live=True, trained=False)
    encoder_live = depth > 0 and bool(targets)
    return flops + head_backward_flops(cfg, batch_size, num_labels, input_live=encoder_live)


# ----------------------------------------------------------------------------
# Parameters and memory
# ----------------------------------------------------------------------------


def head_param_count(cfg, num_labels: int | None = None) -> int:
    """Head parameters: dense H->Hp with bias and classifier Hp->C with bias (trained and exchanged)."""
    H, Hp, C = cfg.hidden_size, _pooler_size(cfg), _num_labels(cfg, num_labels)
    return H * Hp + Hp + Hp * C + C


def base_param_count(cfg) -> int:
    """Frozen backbone parameters (rough): embeddings + L layers (+ DeBERTa position tables).

    Embeddings: vocab_size*E word table, max_position_embeddings*E absolute
    positions (unless ``position_biased_input`` is False), type_vocab_size*E
    token types, a layer norm, and an E->H projection when E != H. A layer:
    Q, K, V, O (4H^2 + 4H), FFN (2HI + I + H), two layer norms (4H), and, for
    DeBERTa without shared keys, separate position projections (2H^2 + H).
    DeBERTa adds the 2S*H relative-embedding table.
    """
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


def layer_activation_floats(cfg, batch_size: int, seq_len: int, rank: int,
                            targets: Sequence[str] = DEFAULT_TARGETS) -> float:
    """Floats one layer keeps for its backward pass (rough estimate):
    B*T*(8H + 2I + r*|targets|) + B*heads*T*T*2 (see the ACT_* constants)."""
    tokens = batch_size * seq_len
    per_token = (ACT_HIDDEN * cfg.hidden_size + ACT_INTERMEDIATE * cfg.intermediate_size
                 + rank * len(_check_targets(targets)))
    return float(tokens * per_token + batch_size * cfg.num_heads * seq_len * seq_len * ACT_SCORES)


def logits_floats(cfg, batch_size: int, seq_len: int) -> float:
    """Logit floats the working set holds beyond one layer's activations: none counted (the
    classification logits are ``[B, C]``, negligible beside a layer's)."""
    return 0.0
