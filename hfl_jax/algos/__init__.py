"""Federated algorithms, one module each, selectable by name (``algorithm.name``).

Each module's ``build(cfg, num_layers) -> FedAlgorithm`` returns the algorithm's
``(init, round)`` pair (:mod:`hfl_jax.algos.api`); adding an algorithm is one new module
and one line here.
"""
from hfl_jax.algos import fedlora, fedopt, fedprox, fedsa_lora, ffa_lora, flexlora, hetlora, hierfedlora, scaffold
from hfl_jax.algos.api import AlgoState, FedAlgorithm
from hfl_jax.algos.hierfedlora import default_depths

ALGORITHMS = {
    "hierfedlora": hierfedlora.build,
    "hierfedlora_random_groups": hierfedlora.build_random_groups,
    "hierfedlora_fixed": hierfedlora.build_fixed,
    "hierfedlora_full_depth": hierfedlora.build_full_depth,
    "hierfedlora_random_arm": hierfedlora.build_random_arm,
    "fedlora": fedlora.build,
    "hetlora": hetlora.build,
    "ffa_lora": ffa_lora.build,
    "fedsa_lora": fedsa_lora.build,
    "flexlora": flexlora.build,
    "fedprox": fedprox.build,
    "scaffold": scaffold.build,
    "fedavgm": fedopt.build_fedavgm,
    "fedadam": fedopt.build_fedadam,
    "fedyogi": fedopt.build_fedyogi,
    "fedadagrad": fedopt.build_fedadagrad,
}


def build(cfg, num_layers: int) -> FedAlgorithm:
    """The :class:`FedAlgorithm` named ``cfg.algorithm.name`` for an
    :class:`~hfl_jax.config.ExperimentConfig` and a model of ``num_layers`` layers.
    Builders raise :class:`~hfl_jax.config.ConfigError` (naming the key) for settings they cannot use."""
    try:
        builder = ALGORITHMS[cfg.algorithm.name]
    except KeyError:
        raise ValueError(f"unknown algorithm {cfg.algorithm.name!r}; one of {', '.join(ALGORITHMS)}") from None
    return builder(cfg, num_layers)


__all__ = ["ALGORITHMS", "AlgoState", "FedAlgorithm", "build", "default_depths"]
