"""Local training on one simulated device: the loss, one optimizer step, E steps under ``lax.scan``.

The trainable state of a device is ``{"lora": LoRA, "head": head_params}`` (an encoder's), or
``{"lora": LoRA}`` (a decoder LLM's: no head); the frozen base parameters (everything but ``"head"``)
are a separate argument
that is broadcast, never copied per device. Fine-tuning depth cuts the backward
pass (``stop_gradient`` below the lowest trained layer: the top ``depth`` layers' with the
model's ``layer_policy`` ``top``) and masks the optimizer's updates to the trained layers
(:func:`hfl_jax.models.lora.depth_masked`). It is static (one program per
depth), or ``None`` in :func:`make_local_train`: then the local round takes it as a
traced argument and one program serves every depth (``train.depth_program: shared``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hfl_jax.models.lora import LoRA, depth_masked
from hfl_jax.objectives import StepMetrics, objective_of  # noqa: F401  (StepMetrics: re-exported)

Array = jax.Array
Batch = Mapping[str, Array]  # input_ids/attention_mask/token_type_ids [B, T], labels [B] or [B, T], mask [B] bool


def base_of(params: Mapping[str, Any]) -> dict:
    """The frozen part of a parameter tree (everything except the head)."""
    return {k: v for k, v in params.items() if k != "head"}


def make_loss_fn(model, depth: int, start_layer: int = 0) -> Callable:
    """``loss(trainable, base, batch) -> (mean_loss, StepMetrics)`` at ``depth`` (static, or a traced int32):
    the model's objective's loss (:func:`hfl_jax.objectives.objective_of`: classification for encoders,
    next-token cross-entropy on response tokens for decoder LLMs)."""
    return objective_of(model).loss_fn(model, depth, start_layer)


def make_optimizer(inner: optax.GradientTransformation, num_layers: int, depth: int,
                   policy: str = "top") -> optax.GradientTransformation:
    """The device optimizer at ``depth``: ``inner`` with the LoRA updates of every layer ``policy``
    does not train at ``depth`` zeroed (:func:`hfl_jax.models.lora.layer_mask`; ``top``: all but the
    top ``depth``)."""
    return depth_masked(inner, num_layers, depth, policy)


def make_train_step(model, optimizer: optax.GradientTransformation, depth: int,
                    start_layer: int = 0) -> Callable:
    """``step(trainable, opt_state, base, batch, offset=None) -> (trainable, opt_state, StepMetrics)``.

    ``optimizer`` should come from :func:`make_optimizer` with the same depth and the model's
    ``layer_policy``;
    ``start_layer`` as in :func:`make_loss_fn`. ``offset`` (a tree like ``trainable``, or ``None``)
    is added to the optimizer's update, after the optimizer (and its depth mask): SCAFFOLD's
    control-variate correction ``-lr (c - c_i)``, which for SGD is the step on ``g - c_i + c``.
    """
    grad_fn = jax.grad(make_loss_fn(model, depth, start_layer), has_aux=True)

    def step(trainable, opt_state, base, batch, offset=None):
        grads, metrics = grad_fn(trainable, base, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        if offset is not None:
            updates = jax.tree.map(jnp.add, updates, offset)
        return optax.apply_updates(trainable, updates), opt_state, metrics

    return step


def make_local_train(model, inner: optax.GradientTransformation, depth: int | None,
                     num_steps: int, batch_size: int, n_max: int, pack: Any = None) -> Callable:
    """One device's local round: ``num_steps`` (E) optimizer steps under ``lax.scan``.

    Returns ``local_train(trainable, base, data_row, round_key, device_id, rank, plan=None, traced_depth=None,
    update_offset=None)`` ``-> (trainable, StepMetrics[E])`` (``traced_depth``: an int32 scalar, only with
    ``depth=None``; ``update_offset``: a tree like ``trainable`` added to every step's update, or ``None``)
    where ``data_row`` is one device's :class:`~hfl_jax.data.DeviceData` slice (no device axis)
    and ``rank`` the device's LoRA rank: components ``>= rank`` are zeroed on arrival
    (HetLoRA's truncation) and, having zero gradient, stay zero; pass the full rank
    for homogeneous LoRA.
    Batches come from :func:`~hfl_jax.data.sample_batch_indices` keyed by
    ``fold_in(round_key, device_id)``, so a device's trajectory does not depend on
    which other devices run beside it. The optimizer state starts fresh each local
    round (local Adam/SGD re-initialised, as in FedAvg-style LoRA fine-tuning).
    When ``data_row`` carries cached hidden states (``hidden_layer > 0``, read at trace
    time) the forward pass starts from them.

    ``pack`` (a :class:`~hfl_jax.data.packing.PackSpec`): ``local_train`` takes a last argument
    ``plan``, the batches drawn ahead on the host (``{"idx", "mask", "row", "offset"}`` ``[E, B]``,
    :func:`~hfl_jax.data.packing.plan_group_round`: the indices the sampler would draw here), and
    each step runs on those batches packed into ``pack.rows`` rows (same result up to float order).
    """
    from hfl_jax.data import gather_batches, sample_batch_indices
    from hfl_jax.data.packing import pack_batch

    def local_train(trainable, base, data_row, round_key, device_id, rank, plan=None, traced_depth=None,
                    update_offset=None):
        d = depth if depth is not None else traced_depth
        opt = make_optimizer(inner, model.num_layers, d, model.layer_policy)
        step = make_train_step(model, opt, d, data_row.hidden_layer)
        trainable = dict(trainable, lora=truncate_to(trainable["lora"], rank))
        if pack is None:
            idx, mask = sample_batch_indices(round_key, device_id, data_row.counts, n_max, num_steps, batch_size)
            batches = dict(gather_batches(data_row, idx), mask=mask)
        else:
            batches = dict(gather_batches(data_row, plan["idx"]), mask=plan["mask"])
            batches = jax.vmap(lambda b, r, o: pack_batch(b, r, o, pack))(batches, plan["row"], plan["offset"])

        def body(carry, batch):
            tr, st = carry
            tr, st, metrics = step(tr, st, base, batch, update_offset)
            return (tr, st), metrics

        (trainable, _), metrics = jax.lax.scan(body, (trainable, opt.init(trainable)), batches)
        return trainable, metrics

    return local_train


def truncate_to(lora: LoRA, rank: Array) -> LoRA:
    """Zeroes rank components ``j >= rank`` (``rank`` may be traced); shapes are unchanged."""
    keep = jnp.arange(lora.rank) < rank
    return LoRA({t: {"A": ab["A"] * keep.astype(ab["A"].dtype),
                     "B": ab["B"] * keep[:, None].astype(ab["B"].dtype)} for t, ab in lora.weights.items()},
                lora.scale)
