"""Mixed precision and rematerialisation policies of the encoder (issue 14).

Mixed precision (``EncoderModel.compute_dtype = jnp.bfloat16``, config ``model.compute_dtype:
bfloat16``), like ``torch.autocast(dtype=torch.bfloat16)``:

========================================  ===================================================
in bfloat16                               in float32
========================================  ===================================================
inputs of every matmul: activations,      master copies: frozen base, LoRA ``A``/``B``, head;
frozen kernels, LoRA ``A`` and ``B``,     their gradients; optimizer state (optax)
attention probabilities and values
outputs of the dense layers (q, k, v,     accumulation of every matmul
attention output, FFN in/out), ``x A``,   (``preferred_element_type=float32``); bias adds
the GELU output, the attention context:
the activations stored for the backward
                                          attention scores, padding bias, softmax
                                          residual sums, LayerNorm (statistics and output:
                                          the residual stream between layers is float32)
                                          GELU's arithmetic (its output is stored in bf16)
                                          embeddings, classification head, logits, loss
========================================  ===================================================

The backward pass on a CPU: the driver passes the frozen base through
:func:`hfl_jax.models.layers.prepare_base`, which gives every stacked kernel a transposed bf16 copy, and
:class:`~hfl_jax.models.layers.LoRADense` then takes the frozen input gradient as ``g_bf16 @ kernel_t``
(:func:`~hfl_jax.models.layers.frozen_dot`) and the LoRA gradients in float32 with XLA:CPU-friendly
operand order (:func:`~hfl_jax.models.layers.lora_delta`): the same forward values, gradients equal up to
one product's summation order (and float32 rather than bf16-rounded LoRA gradients). GPUs/TPUs get the
plain base.

The attention's activation products (scores ``q k^T`` and context ``p v``, encoders and decoders) go
through :func:`~hfl_jax.models.layers.mixed_einsum` on every platform: bf16 x bf16 with float32
accumulation forward, and a backward pass that rounds the float32 cotangent to bf16 and computes both
operand gradients as bf16 x bf16 -> float32 products, as ``torch.autocast``'s bf16 ``bmm`` does (autodiff
would promote them to float32 products). All of these products run as batch-leading ``[n, m, k] x
[n, k, p]`` products, the form XLA:CPU's bf16 library kernels take.

DeBERTa's disentangled attention casts q/k/v back to float32 (its scores, softmax and context
are float32); its projections follow the table. ``compute_dtype=None`` (the default, and the
CPU default of the driver) is float32 everywhere, bit-for-bit the pre-policy computation.

Rematerialisation (``EncoderModel.remat``, config ``model.remat``) wraps each *trained* layer
(the top ``depth``; the frozen bottom layers run under ``stop_gradient`` and store nothing) in
``jax.checkpoint`` with one of :data:`REMAT_POLICIES`, and runs them as a rolled ``lax.scan``
whatever ``EncoderModel.unroll`` says (unrolled, XLA schedules the recomputation beside the
forward pass and the memory saving disappears). Results are identical up to float
reordering (``tests/test_remat_attention.py``); what changes is what the backward pass reads from
memory versus recomputes (``benchmarks/memory_policies.py`` reports XLA's memory per policy).
"""
from __future__ import annotations

import jax

_cp = jax.checkpoint_policies

# name -> (jax.checkpoint policy or None for no checkpoint, one-line description)
REMAT_POLICIES: dict[str, tuple] = {
    "none": (None, "no rematerialisation: XLA keeps what the backward pass needs"),
    "dots": (_cp.dots_saveable,
             "save every matmul output (dense, LoRA, attention products); recompute bias adds, GELU, "
             "softmax, LayerNorm"),
    "dense": (_cp.save_only_these_names("dense", "lora_xa"),
              "save the dense layers' outputs and the rank-r LoRA products x A; recompute attention "
              "(scores, softmax, context) and every elementwise op"),
    "full": (_cp.nothing_saveable,
             "save only each trained layer's input; recompute the whole layer (all frozen-weight "
             "activations) in the backward pass"),
}


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of a :data:`REMAT_POLICIES` name (``None`` for ``"none"``)."""
    try:
        return REMAT_POLICIES[name][0]
    except KeyError:
        raise ValueError(f"unknown remat policy {name!r}; one of {tuple(REMAT_POLICIES)}") from None
