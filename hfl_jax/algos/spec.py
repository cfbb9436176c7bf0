"""What distinguishes one federated algorithm from another, as data.

Every algorithm (HierFedLoRA, its ablations, FedLoRA, HetLoRA) runs through the
same round loop (:mod:`hfl_jax.algos.round`); an :class:`AlgoSpec` says how
devices are grouped, how each group's (depth, tau) arm is chosen, and how
updates are aggregated.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AlgoSpec:
    name: str
    grouping: str                   # "kl" (greedy K-means on label KL) | "random" | "single" (one group)
    num_groups: int
    selection: str                  # "rucb" (bandit over arms) | "fixed"
    depths: tuple[int, ...]         # arm grid: fine-tuning depths
    taus: tuple[int, ...]           # arm grid: intra-group aggregations per global round
    fixed_arm: tuple[int, int] | None = None   # (depth, tau) when selection == "fixed"
    aggregator: str = "fedavg"      # "fedavg" | "hetlora" (zero-padded ranks, sparsity weights)
    hierarchical: bool = True       # groups aggregate at an edge node, then globally (cloud hop counted)

    def __post_init__(self):
        if self.grouping not in ("kl", "random", "single"):
            raise ValueError(f"unknown grouping {self.grouping!r}")
        if self.selection not in ("rucb", "fixed"):
            raise ValueError(f"unknown selection {self.selection!r}")
        if self.selection == "fixed" and self.fixed_arm is None:
            raise ValueError("selection 'fixed' needs fixed_arm")


def default_depths(num_layers: int) -> tuple[int, ...]:
    """1, 2, 4, ... below L, and L (e.g. L=6 -> (1, 2, 4, 6); L=12 -> (1, 2, 4, 8, 12))."""
    out, d = [], 1
    while d < num_layers:
        out.append(d)
        d *= 2
    return tuple(out) + (num_layers,)
