"""Decoder-only language models (Llama, Qwen2, Mistral): config, pure-functional model, checkpoints.

Parameters are a plain nested dict (every layer leaf stacked on a leading axis ``[L, ...]``)::

    params = {
        "embeddings": {"embedding": [V, H]},
        "layers": {
            "input_layernorm": {"scale": [L, H]},
            "q_proj": {"kernel": [L, H, nh*hd], "bias"?: [L, nh*hd]},
            "k_proj", "v_proj": {"kernel": [L, H, kvh*hd], "bias"?},
            "o_proj": {"kernel": [L, nh*hd, H], "bias"?},
            "post_attention_layernorm": {"scale": [L, H]},
            "gate_proj", "up_proj": {"kernel": [L, H, I]}, "down_proj": {"kernel": [L, I, H]},
        },
        "final_norm": {"scale": [H]},
        "lm_head": {"kernel": [H, V]},      # absent when the embeddings are tied
    }

Kernels are ``[in, out]`` (the torch ``weight.T``) inside :class:`~hfl_jax.models.layers.LoRADense`,
so LoRA (``{target: {"A": [L, in, r], "B": [L, r, out]}}``, targets :data:`DECODER_TARGETS`) applies
exactly as for the encoders; there is no trainable head.

Masks. Token ``i`` of a row attends to token ``j`` iff ``j <= i``, ``j`` is not padding
(``attention_mask``; padded queries keep finite, unused outputs), and, on a sliding-window layer,
``i - j < sliding_window`` (transformers' ``kv_idx > q_idx - sliding_window``, on slot indices).
Packed rows (``segment_ids`` ``[R, Lp]``, 0 = padding): ``j <= i`` within the same segment > 0.

Positions. Default ``cumsum(attention_mask) - 1`` clipped at 0: HF's ``arange`` on every real
token of a right-padded row, and HF ``generate``'s positions on a left-padded one. Packed rows pass
``position_ids`` (restarting per sequence). RoPE: :mod:`hfl_jax.models.rope`.

Depth. As :class:`~hfl_jax.models.encoder.EncoderModel`: a static depth ``d`` runs the bottom
``L - d`` layers under ``stop_gradient`` (no backward pass through them); a traced depth runs one
scan and cuts the gradient at layer ``L - d``'s input (another ``layer_policy``: at the lowest
trained layer's); ``start_layer``/``hidden0`` restart from cached hidden states
(:meth:`DecoderModel.bottom_hidden`).

Precision (``compute_dtype``, :mod:`hfl_jax.models.precision`): matmul inputs, q/k/v, the KV cache
and the stored dense outputs in that dtype with float32 accumulation; RMSNorm (computed in float32
like HF), the residual stream, RoPE, scores, softmax, SiLU arithmetic and the logits in float32.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.models import rope as rope_lib
from hfl_jax.models.config import SUPPORTED_MODEL_TYPES as ENCODER_MODEL_TYPES
from hfl_jax.models.config import ConfigError
from hfl_jax.models.convert import CheckpointError
from hfl_jax.models.layers import ATTENTION_IMPLS, LoRADense, activation, dense_init, mixed_einsum
from hfl_jax.models.lora import LoRA, check_layer_policy, depth_cut, resolve_depth
from hfl_jax.models.precision import remat_policy

Array = jax.Array
Params = dict[str, Any]

DECODER_MODEL_TYPES = ("llama", "qwen2", "mistral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# target -> path of its kernel's parent inside one layer's parameters (for merge_lora(..., paths=...))
DECODER_TARGET_PATHS = {t: (t,) for t in DECODER_TARGETS}
_FULL = 2 ** 30   # "window" of a full-attention layer


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a Llama-style decoder (one Hugging Face ``config.json``).

    ``num_layers``/``num_heads``/``num_kv_heads`` are ``num_hidden_layers``/``num_attention_heads``/
    ``num_key_value_heads``. ``rope``: :func:`hfl_jax.models.rope.rope_spec`. ``attention_bias``:
    biases on q/k/v (and, for llama, o: transformers' ``attention_bias``; qwen2 always has q/k/v
    biases and no o bias). ``sliding_window``: the window of the layers flagged in
    ``sliding_layers`` (``None``: all layers), or ``None`` when no layer has one.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: tuple = rope_lib.default_rope()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None
    hidden_act: str = "silu"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.model_type not in DECODER_MODEL_TYPES:
            raise ConfigError(f"unknown decoder model_type {self.model_type!r}; one of {DECODER_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
            raise ConfigError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        activation(self.hidden_act)

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type == "llama"

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer: its sliding window, or ``None`` for full causal attention."""
        flags = self.sliding_layers or (True,) * self.num_layers
        return tuple(self.sliding_window if f else None for f in flags)

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The LoRA target names (the checkpoint's module names)."""
        return DECODER_TARGETS

    @property
    def position_offset(self) -> int:
        """The position id of a sequence's first token: 0 (RoPE positions count from 0)."""
        return 0

    @property
    def cost_model(self):
        """This family's cost model for :mod:`hfl_jax.fed.timemodel` (:mod:`hfl_jax.models.decoder_cost`)."""
        from hfl_jax.models import decoder_cost
        return decoder_cost

    def lora_target_dims(self, target: str) -> tuple[int, int]:
        """``(in, out)`` features of a LoRA target projection."""
        H, I, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        dims = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
                "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
        if target not in dims:
            raise ValueError(f"unknown decoder LoRA target {target!r}; one of {DECODER_TARGETS}")
        return dims[target]

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "DecoderConfig":
        """Builds the config from a ``config.json`` dict (transformers-4 or -5 layout).

        Raises :class:`ConfigError` (naming ``config.json`` and the key) for an unsupported
        ``model_type``, ``architectures`` entry, rope type or ``hidden_act``."""
        mt = hf.get("model_type")
        if mt not in DECODER_MODEL_TYPES:
            raise ConfigError(f"config.json: unsupported decoder model_type {mt!r} (key 'model_type'); "
                              f"hfl_jax supports {', '.join(DECODER_MODEL_TYPES)}")
        archs = hf.get("architectures") or []
        bad = [a for a in archs if a != ARCHITECTURES[mt]]
        if bad:
            raise ConfigError(f"config.json: unsupported architectures {archs} (key 'architectures'); "
                              f"a {mt} checkpoint must be {ARCHITECTURES[mt]}")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"config.json: unsupported hidden_act {act!r} (key 'hidden_act'); decoders use silu")
        L, heads = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
        layer_types = tuple(hf.get("layer_types") or ())
        window, sliding_layers = None, None
        if mt == "mistral":
            window = hf.get("sliding_window", 4096)
        elif mt == "qwen2":
            window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
            if window is not None:
                layer_types = layer_types or tuple(
                    "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
                    for i in range(L))
                sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
                if not any(sliding_layers):
                    window, sliding_layers = None, None
        token_defaults = (None, None) if mt == "qwen2" else (1, 2)   # transformers' class defaults (bos, eos)
        eos = hf.get("eos_token_id", token_defaults[1])
        return cls(
            model_type=mt, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]), num_layers=L,
            num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            intermediate_size=int(hf["intermediate_size"]), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings",
                                               {"llama": 2048, "qwen2": 32768, "mistral": 131072}[mt])),
            rope=rope_lib.rope_spec(hf, layer_types), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if mt == "qwen2" else bool(mt == "llama" and hf.get("attention_bias", False)),
            mlp_bias=bool(mt == "llama" and hf.get("mlp_bias", False)),
            sliding_window=None if window is None else int(window), sliding_layers=sliding_layers,
            hidden_act=act, pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id", token_defaults[0]),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            initializer_range=float(hf.get("initializer_range", 0.02)))


