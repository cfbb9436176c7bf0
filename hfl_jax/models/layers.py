"""Shared Flax building blocks: LoRA-aware dense layer, self-attention, transformer block.

Every encoder family (BERT, RoBERTa, DeBERTa v1/v2) uses :class:`Block`; the
families differ only in their embeddings, their attention variant and their
classification head, which live in the family modules.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

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
    """``normal(0, initializer_range)``. The barrier keeps XLA from folding the scale into the
    sampler's own constants when the initialization is compiled as one program, so a jitted
    ``EncoderModel.init`` gives the same bits as the op-by-op one."""
    stddev = cfg.initializer_range

    def init(key, shape, dtype=jnp.float32):
        return jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype)) * jnp.asarray(stddev, dtype)
    return init


@jax.custom_vjp
def frozen_dot(x: Array, kernel: Array, kernel_t: Array) -> Array:
    """``x @ kernel`` (float32 accumulation) for a *frozen* kernel whose transpose ``kernel_t``
    (``[out, in]``, a real contiguous array in ``x``'s dtype) is supplied: the backward pass computes
    the input gradient as ``g @ kernel_t`` with ``g`` cast to that dtype, both operands in the standard
    layout. XLA:CPU runs a bf16 x bf16 product at the AMX/AVX512-BF16 speed only in that layout;
    autodiff's ``g @ kernel.T`` with a float32 ``g`` runs at a fifth of it (``benchmarks/RESULTS.md``,
    issue 28). Only the input gradient is returned (the kernel is frozen: no weight gradient)."""
    return jnp.dot(x, kernel, preferred_element_type=jnp.float32)


def _frozen_dot_fwd(x, kernel, kernel_t):
    return frozen_dot(x, kernel, kernel_t), (kernel_t, jnp.zeros((0,), x.dtype))


def _frozen_dot_bwd(res, g):
    kernel_t, like = res
    dx = jnp.dot(g.astype(kernel_t.dtype), kernel_t, preferred_element_type=jnp.float32).astype(like.dtype)
    return dx, None, None


frozen_dot.defvjp(_frozen_dot_fwd, _frozen_dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x: Array, a: Array, b: Array, scale: float) -> Array:
    """``scale * (x A) B`` in ``x``'s dtype with float32 accumulation (``x A`` rounded to that dtype, as
    :class:`LoRADense` computes it), float32 out, with a backward pass that orders XLA:CPU's skinny
    products for speed: all in float32 (bf16 rank-r products run at a tenth of the float32 ones there),
    the token axis contracted with the rank-r operand on the left (``dA^T = dxa^T x``, ``[r, in]``, then
    transposed: 0.7 ms where autodiff's ``x^T dxa`` takes 6-12 ms at 4096 tokens; benchmarks/RESULTS.md,
    issue 28). Gradients are the float32 products of the same values (no bf16 rounding of ``dA``/``dB``)."""
    return _lora_delta_fwd(x, a, b, scale)[0]


def _lora_delta_fwd(x, a, b, scale):
    xa = jnp.dot(x, a.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.dot(xa, b.astype(x.dtype), preferred_element_type=jnp.float32) * scale, (x, xa, a, b)


def _lora_delta_bwd(scale, res, g):
    x, xa, a, b = res
    f32 = jnp.float32
    x2, xa2 = x.reshape(-1, x.shape[-1]), xa.reshape(-1, xa.shape[-1])
    g2 = g.reshape(-1, g.shape[-1]).astype(f32) * scale
    db = jnp.einsum("nr,nf->rf", xa2.astype(f32), g2)
    dxa = jnp.einsum("nf,rf->nr", g2, b.astype(f32))
    da = jnp.einsum("nr,nd->rd", dxa, x2.astype(f32)).T
    dx = jnp.einsum("nr,dr->nd", dxa, a.astype(f32)).astype(x.dtype).reshape(x.shape)
    return dx, da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def mixed_einsum(spec: str, a: Array, b: Array) -> Array:
    """``jnp.einsum(spec, a, b)`` with float32 accumulation and output, for the products of activations
    (attention scores and context). With float32 operands it is exactly that einsum. With 16-bit
    operands (a ``compute_dtype``) the backward pass rounds the float32 cotangent to the operands'
    dtype and computes both input gradients as 16-bit x 16-bit products with float32 accumulation,
    cast to the operands' dtype -- the precision ``torch.autocast`` gives a bf16 ``bmm``'s backward.
    Autodiff's own backward would promote the 16-bit operand to float32 and run both gradients as
    float32 products (on XLA:CPU at a fifth of the bf16 speed; benchmarks/RESULTS.md, issue 28).

    ``spec``: two operands, explicit output, every index of an operand present in the other operand
    or in the output (the gradient of each operand is then one einsum of the cotangent and the other)."""
    if a.dtype == jnp.float32 or b.dtype == jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _einsum16(_einsum_terms(spec), a, b)


@functools.lru_cache(maxsize=None)
def _einsum_terms(spec: str) -> tuple[str, str, str]:
    ins, arrow, out = spec.replace(" ", "").partition("->")
    terms = ins.split(",")
    if not arrow or len(terms) != 2:
        raise ValueError(f"mixed_einsum needs 'x,y->z' with two operands, got {spec!r}")
    x, y = terms
    for mine, other in ((x, y), (y, x)):
        lost = sorted(set(mine) - set(other) - set(out))
        if lost:
            raise ValueError(f"mixed_einsum {spec!r}: index {lost[0]!r} of {mine!r} is summed within one "
                             "operand (its gradient is not one einsum)")
    return x, y, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum16(terms: tuple[str, str, str], a: Array, b: Array) -> Array:
    x, y, z = terms
    return _batched_matmul(x, y, z, a, b)


def _einsum16_fwd(terms, a, b):
    return _einsum16(terms, a, b), (a, b)


def _einsum16_bwd(terms, res, g):
    x, y, z = terms
    a, b = res
    g = g.astype(a.dtype)
    da = _batched_matmul(z, y, x, g, b.astype(a.dtype))
    db = _batched_matmul(z, x, y, g.astype(b.dtype), a.astype(b.dtype))
    return da.astype(a.dtype), db.astype(b.dtype)


def _batched_matmul(x: str, y: str, z: str, a: Array, b: Array) -> Array:
    """``einsum(f"{x},{y}->{z}", a, b)`` (float32 accumulation and output) as one ``[n, m, k] x [n, k, p]``
    product: the operands transposed and reshaped to batch-leading, contraction-inner form. XLA:CPU takes
    16-bit x 16-bit -> float32 products to its fast library kernels in that form; in some other dimension
    orders it falls back to a kernel without that type ("Unsupported element type for DotThunk::Execute:
    BF16 x BF16 = F32", jaxlib 0.10)."""
    batch = [i for i in z if i in x and i in y]
    contract = [i for i in x if i in y and i not in z]
    free_x, free_y = [i for i in x if i not in y], [i for i in y if i not in x]
    size = {i: d for idx, arr in ((x, a), (y, b)) for i, d in zip(idx, arr.shape)}
    n = lambda ids: int(np.prod([size[i] for i in ids], dtype=np.int64))  # noqa: E731
    a3 = jnp.transpose(a, [x.index(i) for i in batch + free_x + contract]).reshape(n(batch), n(free_x), n(contract))
    b3 = jnp.transpose(b, [y.index(i) for i in batch + contract + free_y]).reshape(n(batch), n(contract), n(free_y))
    out = jax.lax.dot_general(a3, b3, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    order = batch + free_x + free_y
    out = out.reshape([size[i] for i in order])
    return jnp.transpose(out, [order.index(i) for i in z])


_einsum16.defvjp(_einsum16_fwd, _einsum16_bwd)


def transposed_kernels(layers: Mapping[str, Any], dtype) -> dict:
    """A copy of a stacked-layers parameter tree in which every ``kernel`` (``[L, in, out]``) gains a
    ``kernel_t``: ``[L, out, in]`` in ``dtype``, materialized (not a view XLA folds back into the
    product). :class:`LoRADense` then runs its frozen product's backward pass through
    :func:`frozen_dot`. Made once per run (the base never changes): memory + half the kernels' float32
    size; values and results unchanged up to the accumulation order of one product. Call it eagerly,
    outside ``jit`` (inside, XLA would fold the transpose back into the product)."""
    def walk(node):
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v) for k, v in node.items()}
        kernel = node.get("kernel")
        if kernel is not None and getattr(kernel, "ndim", 0) == 3:
            out["kernel_t"] = jnp.swapaxes(kernel, -1, -2).astype(dtype)   # eager: a real array
        return out
    return walk(layers)


