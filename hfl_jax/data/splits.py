"""Which training rows a run uses: the validation carve and the seeded training subset (host numpy).

Both objectives (:mod:`hfl_jax.objectives`) draw their rows here, so a classification run and the
same data as generation train and are tuned on the same examples.
"""
from __future__ import annotations

import numpy as np

# Salts of the seeds drawn here (the run's other salts are in hfl_jax.algos.stages).
SALT_SUBSET, SALT_VALIDATION = 14, 16


def training_rows(cfg, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train rows, validation rows)`` of a training split of ``n`` examples: the validation set
    (``data.validation_size``, drawn with ``data.validation_seed`` only, so every run seed and
    method shares it) comes out first; the seeded ``data.train_subset`` is drawn from the rest."""
    d = cfg.data
    if d.validation_size >= n:
        raise ValueError(f"data.validation_size={d.validation_size} leaves nothing to train on "
                         f"(the training split has {n} examples)")
    valid = np.sort(np.random.default_rng([d.validation_seed, SALT_VALIDATION]).choice(
        n, d.validation_size, replace=False)) if d.validation_size else np.zeros(0, np.int64)
    pool = np.setdiff1d(np.arange(n), valid)
    subset = d.train_subset
    if subset is not None and subset < len(pool):
        pool = pool[np.sort(np.random.default_rng([cfg.seed, SALT_SUBSET, 0]).choice(len(pool), subset, replace=False))]
    return pool, valid


def eval_subset(cfg, n: int) -> np.ndarray | None:
    """The seeded ``data.eval_subset`` rows of an evaluation set of ``n`` examples (``None``: all)."""
    k = cfg.data.eval_subset
    if k is None or k >= n:
        return None
    return np.sort(np.random.default_rng([cfg.seed, SALT_SUBSET, 1]).choice(n, k, replace=False))
