"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), option II, on LoRA adapters and head.

The server keeps a control variate ``c`` and every device ``i`` its own ``c_i`` (both shaped
like the trainable, zero at the start). In round ``t`` each participant starts from the global
``x`` and runs its ``K`` local steps corrected by the control variates, ending at ``y_i``: each
step's optimizer update gets ``-lr (c - c_i)`` added (:func:`hfl_jax.fed.local.make_train_step`),
so with ``train.optimizer: sgd`` a step is ``w <- w - lr (g - c_i + c)``, the paper's; with Adam(W)
the correction bypasses the adaptive scaling, as OpenFedLLM's SCAFFOLD applies it (through Adam
the correction, ~1 in Adam's units, would swamp the normalised gradient). Then

    c_i+ = c_i - c + (x - y_i) / (K lr)          (option II; lr = train.lr)
    x   <- sample-weighted mean of y_i            (as FedLoRA)
    c   <- c + (1 / N) sum_{i in S} (c_i+ - c_i)  (N devices in all, S the participants)

A device dropped as non-finite keeps its ``c_i`` and contributes nothing. The devices upload
``y_i`` and ``c_i+ - c_i`` and download ``x`` and ``c``: twice FedLoRA's payload both ways
(:func:`control_variate_cost`). ``c`` and the ``c_i`` (``[S, ...]``, one row per slot of the
single group) live in the state's device tree and are checkpointed.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.algos import stages
from hfl_jax.algos.api import AlgoState, FedAlgorithm
from hfl_jax.algos.fedlora import one_group
from hfl_jax.fed import cost as cost_lib
from hfl_jax.fed.tiers import TIER_BYTES

LINKS = ("up_bw", "down_bw", "cloud_up_bw", "cloud_down_bw")


def control_variate_cost(env, g: stages.GroupView, depth: int) -> dict:
    """FedLoRA's cost of group ``g``'s round with every message carrying twice the payload (the
    trainable and its control variate): bytes doubled, and each link's seconds doubled (the same
    as halving every bandwidth: transfer time is bytes / bandwidth); compute and latency unchanged."""
    profiles = {k: (v / 2 if k in LINKS else v) for k, v in env.profiles.items()}
    work = dataclasses.replace(env.workload, hierarchical=False, probe=False, factors="AB")
    out = cost_lib.group_cost(env.model.cfg, profiles, work, g.ids[g.present], g.ranks[g.present], depth, 1)
    return dict(out, **{k: 2 * out[k] for k in TIER_BYTES + ("bytes_up", "bytes_down")})


@jax.jit
def correction(c, ci, lr):
    """``[S, ...]`` each slot's update offset ``-lr (c - c_i)`` (an SGD step on ``g - c_i + c`` minus one on ``g``)."""
    return jax.tree.map(lambda a, b: -lr * (a[None] - b), c, ci)


@jax.jit
def update_controls(c, ci, x, y, kept, inv_k_lr, inv_n):
    """``(c, c_i)`` after a round: ``c_i+ = c_i - c + (x - y_i) * inv_k_lr`` where ``kept`` ``[S]``
    (else ``c_i``), ``c + inv_n * sum_kept (c_i+ - c_i)``. ``y``: ``[S, ...]`` the trained trainables."""
    mask = lambda a: kept.reshape((-1,) + (1,) * (a.ndim - 1))
    plus = jax.tree.map(lambda ci_, x_, y_, c_: ci_ - c_[None] + (x_[None] - y_) * inv_k_lr, ci, x, y, c)
    new_ci = jax.tree.map(lambda p, o: jnp.where(mask(o), p, o), plus, ci)
    new_c = jax.tree.map(lambda c_, p, o: c_ + inv_n * jnp.where(mask(o), p - o, 0.0).sum(0), c, plus, ci)
    return new_c, new_ci


def starts(lora, size: int):
    """``[S, ...]`` the global LoRA broadcast to every slot (every device starts from ``x``)."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (size,) + a.shape), lora)


def scaffold(name: str, num_layers: int, lr: float) -> FedAlgorithm:
    """SCAFFOLD's flat round (one group, full depth, tau 1) with local learning rate ``lr``."""

    def init(env, key) -> AlgoState:
        size = len(env.group_slots[0])
        zeros = jax.tree.map(jnp.zeros_like, env.initial)
        ci = jax.tree.map(lambda a: jnp.broadcast_to(a, (size,) + a.shape), zeros)
        return AlgoState(round=0, trainable=env.initial, host={},
                         device={"c": env.axis.replicate(zeros), "ci": env.axis.put(ci)})

    def round_(env, state: AlgoState, key):
        present = stages.participants(env, stages.round_rng(env, state.round))
        g = stages.group_view(env, 0, present, stages.full_ranks(env))
        if g.skipped:
            return stages.finish_round(state, state.trainable, [], [dict(g.record(), skipped=True)], [])
        x, c, ci = state.trainable, state.device["c"], state.device["ci"]
        tr, out = stages.train_group(env, x, g, depth=num_layers, tau=1, key=jax.random.fold_in(key, 0),
                                     device_lora=starts(x["lora"], len(g.slots)),
                                     update_offset=correction(c, ci, np.float32(lr)))
        kept = env.axis.put(g.present & ~out.dropped)
        c, ci = update_controls(c, ci, x, out.devices, kept, np.float32(1.0 / (env.workload.local_steps * lr)),
                                np.float32(1.0 / env.num_devices))
        cost = control_variate_cost(env, g, num_layers)
        bad_ids = [int(i) for i in g.ids[out.dropped]]
        rec = dict(g.record(), skipped=False, arm=0, depth=num_layers, tau=1, time=cost["time"],
                   train_loss=out.train_loss, dropped=bad_ids)
        trainable = stages.global_aggregate(x, [(tr, num_layers, out.kept_weight)])
        return stages.finish_round(state, trainable, [cost], [rec], bad_ids, device={"c": c, "ci": ci})

    def programs(env, state: AlgoState) -> list:
        x, d = state.trainable, state.device
        size = len(env.group_slots[0])

        def controls():   # the control-variate update (its result dropped; y_i := c_i has the devices' layout)
            kept = env.axis.put(np.ones(size, bool))
            jax.block_until_ready(update_controls(d["c"], d["ci"], x, d["ci"], kept, np.float32(1.0),
                                                  np.float32(1.0)))
        return stages.programs(env, x, depths=(num_layers,), device_lora=starts(x["lora"], size),
                               update_offset=correction(d["c"], d["ci"], np.float32(lr))) + [controls]

    return FedAlgorithm(name, (num_layers,), one_group, init, round_, programs=programs)


def build(cfg, num_layers: int) -> FedAlgorithm:
    """SCAFFOLD (option II): control variates correct the local gradients; flat, full depth, tau 1."""
    return scaffold("scaffold", num_layers, float(cfg.train.lr))
