"""Random models built from a few sizes (``model.name: tiny`` / ``tiny-decoder``): smoke runs and tests,
no download. The one registry of such names (:data:`TINY_MODELS`)."""
from __future__ import annotations

from typing import Any

from hfl_jax.models.config import EncoderConfig
from hfl_jax.models.decoder import DecoderConfig, DecoderModel
from hfl_jax.models.encoder import EncoderModel


def tiny_encoder(t: Any, *, max_length: int, num_labels: int = 2, vocab_size: int | None = None,
                 compute_dtype=None) -> EncoderModel:
    """A random BERT of ``t``'s sizes (``model.tiny``: hidden_size, num_layers, num_heads,
    intermediate_size, vocab_size) with a ``num_labels``-way head."""
    return EncoderModel(EncoderConfig(
        model_type="bert", vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_layers=t.num_layers,
        num_heads=t.num_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=max(512, max_length), num_labels=num_labels), compute_dtype=compute_dtype)


def tiny_decoder(t: Any, *, max_length: int, num_labels: int = 2, vocab_size: int | None = None,
                 compute_dtype=None) -> DecoderModel:
    """A random Llama-architecture decoder of ``t``'s sizes (``num_kv_heads`` default ``num_heads``),
    tied embeddings, ``vocab_size`` tokens (the run's tokenizer's; default ``t.vocab_size``)."""
    return DecoderModel(DecoderConfig(
        model_type="llama", vocab_size=int(vocab_size or t.vocab_size), hidden_size=t.hidden_size,
        num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=getattr(t, "num_kv_heads", None) or t.num_heads,
        head_dim=t.hidden_size // t.num_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=max(512, 2 * max_length), tie_word_embeddings=True), compute_dtype=compute_dtype)


#: model.name -> (builder, family model_type)
TINY_MODELS = {"tiny": (tiny_encoder, "bert"), "tiny-decoder": (tiny_decoder, "llama")}
