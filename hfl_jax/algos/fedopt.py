"""Server optimizers: FedAvgM, FedAdam, FedYogi, FedAdagrad (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021; FedAvgM: Hsu et al., 2019).

The devices train as in FedLoRA (full depth, tau 1, the sample-weighted mean ``ybar`` of their
trained trainables). The server then treats ``delta = x - ybar`` as a gradient of the global
model ``x`` and takes one step of its own optimizer:
``updates, s = opt.update(delta, s, x); x <- x + updates``:

* ``fedavgm``: ``optax.sgd(lr, momentum)``: ``m <- momentum m + delta; x <- x - lr m``;
* ``fedadam``: ``optax.adam(lr, beta1, beta2, eps)`` (optax's bias-corrected moments);
* ``fedyogi``: ``optax.yogi(lr, beta1, beta2, eps)``;
* ``fedadagrad``: ``optax.adagrad(lr, initial_accumulator_value=eps**2)`` (the paper's ``v_{-1} = tau^2``).

``lr 1, momentum 0`` gives back FedLoRA (``x - (x - ybar) = ybar`` up to float rounding). The
server optimizer's state (``[...]`` leaves shaped like the trainable, plus step counts) lives in
the algorithm state's device tree, as a list of leaves, and is checkpointed. Config:
``algorithm.server.{lr, momentum, beta1, beta2, eps}``; traffic is FedLoRA's.
"""
from __future__ import annotations

import functools

import jax
import optax

from hfl_jax.algos import stages
from hfl_jax.algos.api import AlgoState, FedAlgorithm
from hfl_jax.algos.fedlora import one_group


def sgd_momentum(lr: float, server) -> optax.GradientTransformation:
    """FedAvgM's server optimizer: ``optax.sgd(lr, momentum)`` (no momentum trace at momentum 0)."""
    return optax.sgd(lr, momentum=server.momentum or None)


def adam(lr: float, server) -> optax.GradientTransformation:
    """FedAdam's: ``optax.adam(lr, beta1, beta2, eps)``."""
    return optax.adam(lr, b1=server.beta1, b2=server.beta2, eps=server.eps)


def yogi(lr: float, server) -> optax.GradientTransformation:
    """FedYogi's: ``optax.yogi(lr, beta1, beta2, eps)``."""
    return optax.yogi(lr, b1=server.beta1, b2=server.beta2, eps=server.eps)


def adagrad(lr: float, server) -> optax.GradientTransformation:
    """FedAdagrad's: ``optax.adagrad(lr)``, the accumulator starting at ``eps**2`` (the paper's ``v_{-1} = tau^2``)."""
    return optax.adagrad(lr, initial_accumulator_value=server.eps ** 2)


@functools.lru_cache(maxsize=8)
def _server_step(opt: optax.GradientTransformation):
    @jax.jit
    def step(x, ybar, leaves):
        treedef = jax.tree.structure(opt.init(x))
        delta = jax.tree.map(lambda a, b: a - b, x, ybar)       # the pseudo-gradient x - mean(y_i)
        updates, s = opt.update(delta, jax.tree.unflatten(treedef, leaves), x)
        return optax.apply_updates(x, updates), jax.tree.leaves(s)
    return step


def server_step(opt: optax.GradientTransformation, x, ybar, leaves: list) -> tuple:
    """``(x + updates, new state leaves)``: one step of ``opt`` on the pseudo-gradient ``x - ybar``;
    ``leaves``: the flattened ``opt.init(x)``-shaped state."""
    return _server_step(opt)(x, ybar, list(leaves))


def server_optimized(name: str, num_layers: int, opt: optax.GradientTransformation) -> FedAlgorithm:
    """A flat round (as FedLoRA's) whose global model takes one ``opt`` step on ``x - ybar`` per round."""
    traffic = dict(hierarchical=False, probe=False, factors="AB")

    def init(env, key) -> AlgoState:
        leaves = jax.tree.leaves(opt.init(env.initial))
        return AlgoState(round=0, trainable=env.initial, host={},
                         device={"server": env.axis.replicate(leaves)} if leaves else None)

    def round_(env, state: AlgoState, key):
        present = stages.participants(env, stages.round_rng(env, state.round))
        g = stages.group_view(env, 0, present, stages.full_ranks(env))
        if g.skipped:
            return stages.finish_round(state, state.trainable, [], [dict(g.record(), skipped=True)], [])
        tr, out = stages.train_group(env, state.trainable, g, depth=num_layers, tau=1,
                                     key=jax.random.fold_in(key, 0))
        cost = stages.group_cost(env, g, num_layers, 1, **traffic)
        bad_ids = [int(i) for i in g.ids[out.dropped]]
        rec = dict(g.record(), skipped=False, arm=0, depth=num_layers, tau=1, time=cost["time"],
                   train_loss=out.train_loss, dropped=bad_ids)
        ybar = stages.global_aggregate(state.trainable, [(tr, num_layers, out.kept_weight)])
        leaves = state.device["server"] if state.device is not None else []
        x, leaves = server_step(opt, state.trainable, ybar, leaves)
        device = {"server": leaves} if state.device is not None else None
        return stages.finish_round(state, x, [cost], [rec], bad_ids, device=device)

    def programs(env, state: AlgoState) -> list:
        x, leaves = state.trainable, state.device["server"] if state.device is not None else []
        # the server step too (a step towards ybar = x is a real step, but its result is dropped)
        return stages.programs(env, x, depths=(num_layers,)) + [
            lambda: jax.block_until_ready(server_step(opt, x, x, leaves))]

    return FedAlgorithm(name, (num_layers,), one_group, init, round_, programs=programs)


def _builder(name: str, make, default_lr: float):
    def build(cfg, num_layers: int) -> FedAlgorithm:
        server = cfg.algorithm.server
        return server_optimized(name, num_layers, make(default_lr if server.lr is None else float(server.lr), server))
    build.__doc__ = (f"{name}: FedLoRA's devices, the server's ``{make.__name__}`` step (lr {default_lr} unless "
                     "``algorithm.server.lr``) on the pseudo-gradient x - mean(y_i).")
    return build


build_fedavgm = _builder("fedavgm", sgd_momentum, 1.0)
build_fedadam = _builder("fedadam", adam, 1e-2)
build_fedyogi = _builder("fedyogi", yogi, 1e-2)
build_fedadagrad = _builder("fedadagrad", adagrad, 1e-2)
