"""The simulated-device axis, in one place: vmap, chunking and sharding over accelerators.

Algorithm code maps a per-device function with :meth:`DeviceAxis.map` and
places per-device arrays with :meth:`DeviceAxis.put`; it never mentions meshes
or ``PartitionSpec`` (the drjax idea). With one process or many
(``jax.distributed.initialize``) the same code runs: arrays are built with
``jax.make_array_from_callback`` from host data every process holds, and results
that the host reads are replicated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "devices"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"devices"`` over all (global) accelerators."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (AXIS,))


@dataclasses.dataclass(frozen=True)
class DeviceAxis:
    """How the simulated-device axis maps onto hardware.

    Attributes:
      mesh: 1-D mesh of accelerators (``None``: no sharding, default device).
      chunk_size: at most this many simulated devices are vmapped at once;
        larger groups run as a ``lax.map`` over chunks inside the same compiled
        call (bounded activation memory, identical results). Must be a multiple
        of the mesh size.
    """

    mesh: Mesh | None = None
    chunk_size: int | None = None

    def __post_init__(self):
        if self.chunk_size is not None:
            if self.chunk_size < 1:
                raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
            if self.chunk_size % self.num_shards:
                raise ValueError(f"chunk_size={self.chunk_size} must be a multiple of the {self.num_shards} "
                                 f"accelerators it is sharded over")

    @property
    def num_shards(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def padded_size(self, m: int) -> int:
        """Number of device slots for ``m`` simulated devices (padding slots carry weight 0)."""
        unit = self.chunk_size if (self.chunk_size and m > self.chunk_size) else self.num_shards
        return max(unit, int(math.ceil(m / unit)) * unit)

    # --- placement ---------------------------------------------------------------------------------

    def _sharding(self, spec: P):
        return None if self.mesh is None else NamedSharding(self.mesh, spec)

    def _place(self, tree: Any, spec: P) -> Any:
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        sharding = self._sharding(spec)

        def put_one(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        return jax.tree.map(put_one, tree)

    def put(self, tree: Any) -> Any:
        """Host arrays with a leading device axis -> arrays sharded along it."""
        return self._place(tree, P(AXIS))

    def replicate(self, tree: Any) -> Any:
        """Host (or device) arrays -> fully replicated arrays."""
        return self._place(tree, P())

    def constrain(self, tree: Any, sharded: bool = True) -> Any:
        """Inside jit: pin arrays to device-axis sharding (``sharded``) or replication."""
        if self.mesh is None:
            return tree
        s = self._sharding(P(AXIS) if sharded else P())
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, s), tree)

    # --- mapping -----------------------------------------------------------------------------------

    def map(self, fn: Callable, in_axes: Sequence[int | None]) -> Callable:
        """``fn`` mapped over the device axis of the arguments whose ``in_axes`` is 0.

        Outputs get a leading device axis. Use inside ``jax.jit``.
        """
        vfn = jax.vmap(fn, in_axes=tuple(in_axes))

        def mapped(*args):
            mapped_args = [a for a, ax in zip(args, in_axes) if ax == 0]
            m = jax.tree.leaves(mapped_args)[0].shape[0]
            if not self.chunk_size or m <= self.chunk_size:
                args = [self.constrain(a) if ax == 0 else a for a, ax in zip(args, in_axes)]
                return self.constrain(vfn(*args))
            if m % self.chunk_size:
                raise ValueError(f"{m} device slots are not a multiple of chunk_size={self.chunk_size}; "
                                 f"pad with DeviceAxis.padded_size")
            n_chunks = m // self.chunk_size
            split = lambda x: x.reshape(n_chunks, self.chunk_size, *x.shape[1:])
            chunked = [jax.tree.map(split, a) for a, ax in zip(args, in_axes) if ax == 0]

            def one_chunk(chunk_args):
                it = iter(chunk_args)
                full = [self.constrain(next(it)) if ax == 0 else a for a, ax in zip(args, in_axes)]
                return self.constrain(vfn(*full))

            out = jax.lax.map(one_chunk, chunked)
            return jax.tree.map(lambda x: x.reshape(m, *x.shape[2:]), out)

        return mapped
