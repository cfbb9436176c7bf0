"""The simulation environment: everything a run keeps fixed between rounds.

Built once by the driver from the config (and rebuilt identically on resume);
algorithms read it and never change it. What a device does per round and what
crosses the links is the :class:`~hfl_jax.fed.cost.Workload`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

from hfl_jax.fed.cost import Workload
from hfl_jax.fed.device_axis import DeviceAxis
from hfl_jax.models.encoder import EncoderModel


@dataclasses.dataclass(frozen=True, eq=False)
class Env:
    """The fixed part of a run (not checkpointed; rebuilt from the config)."""
    model: EncoderModel
    base: Any                          # frozen parameters (no head), placed on the accelerators
    initial: Any                       # {"lora": LoRA, "head": ...}: the global model before round 1
    assignment: np.ndarray             # [N] group of each device
    # per group: [S] device ids, -1 for padding slots (S: the largest group's size, or with
    # train.group_padding: exact each group's own)
    group_slots: tuple
    group_data: tuple                  # per group: DeviceData with S slots, placed on the device axis
    counts: np.ndarray                 # [N] training examples per device
    profiles: dict                     # DeviceProfile arrays [N]: flops, up_bw, down_bw, memory
    axis: DeviceAxis
    optimizer: optax.GradientTransformation   # the device optimizer (fresh each local round)
    workload: Workload
    key: jax.Array                     # experiment key
    seed: int
    n_max: int                         # most examples any device holds
    participation: float = 1.0         # fraction of each group sampled per round
    availability: float = 1.0          # probability that a sampled device is available
    probe_data: tuple | None = None    # per group: DeviceData of the devices' held-out probe examples (or None)
    probe_n_max: int = 0               # most probe examples any device holds
    probe_counts: np.ndarray | None = None   # [N] held-out probe examples per device (host), with probe_data
    # Sequence packing of training steps (hfl_jax.data.packing): row length L, 0 = off; then
    # group_lengths holds per group the real tokens of every row, [S, n_max] int (host numpy).
    pack_row_len: int = 0
    group_lengths: tuple = ()
    pack_rows: int = 0                 # rows of every packed round (data.pack_rows: run); 0: each round's own
    shared_depth: bool = False         # one group-round program for every depth (train.depth_program: shared)

    @property
    def num_groups(self) -> int:
        return len(self.group_slots)

    @property
    def num_devices(self) -> int:
        return len(self.counts)
