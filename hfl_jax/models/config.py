"""Typed encoder configuration, read from a Hugging Face ``config.json``."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from hfl_jax.errors import ConfigError   # noqa: F401  (re-exported: one class for every config error)
from hfl_jax.models import encoder_cost

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "deberta", "deberta-v2")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a BERT-style encoder (one Hugging Face ``config.json``).

    Field names follow transformers where they exist; ``num_layers`` and
    ``num_heads`` are ``num_hidden_layers`` and ``num_attention_heads``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    num_labels: int = 2
    initializer_range: float = 0.02
    # DeBERTa (v1 and v2/v3) specifics; ignored by bert/roberta.
    relative_attention: bool = False
    max_relative_positions: int = -1
    pos_att_type: tuple[str, ...] = ()
    position_biased_input: bool = True
    position_buckets: int = -1
    share_att_key: bool = False
    norm_rel_ebd: str = "none"
    conv_kernel_size: int = 0
    embedding_size: int | None = None
    pooler_hidden_size: int | None = None
    pooler_hidden_act: str = "gelu"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {self.model_type!r}; hfl_jax supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "num_labels"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        """The position id of a sequence's first token (RoBERTa counts from ``pad_token_id + 1``,
        the others from 0); packed rows (:mod:`hfl_jax.data.packing`) number positions from it."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The LoRA target names (``query key value attention_output intermediate output``)."""
        return encoder_cost.TARGET_NAMES

    @property
    def cost_model(self):
        """The encoders' cost model for :mod:`hfl_jax.fed.timemodel` (:mod:`hfl_jax.models.encoder_cost`)."""
        return encoder_cost

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], num_labels: int | None = None) -> "EncoderConfig":
        """Builds the config from a ``config.json`` dictionary."""
        if "model_type" not in hf:
            raise ConfigError("config.json has no 'model_type'")
        mt = hf["model_type"]
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {mt!r}; hfl_jax supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if num_labels is None:
            if "id2label" in hf and hf["id2label"]:
                num_labels = len(hf["id2label"])
            else:
                num_labels = int(hf.get("num_labels", 2))
        pos_att = hf.get("pos_att_type") or ()
        if isinstance(pos_att, str):
            pos_att = tuple(p.strip() for p in pos_att.lower().split("|") if p.strip())
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        eps_default = 1e-7 if mt.startswith("deberta") else 1e-12
        kw = dict(
            model_type=mt,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", defaults["type_vocab_size"]),
            layer_norm_eps=hf.get("layer_norm_eps", eps_default),
            hidden_act=hf.get("hidden_act", "gelu"),
            pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
            num_labels=num_labels,
            initializer_range=hf.get("initializer_range", 0.02),
            relative_attention=bool(hf.get("relative_attention", False)),
            max_relative_positions=hf.get("max_relative_positions", -1),
            pos_att_type=tuple(pos_att),
            position_biased_input=bool(hf.get("position_biased_input", True)),
            position_buckets=hf.get("position_buckets", -1),
            share_att_key=bool(hf.get("share_att_key", False)),
            norm_rel_ebd=str(hf.get("norm_rel_ebd", "none")),
            conv_kernel_size=int(hf.get("conv_kernel_size", 0) or 0),
            embedding_size=hf.get("embedding_size"),
            pooler_hidden_size=hf.get("pooler_hidden_size"),
            pooler_hidden_act=hf.get("pooler_hidden_act", "gelu"),
        )
        return cls(**kw)
