"""Flax encoders (BERT, RoBERTa, DeBERTa v1/v2), decoders (Llama, Qwen2, Mistral), Hugging Face
checkpoint import and LoRA."""
from hfl_jax.models.config import ConfigError, EncoderConfig
from hfl_jax.models.convert import CheckpointError
from hfl_jax.models.decoder import (DECODER_SHAPES, DECODER_TARGET_PATHS, DECODER_TARGETS,
                                    DecoderConfig, DecoderModel)
from hfl_jax.models.encoder import FAMILIES, EncoderModel, Family, register_family
from hfl_jax.models.generate import greedy_generate, left_pad
from hfl_jax.models.hub import FreshHeadWarning, load_pretrained, resolve_model_dir
from hfl_jax.models.lora import (TARGETS, LoRA, LoRAConfig, depth_masked, init_lora, layer_mask,
                                 mask_layers, merge_lora)
from hfl_jax.models import deberta as _deberta  # noqa: F401  registers deberta / deberta-v2

__all__ = [
    "CheckpointError", "ConfigError", "DECODER_SHAPES", "DECODER_TARGETS", "DECODER_TARGET_PATHS",
    "DecoderConfig", "DecoderModel", "EncoderConfig", "EncoderModel", "FAMILIES", "Family",
    "FreshHeadWarning", "LoRA", "LoRAConfig", "TARGETS", "depth_masked", "greedy_generate", "init_lora", "layer_mask",
    "left_pad", "load_pretrained", "mask_layers", "merge_lora", "register_family", "resolve_model_dir",
]
