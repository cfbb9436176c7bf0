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
      memory_budget: bytes per accelerator that one mapped call may use when
        ``chunk_size`` is ``None``; ``None`` reads the accelerator's free memory
        (:func:`free_device_bytes`: GPU/TPU; on CPU there is none, so CPU calls are
        never chunked automatically). The chunk is then :func:`choose_chunk_size`
        of :func:`estimate_bytes` of one device's function (see there).
    """

    mesh: Mesh | None = None
    chunk_size: int | None = None
    memory_budget: int | None = None

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
            chunk_size = self.chunk_size or self._auto_chunk(fn, args, in_axes, m)
            if not chunk_size or m <= chunk_size:
                args = [self.constrain(a) if ax == 0 else a for a, ax in zip(args, in_axes)]
                return self.constrain(vfn(*args))
            if m % chunk_size:
                raise ValueError(f"{m} device slots are not a multiple of chunk_size={chunk_size}; "
                                 f"pad with DeviceAxis.padded_size")
            n_chunks = m // chunk_size
            split = lambda x: x.reshape(n_chunks, chunk_size, *x.shape[1:])
            chunked = [jax.tree.map(split, a) for a, ax in zip(args, in_axes) if ax == 0]

            def one_chunk(chunk_args):
                it = iter(chunk_args)
                full = [self.constrain(next(it)) if ax == 0 else a for a, ax in zip(args, in_axes)]
                return self.constrain(vfn(*full))

            out = jax.lax.map(one_chunk, chunked)
            return jax.tree.map(lambda x: x.reshape(m, *x.shape[2:]), out)

        return mapped

    def _auto_chunk(self, fn: Callable, args: Sequence[Any], in_axes: Sequence[int | None], m: int) -> int | None:
        """The chunk size for ``m`` slots when none is set: ``None`` (no chunking) without a budget."""
        budget = self.memory_budget if self.memory_budget is not None else free_device_bytes()
        if budget is None:
            return None
        spec = lambda x, k: jax.ShapeDtypeStruct(jnp.shape(x)[k:], jnp.result_type(x))  # noqa: E731
        one = [jax.tree.map(lambda x: spec(x, 1 if ax == 0 else 0), a) for a, ax in zip(args, in_axes)]
        return choose_chunk_size(m, estimate_bytes(fn, *one), budget, self.num_shards)


# --- chunk size from memory ---------------------------------------------------------------------------

HEADROOM = 0.8  # fraction of the free accelerator memory a mapped call may plan to use


def free_device_bytes(device: jax.Device | None = None) -> int | None:
    """``bytes_limit - bytes_in_use`` of an accelerator (default: the first), ``None`` when the
    backend reports no memory statistics (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without the call)
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def choose_chunk_size(m: int, per_device_bytes: float, budget_bytes: float, num_shards: int = 1,
                      headroom: float = HEADROOM) -> int | None:
    """The largest divisor ``c`` of ``m`` (a multiple of ``num_shards``) whose ``c / num_shards``
    devices per accelerator fit in ``headroom * budget_bytes``; ``None`` when all ``m`` fit (no
    chunking). At least ``num_shards`` (one device per accelerator) even if that does not fit."""
    per_shard = max(1, int(headroom * budget_bytes // max(per_device_bytes, 1)))
    if m <= per_shard * num_shards:
        return None
    fits = [c for c in range(num_shards, m, num_shards) if m % c == 0 and c // num_shards <= per_shard]
    return max(fits) if fits else num_shards


def _bytes(v) -> int:
    aval = getattr(v, "aval", None)
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    try:
        return math.prod(shape) * jnp.dtype(dtype).itemsize
    except TypeError:  # extended dtypes (PRNG keys): negligible
        return 0


def _peak_bytes(jaxpr) -> int:
    """Peak of the bytes live at once while ``jaxpr`` runs its equations in order, not counting its
    inputs; an equation holding sub-jaxprs (scan, cond, pjit, remat, custom rules) adds their peak."""
    from jax.extend import core as jcore

    last = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                last[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            last[v] = len(jaxpr.eqns)
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    cur = peak = 0
    for i, eqn in enumerate(jaxpr.eqns):
        inner = 0
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    inner = max(inner, _peak_bytes(sub))
        outs = sum(_bytes(v) for v in eqn.outvars)
        peak = max(peak, cur + inner + outs)
        cur += sum(_bytes(v) for v in eqn.outvars if last.get(v, -1) > i)
        dead = {v for v in eqn.invars if isinstance(v, jcore.Var) and last.get(v) == i and v not in inputs}
        cur -= sum(_bytes(v) for v in dead)
    return peak


def estimate_bytes(fn: Callable, *args) -> int:
    """An upper estimate of the memory one call of ``fn(*args)`` needs beyond its arguments: the
    peak of live intermediate values of its jaxpr (traced, not compiled; a gradient's stored
    residuals are live from the forward to the backward pass). XLA fuses elementwise chains and
    reuses buffers, so its peak is lower (``tests/test_chunk_size.py`` checks the bound)."""
    return _peak_bytes(jax.make_jaxpr(fn)(*args).jaxpr)
