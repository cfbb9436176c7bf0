"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025).

The ``A`` factors learn general knowledge and are shared: the server averages them (sample
weighted) every round. The ``B`` factors learn client-specific knowledge and stay on their
device: each device starts every round from the global ``A`` and its own ``B``, and only
``A`` (and the head) cross the link.

The global evaluation model (what ``eval_accuracy`` measures and what is exported) is the
averaged ``A``, the averaged head, and the sample-weighted mean of the ``B`` factors of the
devices that trained this round. The devices' own ``B`` live in the state's device tree
(``[S, L, r, out]`` per target, one row per slot of the single group) and are checkpointed.
The flat round is :func:`hfl_jax.algos.fedlora.flat`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hfl_jax.algos.api import FedAlgorithm
from hfl_jax.algos.fedlora import flat
from hfl_jax.models.lora import LoRA


@dataclasses.dataclass(frozen=True)
class KeepB:
    """Per-device ``B`` kept across rounds (the ``personal`` strategy of :func:`~hfl_jax.algos.fedlora.flat`)."""

    def init(self, env) -> dict:
        """``{"B": {target: [S, L, r, out]}}``: every slot's ``B`` starts at the global initial ``B``
        (zeros: LoRA's usual init)."""
        size = len(env.group_slots[0])
        b0 = {t: jnp.broadcast_to(ab["B"], (size,) + ab["B"].shape) for t, ab in env.initial["lora"].weights.items()}
        return {"B": env.axis.put(b0)}

    def starts(self, lora: LoRA, device: dict) -> LoRA:
        """``[S, ...]`` LoRA per slot: the shared ``A`` broadcast, each device's own ``B``."""
        def one(t, ab):
            b = device["B"][t]
            return {"A": jnp.broadcast_to(ab["A"], (b.shape[0],) + ab["A"].shape), "B": b}
        return LoRA({t: one(t, ab) for t, ab in lora.weights.items()}, lora.scale)

    def update(self, device: dict, trained: LoRA, kept: jax.Array) -> dict:
        """Each slot's ``B`` after the round: the trained one where ``kept`` ``[S]``, else unchanged."""
        mask = lambda x: kept.reshape((-1,) + (1,) * (x.ndim - 1))
        return {"B": {t: jnp.where(mask(b), trained.weights[t]["B"], b) for t, b in device["B"].items()}}


def build(cfg, num_layers: int) -> FedAlgorithm:
    """FedSA-LoRA: A averaged globally, B kept on each device; flat, full depth, tau 1."""
    return flat("fedsa_lora", num_layers, factors="A", personal=KeepB())
