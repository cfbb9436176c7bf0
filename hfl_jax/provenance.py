"""Which code ran a run: one line per start and resume in the run directory's ``provenance.jsonl``.

A run that is resumed under other code (edited package sources, another jax) mixes two code versions in
one curve, which is what a study must not do (a bf16 run's bits move with its backward products). Each
line records the package version, ``source`` (a hash of every ``.py`` file of the imported ``hfl_jax``
package: what decides the run's numbers, with or without git), the git commit of the checkout the package
was imported from and ``dirty`` (a hash of the uncommitted changes to tracked files under the package,
``None`` when clean; both ``None`` outside a git checkout or without ``git``), jax/jaxlib/flax/optax
versions, the backend, device and process counts, Python and the host. On resume :func:`changes` compares
the new line with the run's first and the driver warns; commits that touch nothing in the package (results,
docs) change nothing it compares.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

FILE = "provenance.jsonl"
# what decides a run's numbers (the commit, host, time and Python build do not, on their own)
CODE_KEYS = ("hfl_jax", "source", "jax", "jaxlib", "flax", "optax", "backend")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=4)
def source_hash(package_dir: str) -> str:
    """sha256 (first 16 hex digits) over the package's ``.py`` files: their paths and contents, sorted."""
    h = hashlib.sha256()
    root = Path(package_dir)
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def git_state(package_dir: str) -> tuple[str | None, str | None]:
    """(commit, dirty) of the git checkout holding ``package_dir`` as tracked files; ``dirty`` is a hash of
    ``git diff HEAD`` under ``package_dir`` (``None``: no uncommitted change). ``(None, None)`` when the
    package is not tracked there (not a checkout, or an installed copy inside one) or ``git`` is missing.
    Takes no index lock (``GIT_OPTIONAL_LOCKS=0``), so a concurrent ``git commit`` is never disturbed."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", package_dir, *args], capture_output=True, timeout=10, check=True,
                              env=env).stdout
    try:
        git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "HEAD").decode().strip()
        diff = git("diff", "HEAD", "--binary", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, (hashlib.sha256(diff).hexdigest()[:16] if diff else None)


def code_record() -> dict:
    """The code and platform this process runs: versions, source hash, git state, backend, host."""
    import jax

    import hfl_jax

    package = str(Path(hfl_jax.__file__).resolve().parent)
    commit, dirty = git_state(package)
    return {"hfl_jax": hfl_jax.__version__, "source": source_hash(package), "git": commit, "dirty": dirty,
            "jax": jax.__version__, "jaxlib": _version("jaxlib"), "flax": _version("flax"),
            "optax": _version("optax"), "backend": jax.default_backend(), "devices": jax.device_count(),
            "processes": jax.process_count(), "python": platform.python_version(), "host": platform.node()}


def changes(first: dict, now: dict) -> list[str]:
    """``key: old -> new`` for every :data:`CODE_KEYS` entry that differs between two records."""
    return [f"{k}: {first.get(k)} -> {now.get(k)}" for k in CODE_KEYS if first.get(k) != now.get(k)]


def read(run_dir: str | Path) -> list[dict]:
    """The run's provenance lines, oldest first (``[]`` for runs made before this file existed); a line
    that does not parse (a write cut short) is skipped."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [x for x in out if isinstance(x, dict)]


def append(run_dir: str | Path, event: str, round_: int, record: dict | None = None, *,
           fresh: bool = False) -> list[str]:
    """Appends ``{event, round, time, **code_record()}`` to the run's file (``fresh``: replaces the file, for
    a run that starts over from round 0) and returns :func:`changes` against the run's first line (empty
    for a fresh file or unchanged code)."""
    earlier = [] if fresh else read(run_dir)
    now = {"event": event, "round": int(round_),
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           **(record if record is not None else code_record())}
    with open(Path(run_dir) / FILE, "w" if fresh else "a") as f:
        f.write(json.dumps(now) + "\n")
    return changes(earlier[0], now) if earlier else []
