"""DeBERTa (v1) and DeBERTa-v2/v3: disentangled attention, embeddings, head, checkpoint import.

Implements He et al., 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled
Attention" (v1, ``model_type="deberta"``) and the v2/v3 variant
(``model_type="deberta-v2"``: log-bucketed relative positions, shared
position/content projections, LayerNorm on the relative embeddings), matching
transformers' ``DebertaForSequenceClassification`` and
``DebertaV2ForSequenceClassification`` in evaluation mode (no dropout).

Parameter layout, on top of :mod:`hfl_jax.models.encoder`'s::

    embeddings: word, [position], [token_type], [embed_proj], ln
    extras:     rel_embeddings [2 * span, H], [rel_ln]          (encoder level)
    layers/attention: query, key, value                          (LoRA targets)
                      v1: [pos_proj (no bias)], [pos_q_proj]
                      v2: [pos_key_proj], [pos_query_proj]       (when not share_att_key)
    head:       pooler (dense + pooler_hidden_act on token 0), classifier

v1's fused ``in_proj`` (heads interleaved as ``[q_h, k_h, v_h]`` blocks) is
split at import into ``query``/``key``/``value`` kernels; ``q_bias`` and
``v_bias`` become the query and value biases and the key bias is zero, so the
computation is unchanged and LoRA on query/value works like in BERT.

Not supported: v2's ``conv_kernel_size > 0`` (deberta-v2-xlarge/xxlarge's
ConvLayer after layer 0; the shared layer scan has no hook for it), v1's
``talking_head``, ``z_steps`` and a custom ``attention_head_size``.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.models.bert import convert_block
from hfl_jax.models.config import ConfigError, EncoderConfig
from hfl_jax.models.convert import Tensors, stack_layers
from hfl_jax.models.encoder import Family, register_family
from hfl_jax.models.layers import LoRADense, activation, dense_init, layer_norm, split_heads

Array = jax.Array


def _check_supported(cfg: EncoderConfig) -> None:
    if cfg.model_type == "deberta-v2" and cfg.conv_kernel_size > 0:
        raise ConfigError(
            f"conv_kernel_size={cfg.conv_kernel_size}: DeBERTa-v2's ConvLayer (deberta-v2-xlarge/xxlarge) is not "
            f"supported by hfl_jax; use a model with conv_kernel_size=0 (e.g. deberta-v3-*)")


def _max_relative_positions(cfg: EncoderConfig) -> int:
    return cfg.max_relative_positions if cfg.max_relative_positions >= 1 else cfg.max_position_embeddings


def _rel_embedding_rows(cfg: EncoderConfig) -> int:
    """Rows of ``encoder.rel_embeddings``."""
    if cfg.model_type == "deberta-v2" and cfg.position_buckets > 0:
        return 2 * cfg.position_buckets
    return 2 * _max_relative_positions(cfg)


def _norm_rel_ebd(cfg: EncoderConfig) -> bool:
    return cfg.model_type == "deberta-v2" and "layer_norm" in [
        x.strip() for x in cfg.norm_rel_ebd.lower().split("|")]


def log_bucket_position(relative_pos: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """DeBERTa-v2's log-bucketed relative positions (``make_log_bucket_position``).

    Distances below ``bucket_size // 2`` are kept; larger ones are mapped
    logarithmically onto the remaining buckets up to ``max_position``. Computed
    in float32 with transformers' operation order so that ``ceil`` rounds alike.
    """
    rel = np.asarray(relative_pos, np.int64)
    sign = np.sign(rel)
    mid = bucket_size // 2
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
    ratio = abs_pos.astype(np.float32) / np.float32(mid)
    denom = np.log(np.float32((max_position - 1) / mid))
    log_pos = np.ceil(np.log(ratio) / denom * np.float32(mid - 1)) + np.float32(mid)
    bucket = np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * sign.astype(np.float32))
    return bucket.astype(np.int64)


def relative_positions(cfg: EncoderConfig, seq_len: int) -> np.ndarray:
    """``[T, T]`` int32 relative positions ``i - j`` (log-bucketed for v2 with ``position_buckets > 0``)."""
    ids = np.arange(seq_len)
    rel = ids[:, None] - ids[None, :]
    if cfg.model_type == "deberta-v2" and cfg.position_buckets > 0:
        rel = log_bucket_position(rel, cfg.position_buckets, _max_relative_positions(cfg))
    return rel.astype(np.int32)


class DebertaEmbeddings(nn.Module):
    """Word [+ absolute position] [+ token type] embeddings, [embed_proj], LayerNorm, times the mask."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array) -> Array:
        cfg = self.cfg
        dim = cfg.embedding_size or cfg.hidden_size
        emb = lambda n, name: nn.Embed(n, dim, embedding_init=dense_init(cfg), name=name)
        x = emb(cfg.vocab_size, "word")(input_ids)
        if cfg.position_biased_input:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
            x = x + emb(cfg.max_position_embeddings, "position")(positions)
        if cfg.type_vocab_size > 0:
            x = x + emb(cfg.type_vocab_size, "token_type")(token_type_ids)
        if dim != cfg.hidden_size:
            x = nn.Dense(cfg.hidden_size, use_bias=False, kernel_init=dense_init(cfg), name="embed_proj")(x)
        x = layer_norm(cfg, "ln")(x)
        return x * attention_mask[..., None].astype(x.dtype)


