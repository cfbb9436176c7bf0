"""Which family a ``model_type`` belongs to, and the LoRA targets it offers (the one table the
config checks read)."""
from __future__ import annotations

from hfl_jax.models.config import SUPPORTED_MODEL_TYPES as ENCODER_MODEL_TYPES
from hfl_jax.models.decoder import DECODER_MODEL_TYPES, DECODER_TARGETS
from hfl_jax.models.lora import TARGETS as ENCODER_TARGETS

MODEL_TYPES = (*ENCODER_MODEL_TYPES, *DECODER_MODEL_TYPES)


def is_decoder_type(model_type: str) -> bool:
    """Whether ``model_type`` (a ``config.json``'s) is a decoder LLM family (Llama, Qwen2, Mistral)."""
    return model_type in DECODER_MODEL_TYPES


def lora_targets_of(model_type: str) -> tuple[str, ...]:
    """The LoRA target names of a family, as its checkpoints name the modules (decoders:
    ``q_proj ... down_proj``; encoders: ``query key value attention_output intermediate output``)."""
    return DECODER_TARGETS if is_decoder_type(model_type) else ENCODER_TARGETS
