"""The encoder model: families, parameter layout, and the depth-aware forward pass.

Parameters are a plain nested dict::

    params = {
        "embeddings": {...},   # family-specific
        "extras":     {...},   # encoder-level tensors shared by all layers (DeBERTa's relative embeddings)
        "layers":     {...},   # one Block's tree, every leaf stacked on a leading axis [L, ...]
        "head":       {...},   # sequence-classification head (trainable)
    }

The layer loop is a ``lax.scan`` over the stacked axis, so a fine-tuning depth
``d`` is a static slice: the bottom ``L - d`` layers run under
``lax.stop_gradient`` (no backward pass through them at all) and the top ``d``
layers run with gradients. A traced ``d`` (one compiled program for every depth,
``train.depth_program: shared``) runs all layers in one scan and cuts the gradient
at the input of layer ``L - d`` instead: the same values, the backward pass of the
frozen layers computed (zeros) and discarded. With another ``layer_policy``
(:func:`hfl_jax.models.lora.layer_mask`: ``bottom``, ``spread``) the cut is at the lowest
trained layer instead of ``L - d``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from hfl_jax.models import bert
from hfl_jax.models.config import EncoderConfig
from hfl_jax.models.layers import ATTENTION_IMPLS, Block, SelfAttention
from hfl_jax.models.lora import LoRA, check_layer_policy, depth_cut, resolve_depth
from hfl_jax.models.precision import remat_policy

Array = jax.Array
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    """What distinguishes one encoder family from another.

    embeddings(cfg)(input_ids, token_type_ids, attention_mask) -> [B, T, H]
    context(cfg)(attention_mask, hidden) -> pytree passed to every layer
    attention(cfg)(h, ctx, lora_layer, scale) -> [B, T, H] context before the output projection
    head(cfg)(hidden, attention_mask) -> [B, num_labels]
    convert_base(tensors, cfg) -> params without "head"; convert_head(tensors, cfg) -> head or None
    packs: whether the family takes packed rows (:mod:`hfl_jax.data.packing`: several sequences per
      row, positions restarting per sequence, attention block-diagonal within a row); DeBERTa's
      relative positions do not
    """

    embeddings: type[nn.Module]
    context: type[nn.Module]
    attention: type[nn.Module]
    head: type[nn.Module]
    convert_base: Callable
    convert_head: Callable
    packs: bool = False


FAMILIES: dict[str, Family] = {
    "bert": Family(bert.BertEmbeddings, bert.PaddingContext, SelfAttention, bert.BertHead,
                   bert.convert_base, bert.convert_head, packs=True),
    "roberta": Family(bert.BertEmbeddings, bert.PaddingContext, SelfAttention, bert.RobertaHead,
                      bert.convert_base, bert.convert_head, packs=True),
}


def register_family(model_type: str, family: Family) -> None:
    """Adds an encoder family (used by :mod:`hfl_jax.models.deberta`)."""
    FAMILIES[model_type] = family


def family_of(cfg: EncoderConfig) -> Family:
    try:
        return FAMILIES[cfg.model_type]
    except KeyError:
        raise ValueError(f"no encoder family registered for model_type {cfg.model_type!r}") from None


def _slice_layers(tree, start: int, stop: int):
    return jax.tree.map(lambda x: x[start:stop], tree)


@dataclasses.dataclass(frozen=True)
class EncoderModel:
    """A stateless encoder + classification head. Hashable, so usable as a static argument.

    ``compute_dtype`` (e.g. ``jnp.bfloat16``): the mixed-precision policy of
    :mod:`hfl_jax.models.precision` (matmul inputs and stored activations in that dtype;
    parameters, LoRA, head, LayerNorm, softmax and loss float32). ``None``: float32.
    ``unroll`` is passed to the layer ``lax.scan``.
    ``attention``: BERT/RoBERTa attention kernel (:data:`hfl_jax.models.layers.ATTENTION_IMPLS`;
    ``"auto"``: cuDNN fused attention on a GPU in bf16, XLA's ``dot_product_attention`` on other
    GPU inputs, the einsum path on CPU).
    ``remat``: rematerialisation of the trained layers
    (:data:`hfl_jax.models.precision.REMAT_POLICIES`).
    ``layer_policy``: which ``depth`` layers a fine-tuning depth trains
    (:func:`hfl_jax.models.lora.layer_mask`; ``algorithm.layer_policy``): ``top``, ``bottom``, ``spread``.
    """

    cfg: EncoderConfig
    compute_dtype: Any = None
    unroll: int | bool = 1  # lax.scan unroll over layers; True unrolls fully (XLA cost analysis counts loops once)
    attention: str = "auto"
    remat: str = "none"
    layer_policy: str = "top"

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {self.attention!r}; one of {ATTENTION_IMPLS}")
        remat_policy(self.remat)  # validates the name
        check_layer_policy(self.layer_policy)

    @property
    def family(self) -> Family:
        return family_of(self.cfg)

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def packs(self) -> bool:
        """Whether :meth:`apply` takes packed rows (:mod:`hfl_jax.data.packing`): a family that packs
        (:attr:`Family.packs`: BERT/RoBERTa) with an attention kernel that takes the block-diagonal
        bias (not cuDNN's key lengths)."""
        from hfl_jax.models.layers import attention_impl
        return (self.family.packs
                and attention_impl(self.attention, self.compute_dtype or jnp.float32) != "cudnn")

    def _modules(self):
        f, cfg = self.family, self.cfg
        return (f.embeddings(cfg), f.context(cfg),
                Block(cfg, attention_cls=f.attention, compute_dtype=self.compute_dtype, attention=self.attention),
                f.head(cfg))

    def init(self, rng: Array, seq_len: int = 8) -> Params:
        """Random parameters (HF-style normal(0, initializer_range) init), layers stacked."""
        emb, ctx_mod, block, head = self._modules()
        k_emb, k_ctx, k_layers, k_head = jax.random.split(rng, 4)
        ids = jnp.zeros((1, seq_len), jnp.int32)
        mask = jnp.ones((1, seq_len), jnp.int32)
        p_emb = emb.init(k_emb, ids, ids, mask)
        h = emb.apply(p_emb, ids, ids, mask)
        p_ctx = ctx_mod.init(k_ctx, mask, h)
        ctx = ctx_mod.apply(p_ctx, mask, h)
        p_layers = jax.vmap(lambda k: block.init(k, h, ctx, {}, 1.0))(
            jax.random.split(k_layers, self.cfg.num_layers))
        p_head = head.init(k_head, h, mask)
        get = lambda v: dict(v.get("params", {}))
        return {"embeddings": get(p_emb), "extras": get(p_ctx), "layers": get(p_layers), "head": get(p_head)}

    def init_head(self, rng: Array) -> Params:
        """A fresh classification head."""
        h = jnp.zeros((1, 1, self.cfg.hidden_size))
        return dict(self.family.head(self.cfg).init(rng, h, jnp.ones((1, 1), jnp.int32))["params"])

    def hidden_states(self, params: Params, input_ids: Array, attention_mask: Array,
                      token_type_ids: Array | None = None, lora: LoRA | None = None,
                      depth: int | None = None, *, start_layer: int = 0, hidden0: Array | None = None,
                      position_ids: Array | None = None, segment_ids: Array | None = None) -> Array:
        """Last hidden states ``[B, T, H]``.

        ``position_ids`` and ``segment_ids`` (``[B, T]``, both or neither): packed rows
        (:mod:`hfl_jax.data.packing`; :attr:`packs` models only), each token attending only to its
        own segment; ``attention_mask`` is then ignored.

        ``depth`` (static int, default all layers): only the layers from the lowest one
        :attr:`layer_policy` trains (``top``: the top ``depth``) up are differentiated; gradients
        stop at its input. A traced int32 scalar gives the same values and gradients from one
        program for every depth (module doc); it is not checked (the caller keeps the lowest
        trained layer at or above ``start_layer``).

        ``hidden0`` (``[B, T, H]``, optional) with ``start_layer`` (static int): start from
        these hidden states, taken as the output of layer ``start_layer - 1`` (e.g. from
        :meth:`bottom_hidden`), and run only layers ``[start_layer, L)``; the embeddings
        are skipped (``input_ids`` may then be ``None``). Needs ``start_layer`` at most the lowest
        trained layer (``top``: ``depth <= L - start_layer``).
        """
        emb, ctx_mod, block, _ = self._modules()
        L = self.cfg.num_layers
        depth, start_layer = resolve_depth(L, depth, start_layer, hidden0, self.layer_policy)
        if segment_ids is not None:
            if not self.packs or hidden0 is not None:
                raise ValueError(f"packed rows need a BERT/RoBERTa model without cuDNN attention and no "
                                 f"cached hidden states (model_type {self.cfg.model_type!r})")
            h = self._embed(params, input_ids, segment_ids > 0, token_type_ids, position_ids)
            ctx = bert.packed_context(segment_ids, h.dtype)
        else:
            h = self._embed(params, input_ids, attention_mask, token_type_ids) if hidden0 is None else hidden0
            ctx = ctx_mod.apply({"params": params["extras"]}, attention_mask, h)
        run = lambda h, start, stop, **kw: self._run_layers(params, h, ctx, lora, start, stop, **kw)
        return depth_cut(run, h, L, depth, start_layer, self.remat, self.layer_policy)

    def bottom_hidden(self, params: Params, input_ids: Array, attention_mask: Array,
                      token_type_ids: Array | None = None, *, stop_layer: int) -> Array:
        """Hidden states ``[B, T, H]`` after the bottom ``stop_layer`` layers, without LoRA.

        Equal to what :meth:`hidden_states` computes there whenever those layers'
        adapters are at their init (``B = 0``: the LoRA term is exactly zero), so it
        can be computed once and fed back as ``hidden0`` with ``start_layer=stop_layer``.
        """
        emb, ctx_mod, _, _ = self._modules()
        if not 0 <= int(stop_layer) <= self.cfg.num_layers:
            raise ValueError(f"stop_layer must be in [0, {self.cfg.num_layers}], got {stop_layer}")
        h = self._embed(params, input_ids, attention_mask, token_type_ids)
        ctx = ctx_mod.apply({"params": params["extras"]}, attention_mask, h)
        return self._run_layers(params, h, ctx, None, 0, int(stop_layer))

    def _embed(self, params, input_ids, attention_mask, token_type_ids, position_ids=None):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        extra = () if position_ids is None else (position_ids,)
        return self.family.embeddings(self.cfg).apply({"params": params["embeddings"]}, input_ids,
                                                      token_type_ids, attention_mask, *extra)

    def _run_layers(self, params, h, ctx, lora, start, stop, remat: str = "none", cut: Array | None = None):
        """Layers ``[start, stop)`` as a ``lax.scan`` over the stacked layer axis, each layer under
        ``jax.checkpoint`` with the ``remat`` policy (and then as a rolled scan) unless it is ``"none"``.
        ``cut`` (traced int): no gradient flows into layer ``cut``'s input, so none reaches the layers below."""
        if stop <= start:
            return h
        block = self._modules()[2]
        weights = lora.weights if lora is not None else {}
        scale = lora.scale if lora is not None else 1.0

        def layer(layer_params, h, layer_lora):
            return block.apply({"params": layer_params}, h, ctx, layer_lora, scale)
        unroll = self.unroll
        if remat != "none":
            layer = jax.checkpoint(layer, policy=remat_policy(remat))
            # A rolled scan: in unrolled straight-line code XLA schedules the recomputation next to
            # the forward pass and the saving is lost (XLA:CPU memory analysis, RESULTS.md).
            unroll = 1

        def body(h, xs):
            if cut is not None:
                layer_params, layer_lora, index = xs
                h = jnp.where(index == cut, jax.lax.stop_gradient(h), h)
            else:
                layer_params, layer_lora = xs
            return layer(layer_params, h, layer_lora), None
        xs = (_slice_layers(params["layers"], start, stop), _slice_layers(weights, start, stop))
        if cut is not None:
            xs += (jnp.arange(start, stop),)
        return jax.lax.scan(body, h, xs, unroll=unroll)[0]

    def apply(self, params: Params, input_ids: Array, attention_mask: Array,
              token_type_ids: Array | None = None, lora: LoRA | None = None, *,
              depth: int | None = None, return_hidden: bool = False,
              start_layer: int = 0, hidden0: Array | None = None, position_ids: Array | None = None,
              segment_ids: Array | None = None, slots: Array | None = None):
        """Classification logits ``[B, num_labels]`` (and hidden states if ``return_hidden``).

        Args:
          params: base parameters including ``"head"``.
          input_ids, attention_mask, token_type_ids: ``[B, T]`` int arrays.
          lora: optional :class:`~hfl_jax.models.lora.LoRA` adapters.
          depth: fine-tuning depth, static or traced; see :meth:`hidden_states`.
          start_layer, hidden0: start from cached hidden states; see :meth:`hidden_states`.
          position_ids, segment_ids ``[R, L]``, slots ``[S]``: packed rows (:mod:`hfl_jax.data.packing`);
            the logits are then ``[S, num_labels]``, one per sequence starting at flat index ``slots``.
        """
        hidden = self.hidden_states(params, input_ids, attention_mask, token_type_ids, lora, depth,
                                    start_layer=start_layer, hidden0=hidden0, position_ids=position_ids,
                                    segment_ids=segment_ids)
        if slots is not None:   # each sequence's first token, as the head's token 0
            first = hidden.reshape(-1, hidden.shape[-1])[slots][:, None, :]
            logits = self.family.head(self.cfg).apply({"params": params["head"]}, first,
                                                      jnp.ones(first.shape[:2], jnp.int32))
        else:
            logits = self.family.head(self.cfg).apply({"params": params["head"]}, hidden, attention_mask)
        return (logits, hidden) if return_hidden else logits
