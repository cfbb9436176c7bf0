"""HierFedLoRA, its ablations and the FedLoRA / HetLoRA baselines (selectable by name)."""
from hfl_jax.algos import fedlora as _fedlora, hetlora as _hetlora, hierfedlora as _hier
from hfl_jax.algos.spec import AlgoSpec, default_depths

SPECS = {
    "hierfedlora": _hier.hierfedlora,
    "hierfedlora_random_groups": _hier.random_groups,
    "hierfedlora_fixed": _hier.fixed_arm,
    "hierfedlora_full_depth": _hier.full_depth,
    "fedlora": _fedlora.fedlora,
    "hetlora": _hetlora.hetlora,
}


def resolve(acfg, num_layers: int) -> AlgoSpec:
    """The :class:`AlgoSpec` for ``acfg.name`` (an :class:`~hfl_jax.config.AlgorithmConfig`)."""
    try:
        return SPECS[acfg.name](acfg, num_layers)
    except KeyError:
        raise ValueError(f"unknown algorithm {acfg.name!r}; one of {', '.join(SPECS)}") from None


__all__ = ["AlgoSpec", "SPECS", "default_depths", "resolve"]
