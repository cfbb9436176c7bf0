"""The federated engine: a whole group's local round as one compiled call, and evaluation.

``make_group_round`` vmaps :func:`hfl_jax.fed.local.make_local_train` over the
group's devices (through :class:`~hfl_jax.fed.device_axis.DeviceAxis`, which
shards and chunks the device axis), broadcasting the group's current adapters
and the frozen base, and aggregates the devices' results in the same call
(sample-weighted FedAvg, non-finite devices dropped). Compiled once per
``(depth, E, B, n_max, shapes)`` and reused; with ``depth=None`` once for every depth
(the depth is then an argument of the call).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hfl_jax.fed.device_axis import DeviceAxis
from hfl_jax.fed.group_aggregators import FedAvg
from hfl_jax.fed.local import make_loss_fn, make_local_train
from hfl_jax.fed.xla import jit
from hfl_jax.objectives import objective_of

Array = jax.Array


class GroupRoundMetrics(NamedTuple):
    loss: Array      # [M, E] per-device, per-step training loss
    count: Array     # [M, E] real examples per step
    finite: Array    # [M] bool, False where a device's update held NaN/Inf (it was dropped)
    weight: Array    # [M] aggregation weight actually used


@functools.lru_cache(maxsize=64)
def make_group_round(model, inner: optax.GradientTransformation, *, depth: int | None, local_steps: int,
                     batch_size: int, n_max: int, axis: DeviceAxis = DeviceAxis(),
                     aggregator: Any = FedAvg(), per_device: bool = False, pack: Any = None):
    """Compiled ``group_round(trainable, base, data, device_ids, weights, round_key, ranks=None)``
    ``-> (trainable, metrics)``.

    ``depth``: the fine-tuning depth, static (one program per depth), or ``None``: one program
    for every depth, which the call then takes as the keyword ``depth`` (an int32 scalar; the
    frozen layers' backward pass is computed and discarded, :mod:`hfl_jax.models.encoder`).

    Args (of the returned function):
      trainable: ``{"lora": LoRA, "head": ...}`` the group's current model (broadcast to its devices).
      base: frozen base parameters (broadcast, never copied per device).
      data: :class:`~hfl_jax.data.DeviceData` with a leading axis of ``M`` device slots.
      device_ids: ``[M]`` int32 global device ids (keys are folded in per id).
      weights: ``[M]`` aggregation weights (sample counts; 0 for absent or padding devices).
      round_key: PRNG key of this (intra-group) round.
      ranks: ``[M]`` per-device LoRA ranks (HetLoRA, FlexLoRA); ``None`` = everyone at full rank.
      device_lora: only with ``per_device=True``: ``[M, ...]`` LoRA each device starts from
        instead of ``trainable["lora"]`` (FedSA-LoRA's device-kept B).
      update_offset: keyword, optional: ``[M, ...]`` a tree like ``trainable`` each device adds to every
        local step's optimizer update (SCAFFOLD's ``-lr (c - c_i)``); ``None``: no offset.

    ``pack``: a :class:`~hfl_jax.data.packing.PackSpec`; the function then takes the keyword
    ``plan`` (``{"idx", "mask", "row", "offset"}`` ``[M, E, B]``, from
    :func:`~hfl_jax.data.packing.plan_group_round`) and trains on packed batches.

    ``aggregator``: a group aggregator from :mod:`hfl_jax.fed.group_aggregators`
    (``FedAvg()``, ``RankPadded(sparsity, padding)``, ``SVDProductMean()``); hashable, part of the cache key.

    Returns:
      the aggregated trainable (unchanged if every weight is 0), :class:`GroupRoundMetrics`,
      and with ``per_device=True`` also the devices' trained trainables ``[M, ...]``.
    """
    local = make_local_train(model, inner, depth, local_steps, batch_size, n_max, pack)
    static_depth = depth

    def start_from(trainable, base, data_row, key, device_id, rank, plan, traced_depth, offset, *device_lora):
        if per_device:
            trainable = dict(trainable, lora=device_lora[0])
        return local(trainable, base, data_row, key, device_id, rank, plan, traced_depth, offset)
    mapped = axis.map(start_from, in_axes=(None, None, 0, None, 0, 0, 0, None, 0) + (0,) * per_device)

    @jit
    def group_round(trainable, base, data, device_ids, weights, round_key, ranks=None, *device_lora, plan=None,
                    depth=None, update_offset=None):
        if ranks is None:
            ranks = jnp.full(device_ids.shape, trainable["lora"].rank, jnp.int32)
        if (depth is not None) != (static_depth is None):
            raise TypeError("group_round takes the keyword depth exactly when built with depth=None")
        new, metrics = mapped(trainable, base, data, round_key, device_ids, ranks, plan, depth, update_offset,
                              *device_lora)
        agg, finite, used = aggregator(new, trainable, weights, ranks)
        out = GroupRoundMetrics(metrics.loss, metrics.count, finite, used)
        if per_device:
            return agg, axis.constrain(out, sharded=False), new
        return agg, axis.constrain(out, sharded=False)

    return group_round


@functools.lru_cache(maxsize=8)
def make_evaluate(model):
    """Compiled ``evaluate(trainable, base, eval_data) -> (mean_loss, main_metric)``: the model's
    objective's evaluation (:func:`hfl_jax.objectives.objective_of`). Classification: mean
    cross-entropy and accuracy over an :class:`~hfl_jax.data.EvalBatches` or a packed
    :class:`~hfl_jax.data.packing.PackedEval`; causal LM: mean next-token loss on response tokens
    and the in-graph main metric (:mod:`hfl_jax.objectives.causal_lm`).

    Evaluation differentiates nothing, so the model's ``layer_policy`` does not matter; it runs
    under ``top``, whose depth ``L - start`` the objectives pass with cached hidden states (the
    lowest layer another policy trains at that depth may lie below the cache)."""
    if getattr(model, "layer_policy", "top") != "top":
        model = dataclasses.replace(model, layer_policy="top")
    return jit(objective_of(model).evaluate_fn(model))


@functools.lru_cache(maxsize=16)
def make_probe(model, batch_size: int, n_max: int, axis: DeviceAxis = DeviceAxis(),
               drawn: bool = False):
    """Compiled ``probe(trainable, base, data, device_ids, probe_key) -> (loss [M], count [M])``:
    each device's loss of ``trainable`` on one batch drawn with ``probe_key`` (no training).

    ``drawn=True``: the batches come drawn (on the host, by the training rounds' compiled sampler:
    :func:`~hfl_jax.data.packing.sample_group_indices`, whose first step is this one batch) and the
    call is ``probe(trainable, base, data, idx, mask)`` with ``idx``, ``mask`` ``[M, B]``: the same
    losses from a program without a sampler of its own (the sampler dominated its compilation).

    Used for the bandit's progress signal: the same probe batches are scored
    before and after a group's round.
    """
    from hfl_jax.data import gather_batches, sample_batch_indices

    def score(trainable, base, data_row, idx, mask):
        loss_fn = make_loss_fn(model, 0, data_row.hidden_layer)
        _, m = loss_fn(trainable, base, dict(gather_batches(data_row, idx), mask=mask))
        return m.loss, m.count

    def one(trainable, base, data_row, key, device_id):
        idx, mask = sample_batch_indices(key, device_id, data_row.counts, n_max, 1, batch_size)
        return score(trainable, base, data_row, idx[0], mask[0])

    mapped = axis.map(score if drawn else one, in_axes=(None, None, 0, 0, 0) if drawn else (None, None, 0, None, 0))

    @jit
    def probe(trainable, base, data, *args):
        if drawn:   # args = (idx, mask)
            return axis.constrain(mapped(trainable, base, data, *args), sharded=False)
        device_ids, probe_key = args
        return axis.constrain(mapped(trainable, base, data, probe_key, device_ids), sharded=False)

    return probe
