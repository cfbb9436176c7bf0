"""Orbax checkpoints of a whole run: the global adapters (array tree) and the host-side state (JSON).

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed at any moment resumes from the last complete checkpoint. Host
state (bandits, clock, traffic, ranks, metrics history) is JSON, whose float
repr round-trips float64 exactly, so a resumed run is bit-identical.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

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
    jax.block_until_ready(out["trainable"])   # a bad array file fails here, not later in the run
    return step, out["trainable"], out["meta"]


# Files of a checkpoint step that orbax writes as JSON (item metadata, array metadata, our meta item).
_JSON_NAMES = ("_CHECKPOINT_METADATA", "_METADATA", "metadata", "_sharding")


def _messages(exc: BaseException) -> list[str]:
    """The messages of ``exc`` and of every exception it was raised from, outermost first."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return out


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def diagnose(step_dir: Path, exc: BaseException) -> str:
    """One line naming the file of checkpoint ``step_dir`` that made its restore fail, and why.

    JSON files are checked directly; for array data the file is taken from tensorstore's
    message (``local file "..."``, or the one data file whose size the message reports)."""
    step_dir = Path(step_dir)
    rel = lambda f: f.relative_to(step_dir.parent).as_posix()
    files = sorted(f for f in step_dir.rglob("*") if f.is_file())
    for f in files:
        if f.name in _JSON_NAMES or f.parent.name == "array_metadatas":
            try:
                json.loads(f.read_bytes().decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                return f"{rel(f)} is not valid JSON ({_short(str(e), 80)}): truncated or corrupt"
    messages = _messages(exc)
    inner = next((m for m in reversed(messages) if len(m) < 1000), messages[-1] if messages else "")
    named = [Path(p) for m in messages for p in re.findall(r'local file "([^"]+)"', m)]
    named = [p for p in named if p.is_file() or not p.exists()]
    size = re.search(r"value of size (\d+)", " ".join(messages))
    if not named and size:
        named = [f for f in files if f.stat().st_size == int(size.group(1))][:1]
    where = rel(named[-1]) if named and step_dir in named[-1].parents else f"{step_dir.name}/"
    return f"{where} is unreadable ({_short(inner)}): truncated or corrupt"


def _move_aside(step_dir: Path) -> Path:
    """Moves a bad checkpoint step to ``<checkpoints>.corrupt/<step>[.n]`` (kept for inspection)."""
    dest_root = step_dir.parent.with_name(step_dir.parent.name + ".corrupt")
    dest_root.mkdir(parents=True, exist_ok=True)
    dest, n = dest_root / step_dir.name, 1
    while dest.exists():
        dest, n = dest_root / f"{step_dir.name}.{n}", n + 1
    shutil.move(str(step_dir), str(dest))
    return dest


def restore_newest_good(directory: str | Path, keep: int, like: Any,
                        report: Callable[[str], None]) -> tuple[int, Any, dict] | None:
    """``(step, trainable, meta)`` of the newest checkpoint in ``directory`` that restores cleanly,
    or None when there is none. Every newer checkpoint that failed to restore is then moved aside to
    ``<directory>.corrupt/`` (never deleted) and ``report`` gets one line naming its bad file.
    When no checkpoint restores at all, nothing is moved and a RuntimeError says why: a failure
    shared by every step is far more likely a changed config (other shapes) than corruption."""
    directory = Path(directory)
    mgr = manager(directory, keep)
    failed = []
    try:
        for step in sorted(mgr.all_steps(), reverse=True):
            try:
                found = restore(mgr, like, step)
            except Exception as e:  # noqa: BLE001 - any failure to read a step means: try the previous one
                failed.append((step, diagnose(directory / str(step), e)))
                continue
            for bad, why in failed:
                if jax.process_index() == 0:
                    dest = _move_aside(directory / str(bad))
                    report(f"skipped checkpoint {bad}: {why}; moved it to {dest}")
                else:
                    report(f"skipped checkpoint {bad}: {why}")
            return found
        if failed:
            step, why = failed[0]
            raise RuntimeError(f"no checkpoint in {directory} restores (newest, {step}: {why}); nothing was "
                               f"moved. If config.yaml was edited (model, lora, algorithm), restore it")
        return None
    finally:
        mgr.close()


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