class RelativeContext(nn.Module):
    """Per-batch context shared by every layer.

    Returns ``{"mask": [B, 1, T, T] bool}`` (query and key both non-padding, as
    DeBERTa's 2-D mask) and, with ``relative_attention``, ``"rel_pos": [T, T]``
    int32 and ``"rel_embeddings": [2 * span, H]`` (v1: the rows for
    ``span = min(T, max_relative_positions)`` around the centre; v2: all rows,
    LayerNorm-ed when ``norm_rel_ebd`` has ``layer_norm``).
    """

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, attention_mask: Array, hidden: Array) -> dict[str, Any]:
        cfg = self.cfg
        _check_supported(cfg)
        m = attention_mask > 0
        ctx = {"mask": m[:, None, :, None] & m[:, None, None, :]}
        if not cfg.relative_attention:
            return ctx
        seq_len = hidden.shape[1]
        table = self.param("rel_embeddings", dense_init(cfg), (_rel_embedding_rows(cfg), cfg.hidden_size))
        if cfg.model_type == "deberta":
            max_rel = _max_relative_positions(cfg)
            span = min(seq_len, max_rel)
            table = table[max_rel - span:max_rel + span]
        elif _norm_rel_ebd(cfg):
            table = layer_norm(cfg, "rel_ln")(table)
        ctx["rel_embeddings"] = table.astype(hidden.dtype)
        ctx["rel_pos"] = jnp.asarray(relative_positions(cfg, seq_len))
        return ctx


def _gather_positions(scores: Array, index: np.ndarray | Array) -> Array:
    """``out[..., i, j] = scores[..., i, index[i, j]]`` for ``scores [..., T, P]``, ``index [T, T]``."""
    rows = jnp.arange(index.shape[0])[:, None]
    return scores[..., rows, index]