def prepare_base(model, base: Mapping[str, Any]) -> Mapping[str, Any]:
    """The frozen base as a training round should receive it: under a 16-bit ``compute_dtype`` on
    XLA:CPU, :func:`transposed_kernels` of its stacked layers (the backward pass's input-gradient
    products at the CPU's native bf16 speed); otherwise ``base`` itself (float32, and GPUs/TPUs, whose
    libraries take a transposed operand at full speed). Call it eagerly, once per run."""
    cd = getattr(model, "compute_dtype", None)
    if (cd is None or jnp.dtype(cd) == jnp.float32 or jax.default_backend() != "cpu"
            or not isinstance(base.get("layers"), Mapping)):
        return base
    return {**base, "layers": transposed_kernels(base["layers"], cd)}


class LoRADense(nn.Module):
    """``y = x W + b + scale * (x A) B``: a frozen dense layer with an optional LoRA delta.

    The LoRA factors are *inputs*, not parameters of this module: adapters are
    their own pytree and never live inside the frozen base parameters.

    ``compute_dtype`` (e.g. bfloat16) is the mixed-precision policy of
    :mod:`hfl_jax.models.precision`: ``x``, ``W``, ``A`` and ``B`` enter their
    products in that dtype (float32 accumulation), the bias is added in float32 and
    the output (the activation stored for the backward pass) is returned in
    ``compute_dtype``; the float32 parameters and adapters are the masters, and
    their gradients come back in float32 through the casts. ``None``: all float32.

    The output is tagged ``"dense"`` and ``x A`` ``"lora_xa"`` for the
    rematerialisation policies (:data:`hfl_jax.models.precision.REMAT_POLICIES`).
    """

    features: int
    kernel_init: Callable = nn.initializers.normal(0.02)
    use_bias: bool = True
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, lora: Mapping[str, Array] | None = None, scale: float = 1.0) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        cd = self.compute_dtype
        if cd is None or jnp.dtype(cd) == jnp.float32:
            y = x @ kernel
            if bias is not None:
                y = y + bias
            if lora is not None:
                y = y + (checkpoint_name(x @ lora["A"], "lora_xa") @ lora["B"]) * scale
            return checkpoint_name(y, "dense")
        xc = x.astype(cd)
        if self.has_variable("params", "kernel_t"):
            # a base from prepare_base(): the CPU-ordered backward products (frozen_dot, lora_delta)
            y = frozen_dot(xc, kernel.astype(cd), self.get_variable("params", "kernel_t"))
            if bias is not None:
                y = y + bias
            if lora is not None:
                y = y + lora_delta(xc, lora["A"], lora["B"], scale)
            return checkpoint_name(y.astype(cd), "dense")
        y = jnp.dot(xc, kernel.astype(cd), preferred_element_type=jnp.float32)
        if bias is not None:
            y = y + bias
        if lora is not None:
            xa = jnp.dot(xc, lora["A"].astype(cd), preferred_element_type=jnp.float32).astype(cd)
            xa = checkpoint_name(xa, "lora_xa")
            y = y + jnp.dot(xa, lora["B"].astype(cd), preferred_element_type=jnp.float32) * scale
        return checkpoint_name(y.astype(cd), "dense")


def layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] like PyTorch, not E[x^2]-mean^2.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


def split_heads(x: Array, num_heads: int) -> Array:
    """[B, T, H] -> [B, T, heads, H/heads]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def padding_bias(attention_mask: Array, dtype=jnp.float32) -> Array:
    """[B, T] {0,1} -> [B, 1, 1, T] additive bias: 0 on tokens, dtype-min on padding."""
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum")


def attention_impl(impl: str, dtype) -> str:
    """Resolves ``"auto"``: on a GPU, cuDNN fused attention with 16-bit inputs (its supported case)
    and XLA's ``dot_product_attention`` otherwise; on CPU the einsum path, which keeps CPU results
    bit-identical to earlier versions (XLA's kernel gave no measured CPU speed-up,
    benchmarks/RESULTS.md). Other names pass through."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "gpu":
        return "einsum"
    if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla"


class SelfAttention(nn.Module):
    """Scaled dot-product self-attention of BERT/RoBERTa. Returns the merged
    context ``[B, T, H]`` before the attention output projection.

    ``attention`` picks the kernel (:data:`ATTENTION_IMPLS`): ``"xla"`` and ``"cudnn"`` call
    ``jax.nn.dot_product_attention`` (scores and softmax in float32, probabilities cast to the
    value dtype); ``"cudnn"`` (cuDNN fused attention, GPU, bf16/f16 only) takes the padding mask
    as per-example key lengths ``ctx["kv_len"]``, so it assumes right padding (what the
    tokenizers produce); ``"xla"`` adds ``ctx["mask_bias"]`` like the ``"einsum"`` reference
    path (the pre-issue-14 code, kept for the exactness tests). ``"auto"``: :func:`attention_impl`.
    """

    cfg: EncoderConfig
    compute_dtype: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, h: Array, ctx: Mapping[str, Array], lora: LoRALayer, scale: float) -> Array:
        cfg = self.cfg
        proj = lambda name: LoRADense(cfg.hidden_size, dense_init(cfg), compute_dtype=self.compute_dtype,
                                      name=name)(h, lora.get(name), scale)
        q, k, v = (split_heads(proj(n), cfg.num_heads) for n in ("query", "key", "value"))
        impl = attention_impl(self.attention, q.dtype)
        if impl == "einsum":
            scores = mixed_einsum("bqhd,bkhd->bhqk", q, k)
            scores = scores / jnp.sqrt(jnp.asarray(cfg.head_dim, jnp.float32))
            probs = jax.nn.softmax(scores + ctx["mask_bias"], axis=-1).astype(v.dtype)
            out = mixed_einsum("bhqk,bkhd->bqhd", probs, v).astype(v.dtype)
        elif impl == "cudnn":
            out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=ctx["kv_len"],
                                               implementation="cudnn")
        else:
            out = jax.nn.dot_product_attention(q, k, v, bias=ctx["mask_bias"], implementation="xla")
        return out.reshape(*out.shape[:2], cfg.hidden_size)


