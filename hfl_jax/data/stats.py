"""Label-distribution statistics, pure numpy (no plotting, no hfl_jax imports).

The one KL divergence of the project: the partition reports (:mod:`hfl_jax.data.report`, which
re-exports these names) and the grouping objective (:mod:`hfl_jax.algos.grouping`) both use it.
"""

from __future__ import annotations

import numpy as np

#: Added to every probability before normalising, so KL is finite when a class is absent
#: globally; a device's own zero classes contribute 0 * log(...) = 0 regardless.
KL_EPS = 1e-12


def smooth(p: np.ndarray, eps: float = KL_EPS) -> np.ndarray:
    """``(p + eps) / (1 + K eps)`` along the last axis (a distribution stays one)."""
    return (p + eps) / (1.0 + p.shape[-1] * eps)


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = KL_EPS) -> np.ndarray:
    """KL(p || q) along the last axis, in nats, after smoothing both with `eps` (:func:`smooth`).

    p: [..., K] and q: [K] probability vectors. The one KL of the project (partition reports,
    the grouping objective in :mod:`hfl_jax.algos.grouping`).
    """
    ps, qs = smooth(p, eps), smooth(q, eps)
    return np.sum(ps * np.log(ps / qs), axis=-1)


__all__ = ["KL_EPS", "kl_divergence", "smooth"]
