"""Flax encoders (BERT, RoBERTa, DeBERTa v1/v2), Hugging Face checkpoint import and LoRA."""
from hfl_jax.models.config import ConfigError, EncoderConfig
from hfl_jax.models.convert import CheckpointError
from hfl_jax.models.encoder import FAMILIES, EncoderModel, Family, register_family
from hfl_jax.models.hub import FreshHeadWarning, load_pretrained, resolve_model_dir
from hfl_jax.models.lora import (TARGETS, LoRA, LoRAConfig, depth_masked, init_lora, layer_mask,
                                 mask_layers, merge_lora)
from hfl_jax.models import deberta as _deberta  # noqa: F401  registers deberta / deberta-v2

__all__ = [
    "CheckpointError", "ConfigError", "EncoderConfig", "EncoderModel", "FAMILIES", "Family",
    "FreshHeadWarning", "LoRA", "LoRAConfig", "TARGETS", "depth_masked", "init_lora", "layer_mask",
    "load_pretrained", "mask_layers", "merge_lora", "register_family", "resolve_model_dir",
]