class Block(nn.Module):
    """One post-LayerNorm transformer layer, shared by all families.

    ``lora`` maps target names (``query``, ``key``, ``value``,
    ``attention_output``, ``intermediate``, ``output``) to this layer's LoRA
    factors; absent targets are not adapted. Under a ``compute_dtype`` the dense
    outputs are in that dtype; each residual sum and LayerNorm runs in float32 (the
    LayerNorm output, the residual stream, is float32) and the activation is computed
    in float32 and stored in ``compute_dtype``.
    """

    cfg: EncoderConfig
    attention_cls: type[nn.Module] = SelfAttention
    compute_dtype: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, h: Array, ctx: Mapping[str, Any], lora: LoRALayer, scale: float) -> Array:
        cfg = self.cfg
        dense = lambda feats, name, x: LoRADense(feats, dense_init(cfg), compute_dtype=self.compute_dtype,
                                                 name=name)(x, lora.get(name), scale)
        f32 = lambda x: x.astype(jnp.float32)
        context = self.attention_cls(cfg, compute_dtype=self.compute_dtype, attention=self.attention,
                                     name="attention")(h, ctx, lora, scale)
        h = layer_norm(cfg, "attention_ln")(f32(dense(cfg.hidden_size, "attention_output", context)) + h)
        pre = dense(cfg.intermediate_size, "intermediate", h)
        act = activation(cfg.hidden_act)
        if pre.dtype != jnp.float32:
            # float32 arithmetic, and only the bf16 input kept for the backward pass (the
            # activation's float32 internals are recomputed there, not stored)
            inter = jax.checkpoint(lambda x: act(f32(x)).astype(x.dtype))(pre)
        else:
            inter = act(pre)
        return layer_norm(cfg, "output_ln")(f32(dense(cfg.hidden_size, "output", inter)) + h)