class DisentangledAttention(nn.Module):
    """DeBERTa's disentangled self-attention (content-to-content + c2p + p2c).

    Returns the merged context ``[B, T, H]`` before the attention output
    projection. Scores are scaled by ``sqrt(head_dim * (1 + #position terms))``
    and fully masked rows (padding queries) get uniform attention, as in
    transformers' ``masked_fill(finfo.min)`` + softmax.

    Under a ``compute_dtype`` the projections run in it, but queries, keys and values are
    cast back to float32 here: the disentangled scores, their softmax and the context are
    float32 (this family keeps its own attention path; ``attention`` is accepted and ignored).
    """

    cfg: EncoderConfig
    compute_dtype: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, h: Array, ctx: Mapping[str, Array], lora: Mapping[str, Mapping[str, Array]],
                 scale: float) -> Array:
        cfg = self.cfg
        v1 = cfg.model_type == "deberta"
        types = cfg.pos_att_type
        heads = lambda x: split_heads(x.astype(jnp.float32), cfg.num_heads)
        dense = lambda name, bias=True: LoRADense(cfg.hidden_size, dense_init(cfg), use_bias=bias,
                                                  compute_dtype=self.compute_dtype, name=name)
        q_proj, k_proj, v_proj = dense("query"), dense("key"), dense("value")
        q = heads(q_proj(h, lora.get("query"), scale))  # [B, T, heads, d]
        k = heads(k_proj(h, lora.get("key"), scale))
        v = heads(v_proj(h, lora.get("value"), scale))

        factor = 1 + (len(types) if v1 else sum(t in types for t in ("c2p", "p2c")))
        s = jnp.asarray(np.sqrt(np.float32(cfg.head_dim) * np.float32(factor)), h.dtype)
        if v1:  # v1 scales the query (and so c2p) once; v2 scales the key and each position term
            q = q / s
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k / s)

        if cfg.relative_attention and "rel_embeddings" in ctx:
            rel, rel_pos = ctx["rel_embeddings"], ctx["rel_pos"]
            span = rel.shape[0] // 2
            bias = None
            if "c2p" in types:
                if v1:
                    pos_key = dense("pos_proj", bias=False)(rel)
                elif cfg.share_att_key:  # same projection (and LoRA) as the content keys
                    pos_key = k_proj(rel, lora.get("key"), scale)
                else:
                    pos_key = dense("pos_key_proj")(rel)
                c2p = jnp.einsum("bqhd,phd->bhqp", q, heads(pos_key))
                c2p = _gather_positions(c2p, jnp.clip(rel_pos + span, 0, 2 * span - 1))
                bias = c2p if v1 else c2p / s
            if "p2c" in types:
                if v1:
                    pos_query = heads(dense("pos_q_proj")(rel)) / s
                elif cfg.share_att_key:
                    pos_query = heads(q_proj(rel, lora.get("query"), scale))
                else:
                    pos_query = heads(dense("pos_query_proj")(rel))
                p2c = jnp.einsum("bkhd,phd->bhkp", k, pos_query)
                p2c = _gather_positions(p2c, jnp.clip(-rel_pos + span, 0, 2 * span - 1)).swapaxes(-1, -2)
                p2c = p2c if v1 else p2c / s
                bias = p2c if bias is None else bias + p2c
            if bias is not None:
                scores = scores + bias

        scores = jnp.where(ctx["mask"], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return out.reshape(*out.shape[:2], cfg.hidden_size).astype(self.compute_dtype or jnp.float32)


class ContextPoolerHead(nn.Module):
    """transformers' ``ContextPooler`` (dense + ``pooler_hidden_act`` on token 0) then ``classifier``."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array) -> Array:
        cfg = self.cfg
        init = dense_init(cfg)
        size = cfg.pooler_hidden_size or cfg.hidden_size
        pooled = activation(cfg.pooler_hidden_act)(nn.Dense(size, kernel_init=init, name="pooler")(hidden[:, 0]))
        return nn.Dense(cfg.num_labels, kernel_init=init, name="classifier")(pooled)


def _convert_attention(t: Tensors, cfg: EncoderConfig, prefix: str) -> dict:
    rel = cfg.relative_attention
    if cfg.model_type == "deberta":
        H, d = cfg.hidden_size, cfg.head_dim
        # in_proj rows are [q_0, k_0, v_0, q_1, k_1, v_1, ...] blocks of head_dim rows.
        w = t.get(prefix + "in_proj.weight").reshape(cfg.num_heads, 3, d, H)
        wq, wk, wv = (w[:, j].reshape(H, H).T for j in range(3))
        out = {"query": {"kernel": wq, "bias": t.get(prefix + "q_bias")},
               "key": {"kernel": wk, "bias": np.zeros((H,), np.float32)},
               "value": {"kernel": wv, "bias": t.get(prefix + "v_bias")}}
        if rel and "c2p" in cfg.pos_att_type:
            out["pos_proj"] = t.linear(prefix + "pos_proj", bias=False)
        if rel and "p2c" in cfg.pos_att_type:
            out["pos_q_proj"] = t.linear(prefix + "pos_q_proj")
        return out
    out = {n: t.linear(prefix + f"{n}_proj") for n in ("query", "key", "value")}
    if rel and not cfg.share_att_key:
        if "c2p" in cfg.pos_att_type:
            out["pos_key_proj"] = t.linear(prefix + "pos_key_proj")
        if "p2c" in cfg.pos_att_type:
            out["pos_query_proj"] = t.linear(prefix + "pos_query_proj")
    return out


def convert_layer(t: Tensors, cfg: EncoderConfig, i: int) -> dict:
    """HF ``encoder.layer.{i}`` -> :class:`hfl_jax.models.layers.Block` parameters."""
    return convert_block(t, i, _convert_attention(t, cfg, f"encoder.layer.{i}.attention.self."))


def convert_base(t: Tensors, cfg: EncoderConfig) -> dict:
    """Embeddings, encoder-level relative embeddings and stacked layers of a DeBERTa v1/v2 checkpoint."""
    _check_supported(cfg)
    e = "embeddings."
    emb = {"word": {"embedding": t.get(e + "word_embeddings.weight")}}
    if cfg.position_biased_input:
        emb["position"] = {"embedding": t.get(e + "position_embeddings.weight")}
    if cfg.type_vocab_size > 0:
        emb["token_type"] = {"embedding": t.get(e + "token_type_embeddings.weight")}
    if (cfg.embedding_size or cfg.hidden_size) != cfg.hidden_size:
        emb["embed_proj"] = t.linear(e + "embed_proj", bias=False)
    emb["ln"] = t.layer_norm(e + "LayerNorm")
    extras = {}
    if cfg.relative_attention:
        extras["rel_embeddings"] = t.get("encoder.rel_embeddings.weight")
        if _norm_rel_ebd(cfg):
            extras["rel_ln"] = t.layer_norm("encoder.LayerNorm")
    return {"embeddings": emb, "extras": extras,
            "layers": stack_layers(cfg.num_layers, lambda i: convert_layer(t, cfg, i))}


def convert_head(t: Tensors, cfg: EncoderConfig) -> dict | None:
    """``pooler`` and ``classifier`` of a ``*ForSequenceClassification`` checkpoint, or ``None``."""
    head = {}
    if t.has("pooler.dense.weight", base=False):
        head["pooler"] = t.linear("pooler.dense", base=False)
    if t.has("classifier.weight", base=False):
        head["classifier"] = t.linear("classifier", base=False)
    return head or None


DEBERTA = Family(DebertaEmbeddings, RelativeContext, DisentangledAttention, ContextPoolerHead,
                 convert_base, convert_head, packs=False)   # rel_pos is [T, T] over the row, not per sequence
register_family("deberta", DEBERTA)
register_family("deberta-v2", DEBERTA)
