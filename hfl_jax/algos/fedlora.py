"""FedLoRA baseline: flat FedAvg of LoRA adapters over all devices, full depth, one aggregation per round."""
from __future__ import annotations

from hfl_jax.algos.spec import AlgoSpec


def fedlora(acfg, num_layers: int) -> AlgoSpec:
    """One group holding every device; depth L; tau 1; sample-weighted FedAvg; no edge tier."""
    return AlgoSpec("fedlora", "single", 1, "fixed", (num_layers,), (1,), fixed_arm=(num_layers, 1),
                    hierarchical=False)
