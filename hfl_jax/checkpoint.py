"""Orbax checkpoints of a whole run: the global adapters (array tree) and the host-side state (JSON).

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed at any moment resumes from the last complete checkpoint. Host
state (bandits, clock, traffic, ranks, metrics history) is JSON, whose float
repr round-trips float64 exactly, so a resumed run is bit-identical.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def manager(directory: str | Path, keep: int) -> ocp.CheckpointManager:
    """A synchronous CheckpointManager keeping the last ``keep`` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                           create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mgr: ocp.CheckpointManager, step: int, trainable: Any, meta: dict) -> None:
    """Saves ``trainable`` (jax arrays) and ``meta`` (JSON-able) as checkpoint ``step``."""
    mgr.save(step, args=ocp.args.Composite(trainable=ocp.args.StandardSave(trainable),
                                           meta=ocp.args.JsonSave(meta)), force=True)
    mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, like: Any, step: int | None = None) -> tuple[int, Any, dict]:
    """``(step, trainable, meta)`` of ``step`` (default: the latest); ``like`` gives the tree structure."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {mgr.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = mgr.restore(step, args=ocp.args.Composite(trainable=ocp.args.StandardRestore(abstract),
                                                    meta=ocp.args.JsonRestore()))
    return step, out["trainable"], out["meta"]


def to_json(x: Any) -> Any:
    """numpy scalars/arrays and tuples -> JSON-able Python values (exact for float64)."""
    if isinstance(x, dict):
        return {k: to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