def is_decoder_config(hf: Mapping[str, Any]) -> bool:
    """Whether ``load_pretrained`` takes the decoder path for this ``config.json``: a decoder
    ``model_type``, or a non-encoder one whose ``architectures`` name a causal LM."""
    mt = hf.get("model_type")
    if mt in ENCODER_MODEL_TYPES:
        return False
    return mt in DECODER_MODEL_TYPES or any(
        str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in hf.get("architectures") or ())


# Real checkpoints' config.json (transformers-4 layout, as stored on the hub), as shapes for users and
# tests (the tests build random models at these widths with fewer layers and a smaller vocabulary).
DECODER_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {   # HuggingFaceTB/SmolLM2-135M
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu",
        "hidden_size": 576, "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
        "max_position_embeddings": 8192, "mlp_bias": False, "num_attention_heads": 9, "num_hidden_layers": 30,
        "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 49152},
    "qwen2.5-0.5b": {   # Qwen/Qwen2.5-0.5B
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
        "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
        "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "llama-3.2-1b": {   # meta-llama/Llama-3.2-1B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
        "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256},
    "mistral-7b": {   # mistralai/Mistral-7B-v0.1
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000},
}


class RMSNorm(nn.Module):
    """``weight * x * rsqrt(mean(x^2) + eps)`` in float32 (HF's LlamaRMSNorm); float32 output."""

    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x = x.astype(jnp.float32)
        return scale * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))


