"""Which code ran a run: one line per start and resume in the run directory's ``provenance.jsonl``.

A run that is resumed under other code (another commit, uncommitted edits, another jax) mixes two code
versions in one curve, which is what a study must not do (a bf16 run's bits move with its backward
products). Each line records the package version, the git commit of the checkout the package was
imported from (``None`` outside a git checkout, or without ``git``) with a ``dirty`` flag for uncommitted
changes under the package, jax/jaxlib/flax/optax versions, the backend and its device count, Python and
the host. On resume :func:`changes` compares the new line with the run's first and the driver warns.
"""
from __future__ import annotations

import datetime
import functools
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

FILE = "provenance.jsonl"
# what decides a run's numbers (host, time and Python build do not, on their own)
CODE_KEYS = ("hfl_jax", "git", "dirty", "jax", "jaxlib", "flax", "optax", "backend")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_state(package_dir: str) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding ``package_dir``; ``(None, None)`` when it is not in
    one or ``git`` is missing. ``dirty``: uncommitted changes under ``package_dir`` (tracked files)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", package_dir, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def code_record() -> dict:
    """The code and platform this process runs: versions, git state, backend, device count, host."""
    import jax

    import hfl_jax

    commit, dirty = git_state(str(Path(hfl_jax.__file__).resolve().parent))
    return {"hfl_jax": hfl_jax.__version__, "git": commit, "dirty": dirty, "jax": jax.__version__,
            "jaxlib": _version("jaxlib"), "flax": _version("flax"), "optax": _version("optax"),
            "backend": jax.default_backend(), "devices": jax.device_count(), "processes": jax.process_count(),
            "python": platform.python_version(), "host": platform.node()}


def changes(first: dict, now: dict) -> list[str]:
    """``key: old -> new`` for every :data:`CODE_KEYS` entry that differs between two records."""
    return [f"{k}: {first.get(k)} -> {now.get(k)}" for k in CODE_KEYS if first.get(k) != now.get(k)]


def read(run_dir: str | Path) -> list[dict]:
    """The run's provenance lines, oldest first (``[]`` for runs made before this file existed)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append(run_dir: str | Path, event: str, round_: int, record: dict | None = None) -> list[str]:
    """Appends ``{event, round, time, **code_record()}`` to the run's file and returns :func:`changes`
    against the run's first line (empty for a new run or unchanged code)."""
    earlier = read(run_dir)
    now = {"event": event, "round": int(round_),
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           **(record if record is not None else code_record())}
    with open(Path(run_dir) / FILE, "a") as f:
        f.write(json.dumps(now) + "\n")
    return changes(earlier[0], now) if earlier else []
