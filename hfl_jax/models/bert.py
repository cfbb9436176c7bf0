"""BERT and RoBERTa: embeddings, classification heads and checkpoint conversion.

Heads match transformers' ``BertForSequenceClassification`` (pooler = dense+tanh
on the first token, then ``classifier``) and ``RobertaForSequenceClassification``
(``dense`` + tanh on the first token, then ``out_proj``). Dropout is omitted
(evaluation semantics; hfl_jax trains without dropout).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hfl_jax.models.config import EncoderConfig
from hfl_jax.models.convert import Tensors, stack_layers
from hfl_jax.models.layers import dense_init, layer_norm, padding_bias

Array = jax.Array


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm.

    RoBERTa numbers positions from ``pad_token_id + 1`` over non-padding tokens
    (``create_position_ids_from_input_ids`` in transformers). Explicit ``position_ids`` ``[B, T]``
    (packed rows) replace both numberings.
    """

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
                 position_ids: Array | None = None) -> Array:
        cfg = self.cfg
        emb = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=dense_init(cfg), name=name)
        if position_ids is not None:   # packed rows (hfl_jax.data.packing): positions restart per sequence
            positions = position_ids
        elif cfg.model_type == "roberta":
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
        else:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        h = (emb(cfg.vocab_size, "word")(input_ids)
             + emb(cfg.max_position_embeddings, "position")(positions)
             + emb(cfg.type_vocab_size, "token_type")(token_type_ids))
        return layer_norm(cfg, "ln")(h)


class PaddingContext(nn.Module):
    """Per-batch context shared by every layer: the additive padding bias ``mask_bias``
    ``[B, 1, 1, T]`` and the number of real tokens ``kv_len`` ``[B]`` int32 (at least 1; what
    cuDNN attention takes, exact for right-padded rows)."""

    cfg: EncoderConfig

    def __call__(self, attention_mask: Array, hidden: Array) -> dict[str, Any]:
        kv_len = jnp.maximum((attention_mask > 0).sum(-1), 1).astype(jnp.int32)
        return {"mask_bias": padding_bias(attention_mask, hidden.dtype), "kv_len": kv_len}


def packed_context(segment_ids: Array, dtype=jnp.float32) -> dict[str, Any]:
    """:class:`PaddingContext` of packed rows (``segment_ids`` ``[R, L]``, 0 = padding): a token sees
    only the tokens of its own sequence (``mask_bias`` ``[R, 1, L, L]``, block diagonal). ``kv_len``
    is the row length (cuDNN's key lengths cannot express it; packing refuses that kernel)."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    bias = jnp.where(same[:, None], 0.0, jnp.finfo(dtype).min).astype(dtype)
    return {"mask_bias": bias, "kv_len": jnp.full(segment_ids.shape[:1], segment_ids.shape[1], jnp.int32)}


class BertHead(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array) -> Array:
        init = dense_init(self.cfg)
        pooled = jnp.tanh(nn.Dense(self.cfg.hidden_size, kernel_init=init, name="pooler")(hidden[:, 0]))
        return nn.Dense(self.cfg.num_labels, kernel_init=init, name="classifier")(pooled)


class RobertaHead(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array) -> Array:
        init = dense_init(self.cfg)
        x = jnp.tanh(nn.Dense(self.cfg.hidden_size, kernel_init=init, name="dense")(hidden[:, 0]))
        return nn.Dense(self.cfg.num_labels, kernel_init=init, name="out_proj")(x)


def convert_block(t: Tensors, i: int, attention: dict) -> dict:
    """HF ``encoder.layer.{i}`` -> :class:`hfl_jax.models.layers.Block` parameters, given the
    family's already converted ``attention`` parameters (the only part that differs by family)."""
    p = f"encoder.layer.{i}."
    return {
        "attention": attention,
        "attention_output": t.linear(p + "attention.output.dense"),
        "attention_ln": t.layer_norm(p + "attention.output.LayerNorm"),
        "intermediate": t.linear(p + "intermediate.dense"),
        "output": t.linear(p + "output.dense"),
        "output_ln": t.layer_norm(p + "output.LayerNorm"),
    }


def convert_layer(t: Tensors, i: int) -> dict:
    """BERT/RoBERTa layer ``i``: separate query/key/value projections."""
    p = f"encoder.layer.{i}.attention.self."
    return convert_block(t, i, {n: t.linear(p + n) for n in ("query", "key", "value")})


def convert_base(t: Tensors, cfg: EncoderConfig) -> dict:
    """Embeddings and stacked layers of a BERT or RoBERTa checkpoint."""
    e = "embeddings."
    return {
        "embeddings": {
            "word": {"embedding": t.get(e + "word_embeddings.weight")},
            "position": {"embedding": t.get(e + "position_embeddings.weight")},
            "token_type": {"embedding": t.get(e + "token_type_embeddings.weight")},
            "ln": t.layer_norm(e + "LayerNorm"),
        },
        "extras": {},
        "layers": stack_layers(cfg.num_layers, lambda i: convert_layer(t, i)),
    }


def convert_head(t: Tensors, cfg: EncoderConfig) -> dict | None:
    """The sequence-classification head, or ``None`` when the checkpoint has none.

    A BERT checkpoint with a pooler but no classifier (e.g. a bare ``BertModel``)
    returns the pooler only; the loader initialises the classifier.
    """
    if cfg.model_type == "roberta":
        if not t.has("classifier.out_proj.weight", base=False):
            return None
        return {"dense": t.linear("classifier.dense", base=False),
                "out_proj": t.linear("classifier.out_proj", base=False)}
    head = {}
    if t.has("pooler.dense.weight"):
        head["pooler"] = t.linear("pooler.dense")
    if t.has("classifier.weight", base=False):
        head["classifier"] = t.linear("classifier", base=False)
    return head or None