def attention(q: Array, k: Array, v: Array, allowed: Array) -> Array:
    """Grouped-query attention. ``q`` ``[B, Tq, nh, hd]``, ``k, v`` ``[B, S, kvh, hd]``, ``allowed``
    ``[B, Tq, S]`` bool -> ``[B, Tq, nh * hd]`` in ``v``'s dtype. Query head ``h`` reads kv head
    ``h // (nh / kvh)`` (transformers' ``repeat_kv``); scores and softmax in float32."""
    B, Tq, nh, hd = q.shape
    kvh = k.shape[2]
    qg = q.reshape(B, Tq, kvh, nh // kvh, hd)
    scores = mixed_einsum("bqkgd,bskd->bkgqs", qg, k) * (hd ** -0.5)
    # where, not an additive bias: a fully masked row (a left-padding query) stays finite
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = mixed_einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(B, Tq, nh * hd).astype(v.dtype)


class DecoderBlock(nn.Module):
    """One pre-RMSNorm decoder layer: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``.

    ``ctx``: ``cos, sin`` ``[B, Tq, hd]``, ``allowed`` ``[B, Tq, S]`` (causal + padding/segments),
    ``dist`` ``[Tq, S]`` slot distance ``i - j``; ``window``: this layer's window (int, ``_FULL``
    for none). ``cache`` ``(k, v, index)`` (``[B, S, kvh, hd]``, int): write this step's keys and
    values at slot ``index`` and attend over the whole cache; returns ``(h, (k, v))``.
    """

    cfg: DecoderConfig
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, h, ctx, lora, scale, window, cache=None):
        cfg, cd = self.cfg, self.compute_dtype
        f32 = lambda x: x.astype(jnp.float32)

        def dense(feats, name, x, bias):
            return LoRADense(feats, dense_init(cfg), use_bias=bias, compute_dtype=cd, name=name)(
                x, lora.get(name), scale)
        B, T = h.shape[:2]
        x = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(h)
        q = dense(cfg.num_heads * cfg.head_dim, "q_proj", x, cfg.qkv_bias).reshape(B, T, cfg.num_heads, -1)
        k = dense(cfg.num_kv_heads * cfg.head_dim, "k_proj", x, cfg.qkv_bias).reshape(B, T, cfg.num_kv_heads, -1)
        v = dense(cfg.num_kv_heads * cfg.head_dim, "v_proj", x, cfg.qkv_bias).reshape(B, T, cfg.num_kv_heads, -1)
        q = rope_lib.apply_rope(q, ctx["cos"], ctx["sin"]).astype(v.dtype)
        k = rope_lib.apply_rope(k, ctx["cos"], ctx["sin"]).astype(v.dtype)
        if cache is not None:
            kc, vc, index = cache
            kc = jax.lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, index, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, index, 0, 0))
            k, v = kc, vc
        allowed = ctx["allowed"] & (ctx["dist"] < window)[None]
        h = h + f32(dense(cfg.hidden_size, "o_proj", attention(q, k, v, allowed), cfg.o_bias))
        x = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(h)
        gate = dense(cfg.intermediate_size, "gate_proj", x, cfg.mlp_bias)
        up = dense(cfg.intermediate_size, "up_proj", x, cfg.mlp_bias)
        act = activation(cfg.hidden_act)
        glu = lambda g, u: (act(f32(g)) * f32(u)).astype(g.dtype)
        # under a compute dtype: float32 arithmetic, only the 16-bit inputs kept for the backward pass
        inter = glu(gate, up) if gate.dtype == jnp.float32 else jax.checkpoint(glu)(gate, up)
        h = h + f32(dense(cfg.hidden_size, "down_proj", inter, cfg.mlp_bias))
        return h, (None if cache is None else (k, v))


def _slice_layers(tree, start: int, stop: int):
    return jax.tree.map(lambda x: x[start:stop], tree)


