"""Shared Flax building blocks: LoRA-aware dense layer, self-attention, transformer block.

Every encoder family (BERT, RoBERTa, DeBERTa v1/v2) uses :class:`Block`; the
families differ only in their embeddings, their attention variant and their
classification head, which live in the family modules.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hfl_jax.models.config import EncoderConfig

Array = jax.Array
LoRALayer = Mapping[str, Mapping[str, Array]]  # target -> {"A": [in, r], "B": [r, out]}

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    """Looks up a Hugging Face activation name (``hidden_act``)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


def dense_init(cfg: EncoderConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


class LoRADense(nn.Module):
    """``y = x W + b + scale * (x A) B``: a frozen dense layer with an optional LoRA delta.

    The LoRA factors are *inputs*, not parameters of this module: adapters are
    their own pytree and never live inside the frozen base parameters.
    ``compute_dtype`` (e.g. bfloat16) applies to the frozen ``x W`` product only;
    the LoRA path always runs in the input's dtype.
    """

    features: int
    kernel_init: Callable = nn.initializers.normal(0.02)
    use_bias: bool = True
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, lora: Mapping[str, Array] | None = None, scale: float = 1.0) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        if self.compute_dtype is not None and self.compute_dtype != x.dtype:
            y = jnp.dot(x.astype(self.compute_dtype), kernel.astype(self.compute_dtype),
                        preferred_element_type=jnp.float32).astype(x.dtype)
        else:
            y = x @ kernel
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        if lora is not None:
            y = y + ((x @ lora["A"]) @ lora["B"]) * scale
        return y


def layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] like PyTorch, not E[x^2]-mean^2.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


def split_heads(x: Array, num_heads: int) -> Array:
    """[B, T, H] -> [B, T, heads, H/heads]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def padding_bias(attention_mask: Array, dtype=jnp.float32) -> Array:
    """[B, T] {0,1} -> [B, 1, 1, T] additive bias: 0 on tokens, dtype-min on padding."""
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


class SelfAttention(nn.Module):
    """Scaled dot-product self-attention of BERT/RoBERTa. Returns the merged
    context ``[B, T, H]`` before the attention output projection."""

    cfg: EncoderConfig
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, h: Array, ctx: Mapping[str, Array], lora: LoRALayer, scale: float) -> Array:
        cfg = self.cfg
        proj = lambda name: LoRADense(cfg.hidden_size, dense_init(cfg), compute_dtype=self.compute_dtype,
                                      name=name)(h, lora.get(name), scale)
        q, k, v = (split_heads(proj(n), cfg.num_heads) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(cfg.head_dim, h.dtype))
        probs = jax.nn.softmax(scores + ctx["mask_bias"], axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return out.reshape(*out.shape[:2], cfg.hidden_size)


class Block(nn.Module):
    """One post-LayerNorm transformer layer, shared by all families.

    ``lora`` maps target names (``query``, ``key``, ``value``,
    ``attention_output``, ``intermediate``, ``output``) to this layer's LoRA
    factors; absent targets are not adapted.
    """

    cfg: EncoderConfig
    attention_cls: type[nn.Module] = SelfAttention
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, h: Array, ctx: Mapping[str, Any], lora: LoRALayer, scale: float) -> Array:
        cfg = self.cfg
        dense = lambda feats, name, x: LoRADense(feats, dense_init(cfg), compute_dtype=self.compute_dtype,
                                                 name=name)(x, lora.get(name), scale)
        context = self.attention_cls(cfg, compute_dtype=self.compute_dtype, name="attention")(h, ctx, lora, scale)
        h = layer_norm(cfg, "attention_ln")(dense(cfg.hidden_size, "attention_output", context) + h)
        inter = activation(cfg.hidden_act)(dense(cfg.intermediate_size, "intermediate", h))
        return layer_norm(cfg, "output_ln")(dense(cfg.hidden_size, "output", inter) + h)
