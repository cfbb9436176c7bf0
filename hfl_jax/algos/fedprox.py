"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Each device minimises its local loss plus a proximal term that keeps it near the round's
global model ``w0``: ``F_i(w) + (mu / 2) ||w - w0||^2`` over the trained parameters (LoRA
factors and head). Its gradient is ``grad F_i(w) + mu (w - w0)``: :func:`proximal` adds
``mu (w - w0)`` to the gradient before the device's optimizer. The local optimizer is
re-initialised every local round (:func:`hfl_jax.fed.local.make_local_train`), so ``init``
sees the round's starting (global) trainable and stores it as ``w0``. The round, the
aggregation (sample-weighted FedAvg) and the traffic are FedLoRA's
(:func:`hfl_jax.algos.fedlora.flat`). Config: ``algorithm.fedprox.mu``; ``mu = 0`` is FedLoRA (bit for bit).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import optax

from hfl_jax.algos.api import FedAlgorithm
from hfl_jax.algos.fedlora import flat


class ProximalState(NamedTuple):
    anchor: Any     # the trainable the local round started from (w0: the global model), like params
    inner: Any      # the wrapped optimizer's state


@functools.lru_cache(maxsize=8)
def proximal(mu: float, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` applied to ``grad + mu * (params - w0)``, with ``w0`` the params ``init`` saw.

    Cached so a run builds one optimizer object (and one compiled round). ``mu = 0`` returns ``inner``
    itself: adding ``0 (w - w0)`` changes no value but lets XLA fuse the step differently (1-ulp
    differences), and FedProx at ``mu = 0`` is meant to be FedLoRA bit for bit."""
    if mu == 0:
        return inner

    def init(params):
        return ProximalState(params, inner.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("proximal needs the params in update (the proximal gradient mu (w - w0))")
        grads = jax.tree.map(lambda g, w, w0: g + mu * (w - w0), grads, params, state.anchor)
        updates, inner_state = inner.update(grads, state.inner, params)
        return updates, ProximalState(state.anchor, inner_state)

    return optax.GradientTransformation(init, update)


def build(cfg, num_layers: int) -> FedAlgorithm:
    """FedProx: FedLoRA's flat round with the proximal term ``(mu / 2) ||w - w_global||^2`` in local training."""
    mu = float(cfg.algorithm.fedprox.mu)
    return flat("fedprox", num_layers, optimizer=functools.partial(proximal, mu))