@dataclasses.dataclass(frozen=True)
class DecoderModel:
    """A stateless decoder-only LM with EncoderModel's calling convention. Hashable (static argument).

    ``compute_dtype``: mixed precision (module doc; ``None``: float32). ``unroll``: the layer scan's
    unroll. ``remat``: :data:`hfl_jax.models.precision.REMAT_POLICIES` on the trained layers.
    ``attention``: accepted for interface compatibility (validated); decoders always use the einsum
    grouped-query path. ``layer_policy``: which layers a fine-tuning depth trains, as
    :attr:`EncoderModel.layer_policy <hfl_jax.models.encoder.EncoderModel>`.
    """

    cfg: DecoderConfig
    compute_dtype: Any = None
    unroll: int | bool = 1
    remat: str = "none"
    attention: str = "auto"
    layer_policy: str = "top"

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {self.attention!r}; one of {ATTENTION_IMPLS}")
        remat_policy(self.remat)
        check_layer_policy(self.layer_policy)

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def packs(self) -> bool:
        """Decoders take packed rows (``position_ids``, ``segment_ids``)."""
        return True

    @property
    def is_decoder(self) -> bool:
        """Next-token logits ``[B, T, V]``, no classification head (an engine picks the causal-LM objective)."""
        return True

    def _block(self) -> DecoderBlock:
        return DecoderBlock(self.cfg, compute_dtype=self.compute_dtype)

    def init(self, rng: Array, seq_len: int = 8) -> Params:
        """Random parameters: normal(0, initializer_range) matrices, RMSNorm scales 1, layers stacked."""
        cfg = self.cfg
        k_emb, k_layers, k_head = jax.random.split(rng, 3)
        init = dense_init(cfg)
        h = jnp.zeros((1, seq_len, cfg.hidden_size), jnp.float32)
        ctx = self._context(jnp.ones((1, seq_len), jnp.int32))
        block = self._block()
        p_layers = jax.vmap(lambda k: block.init(k, h, ctx, {}, 1.0, _FULL)["params"])(
            jax.random.split(k_layers, cfg.num_layers))
        params = {"embeddings": {"embedding": init(k_emb, (cfg.vocab_size, cfg.hidden_size))},
                  "layers": dict(p_layers), "final_norm": {"scale": jnp.ones((cfg.hidden_size,), jnp.float32)}}
        if not cfg.tie_word_embeddings:
            params["lm_head"] = {"kernel": init(k_head, (cfg.hidden_size, cfg.vocab_size))}
        return params

    def _context(self, attention_mask, position_ids=None, segment_ids=None, *, key_mask=None, index=None):
        """Per-forward tensors shared by every layer (:class:`DecoderBlock`). ``key_mask`` ``[B, S]``
        and ``index``: cached decoding, queries at slots ``index + arange(Tq)`` over ``S`` slots."""
        cfg = self.cfg
        if segment_ids is not None:
            valid = segment_ids > 0
            T = segment_ids.shape[1]
            same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & valid[:, None, :]
            q_slot, k_slot = jnp.arange(T), jnp.arange(T)
            allowed = same & (k_slot[None, :] <= q_slot[:, None])[None]
        else:
            T = attention_mask.shape[1]
            keys = attention_mask if key_mask is None else key_mask
            q_slot = jnp.arange(T) + (0 if index is None else index)
            k_slot = jnp.arange(keys.shape[1])
            allowed = (keys[:, None, :] > 0) & (k_slot[None, :] <= q_slot[:, None])[None]
        if position_ids is None:
            position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        cos, sin = rope_lib.cos_sin(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, position_ids)
        return {"cos": cos, "sin": sin, "allowed": allowed, "dist": q_slot[:, None] - k_slot[None, :]}

    def _windows(self) -> Array:
        return jnp.asarray([_FULL if w is None else w for w in self.cfg.layer_windows], jnp.int32)

    def _run_layers(self, params, h, ctx, lora, start, stop, remat="none", cut=None, cache=None):
        """Layers ``[start, stop)`` as one ``lax.scan`` (the encoder's, plus per-layer windows and an
        optional KV cache ``(k [L, B, S, kvh, hd], v, index)``, returned updated)."""
        if stop <= start:
            return h, None
        block = self._block()
        weights = lora.weights if lora is not None else {}
        scale = lora.scale if lora is not None else 1.0

        def layer(p, h, l, w, c):
            return block.apply({"params": p}, h, ctx, l, scale, w, c)
        unroll = self.unroll
        if remat != "none":
            layer = jax.checkpoint(layer, policy=remat_policy(remat))
            unroll = 1

        def body(h, xs):
            p, l, w, i, c = xs
            if cut is not None:
                h = jnp.where(i == cut, jax.lax.stop_gradient(h), h)
            c = None if c is None else (*c, cache[2])
            return layer(p, h, l, w, c)
        xs = (_slice_layers(params["layers"], start, stop), _slice_layers(weights, start, stop),
              self._windows()[start:stop], jnp.arange(start, stop),
              None if cache is None else _slice_layers(cache[:2], start, stop))
        h, kv = jax.lax.scan(body, h, xs, unroll=unroll)
        return h, kv

    def hidden_states(self, params: Params, input_ids: Array, attention_mask: Array,
                      token_type_ids: Array | None = None, lora: LoRA | None = None,
                      depth: int | None = None, *, start_layer: int = 0, hidden0: Array | None = None,
                      position_ids: Array | None = None, segment_ids: Array | None = None) -> Array:
        """Output of the last layer ``[B, T, H]`` float32, before the final norm.

        ``input_ids, attention_mask`` ``[B, T]`` (``token_type_ids`` ignored). ``position_ids``
        ``[B, T]`` overrides the default positions; with ``segment_ids`` ``[R, Lp]`` (packed rows,
        0 = padding) the mask is per segment and ``attention_mask`` only feeds the default positions.
        ``depth``, ``start_layer``, ``hidden0``: exactly :meth:`EncoderModel.hidden_states`' semantics.
        """
        L = self.cfg.num_layers
        depth, start_layer = resolve_depth(L, depth, start_layer, hidden0, self.layer_policy)
        if segment_ids is not None and position_ids is None:
            raise ValueError("packed rows need position_ids with segment_ids")
        mask = attention_mask if segment_ids is None else (segment_ids > 0).astype(jnp.int32)
        ctx = self._context(mask, position_ids, segment_ids)
        h = self._embed(params, input_ids) if hidden0 is None else hidden0
        run = lambda h, start, stop, **kw: self._run_layers(params, h, ctx, lora, start, stop, **kw)[0]
        return depth_cut(run, h, L, depth, start_layer, self.remat, self.layer_policy)

    def bottom_hidden(self, params: Params, input_ids: Array, attention_mask: Array,
                      token_type_ids: Array | None = None, *, stop_layer: int) -> Array:
        """Hidden states ``[B, T, H]`` after the bottom ``stop_layer`` layers, without LoRA (feed back
        as ``hidden0`` with ``start_layer=stop_layer``; see EncoderModel.bottom_hidden)."""
        if not 0 <= int(stop_layer) <= self.cfg.num_layers:
            raise ValueError(f"stop_layer must be in [0, {self.cfg.num_layers}], got {stop_layer}")
        ctx = self._context(attention_mask)
        return self._run_layers(params, self._embed(params, input_ids), ctx, None, 0, int(stop_layer))[0]

    def _embed(self, params, input_ids):
        return jnp.take(params["embeddings"]["embedding"], input_ids, axis=0).astype(jnp.float32)

    def logits(self, params: Params, hidden: Array) -> Array:
        """Final RMSNorm then the LM head (or the tied embedding transposed): ``[..., H] -> [..., V]`` float32."""
        x = RMSNorm(self.cfg.rms_norm_eps).apply({"params": params["final_norm"]}, hidden)
        if self.cfg.tie_word_embeddings:
            return jnp.einsum("...h,vh->...v", x, params["embeddings"]["embedding"])
        return x @ params["lm_head"]["kernel"]

    def apply(self, params: Params, input_ids: Array, attention_mask: Array,
              token_type_ids: Array | None = None, lora: LoRA | None = None, *,
              depth: int | None = None, return_hidden: bool = False, start_layer: int = 0,
              hidden0: Array | None = None, position_ids: Array | None = None,
              segment_ids: Array | None = None):
        """Next-token logits ``[B, T, V]`` float32 (and the hidden states ``[B, T, H]`` if
        ``return_hidden``). Arguments as :meth:`hidden_states`."""
        hidden = self.hidden_states(params, input_ids, attention_mask, token_type_ids, lora, depth,
                                    start_layer=start_layer, hidden0=hidden0, position_ids=position_ids,
                                    segment_ids=segment_ids)
        logits = self.logits(params, hidden)
        return (logits, hidden) if return_hidden else logits

    def cached_logits(self, params: Params, lora: LoRA | None, input_ids: Array, position_ids: Array,
                      cache: tuple[Array, Array], key_mask: Array, index) -> tuple[Array, tuple[Array, Array]]:
        """One prefill or decode step over a preallocated KV cache (:mod:`hfl_jax.models.generate`).

        ``input_ids, position_ids`` ``[B, t]`` at slots ``index + arange(t)``; ``cache`` ``(k, v)`` each
        ``[L, B, S, kvh, hd]``; ``key_mask`` ``[B, S]`` (1 on real tokens). Returns the last position's
        logits ``[B, V]`` float32 and the updated cache."""
        ctx = self._context(jnp.ones_like(input_ids), position_ids, key_mask=key_mask, index=index)
        h, kv = self._run_layers(params, self._embed(params, input_ids), ctx, lora, 0, self.cfg.num_layers,
                                 cache=(*cache, index))
        return self.logits(params, h[:, -1]), kv

    def init_cache(self, batch: int, slots: int) -> tuple[Array, Array]:
        """Zero KV cache ``(k, v)``, each ``[L, batch, slots, kvh, hd]`` in the compute dtype."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return jnp.zeros(shape, self.compute_dtype or jnp.float32), jnp.zeros(shape, self.compute_dtype or jnp.float32)


# ---------------------------------------------------------------- checkpoints

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_file(path: Path) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file as memory-mapped numpy arrays; bfloat16 through ``ml_dtypes`` (which
    ``safetensors.numpy`` cannot read, and hub decoders are stored in)."""
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        out[name] = data[lo:hi].view(dtype).reshape(info["shape"])
    return out


