"""The algorithm interface: an algorithm is a pair of pure functions over an immutable state.

Like fedjax's ``FederatedAlgorithm(init, apply)`` and optax's ``(init, update)``, each
algorithm module builds a :class:`FedAlgorithm` from its hyperparameters:

* ``init(env, key) -> AlgoState``: the state before round 1.
* ``round(env, state, key) -> (AlgoState, record)``: one global round; ``key`` is the
  round's PRNG key, ``record`` a JSON-able dict (one line of ``metrics.jsonl``).
* ``programs(env, state) -> [callable]`` (optional): compile every program ``round`` may run,
  so the driver can compile them all, concurrently, before round 1.

``env`` (:class:`~hfl_jax.fed.env.Env`) is everything fixed for the run (model, frozen
base, groups' data, device axis, profiles, workload). The builder also says how devices
are grouped (``group``) and which fine-tuning depths it may train (``depths``, which the
frozen-layer cache reads). Registering a new algorithm is one line in
:data:`hfl_jax.algos.ALGORITHMS`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class AlgoState:
    """Everything that changes between rounds (checkpointed: arrays by orbax, host leaves as JSON)."""
    round: int                          # global rounds done
    trainable: Any                      # {"lora": LoRA [L, ...], "head": ...}: the global model
    sim_time: float = 0.0               # simulated seconds so far
    bytes_up: float = 0.0               # all tiers, cumulative
    bytes_down: float = 0.0
    host: Any = ()                      # the algorithm's host-side pytree of numpy leaves (bandits, ranks)
    device: Any = None                  # the algorithm's accelerator pytree (e.g. FedSA-LoRA's per-device B)


class FedAlgorithm(NamedTuple):
    """A federated algorithm: how it groups devices, its depth grid, and its ``(init, round)`` pair."""
    name: str
    depths: tuple                       # every fine-tuning depth a round may use
    group: Callable[..., np.ndarray]    # (label_counts [N, C], speeds [N], seed, embeddings=None) -> [N] group ids
    init: Callable[..., AlgoState]      # (env, key) -> state
    round: Callable[..., tuple]         # (env, state, key) -> (state, record)
    probes: bool = False                # scores a probe (then the driver may hold examples out for it)
    intra_rounds: int = 1               # the most intra-group rounds (tau) a group round may run
    # (env, state) -> zero-argument callables compiling every program a round may run
    # (hfl_jax.algos.stages.programs); None: nothing ahead of time
    programs: Callable[..., list] | None = None
    # what `group` can read (algorithm.grouping.signal): label histograms, and with KL grouping also
    # the devices' mean frozen-model embeddings (``group(..., embeddings=[N, H])``)
    group_signals: tuple = ("labels",)