def read_decoder_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` or of the shards named by ``model.safetensors.index.json``."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return _read_file(single)
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(_read_file(model_dir / shard))
        return state
    raise CheckpointError(f"{model_dir} has no model.safetensors (nor model.safetensors.index.json)")


@jax.jit
def _kernel(w: Array) -> Array:
    return w.T.astype(jnp.float32)


def convert_decoder(state: Mapping[str, np.ndarray], model: DecoderModel, source: str = "checkpoint") -> Params:
    """HF ``*ForCausalLM`` state dict -> float32 params (module doc): torch ``[out, in]`` weights
    become ``[in, out]`` kernels. Raises :class:`CheckpointError` naming a missing or misshapen tensor.

    Each tensor goes to the device as stored (bf16 or float32) and is transposed and cast there, and
    the layers are stacked one parameter at a time (the peak is the model plus one stacked parameter).
    """
    cfg = model.cfg
    want = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    prefix = "model." if "model.embed_tokens.weight" in state else ""

    def get(name, shape, transpose=False):
        if name not in state:
            raise CheckpointError(f"missing tensor {name!r} in {source}")
        x = state[name]
        torch_shape = tuple(shape[::-1]) if transpose else tuple(shape)
        if tuple(x.shape) != torch_shape:
            raise CheckpointError(f"shape mismatch for tensor {name!r}: checkpoint {tuple(x.shape)}, "
                                  f"config expects {torch_shape}")
        x = jnp.array(x)   # a copy: never an alias of the memory-mapped file
        return _kernel(x) if transpose else x.astype(jnp.float32)

    hf_names = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
                **{n: f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{n: f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}}
    leaf_names = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    layers = {}
    for module, leaves in want["layers"].items():
        layers[module] = {}
        for leaf, spec in leaves.items():
            name = lambda i: f"{prefix}layers.{i}.{hf_names[module]}.{leaf_names[leaf]}"
            layers[module][leaf] = jnp.stack([get(name(i), spec.shape[1:], transpose=leaf == "kernel")
                                              for i in range(cfg.num_layers)])
    params = {"embeddings": {"embedding": get(f"{prefix}embed_tokens.weight", want["embeddings"]["embedding"].shape)},
              "layers": layers,
              "final_norm": {"scale": get(f"{prefix}norm.weight", want["final_norm"]["scale"].shape)}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", want["lm_head"]["kernel"].shape, transpose=True)}
    return params


def load_decoder(model_dir: Path, hf_config: Mapping[str, Any], *, compute_dtype=None):
    """``(DecoderModel, float32 params)`` from a checkpoint directory (``load_pretrained``'s decoder path)."""
    model = DecoderModel(DecoderConfig.from_hf(hf_config), compute_dtype=compute_dtype)
    return model, convert_decoder(read_decoder_tensors(model_dir), model, source=str(model_dir))
