"""Differentially private label histograms for grouping, host-side numpy.

HierFedLoRA (arXiv 2503.21213) groups devices on their label distributions, which
each device must upload. Here each device perturbs its label-count histogram
``x_i`` [C] before the upload (local DP, the server is not trusted with it):

* Laplace mechanism: adding or removing one example changes one count by 1, so the
  L1 sensitivity is 1 and ``x_i + Lap(b)^C`` with ``b = 1 / epsilon`` is
  epsilon-DP (per-coordinate std ``sqrt(2) / epsilon``);
* Gaussian mechanism: the L2 sensitivity is also 1; ``x_i + N(0, sigma^2)^C``
  with sigma from the analytic Gaussian mechanism (Balle & Wang, ICML 2018,
  Theorem 8: the smallest sigma with
  ``Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma) <= delta``)
  is (epsilon, delta)-DP for every epsilon > 0. The classic bound
  ``sqrt(2 ln(1.25/delta)) / epsilon`` (Dwork & Roth, Theorem A.1, epsilon < 1)
  is larger wherever it holds (:func:`classic_gaussian_sigma`).

The noisy histogram is then clipped at 0 and renormalised to a distribution
(post-processing: the guarantee is kept); the grouping weights it by the device's
sample count ``n_i``, which the sample-weighted aggregation reveals anyway and
which the guarantee does not cover (docs/algorithm.md, "Grouping without label
histograms"). Epsilon may differ per device; ``inf`` means no noise.

All functions are pure: noise comes from ``np.random.default_rng([seed,
SALT_GROUPING_NOISE])``.
"""
from __future__ import annotations

import math

import numpy as np

MECHANISMS = ("none", "laplace", "gaussian")

# Separates the histogram noise from the other streams drawn from a seed (the salts of
# hfl_jax.algos.stages are 1-16).
SALT_GROUPING_NOISE = 17


def _phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _analytic_delta(sigma: float, epsilon: float) -> float:
    """The smallest delta for which N(0, sigma^2) noise at L2 sensitivity 1 is (epsilon, delta)-DP
    (Balle & Wang 2018, Theorem 8)."""
    a, b = 1.0 / (2.0 * sigma), epsilon * sigma
    tail = _phi(-a - b)
    return _phi(a - b) - (math.exp(epsilon) * tail if tail > 0 else 0.0)


def _check_epsilon(epsilon, n: int | None = None) -> np.ndarray:
    eps = np.asarray(epsilon, np.float64)
    if eps.ndim > 1 or (eps.ndim == 1 and n is not None and eps.shape != (n,)):
        raise ValueError(f"epsilon must be a scalar or one per device ({n},), got shape {eps.shape}")
    if np.any(np.isnan(eps)) or np.any(eps <= 0):
        raise ValueError(f"epsilon must be > 0 (inf: no noise), got {epsilon}")
    return eps


def _check_delta(delta) -> float:
    if delta is None or not 0 < float(delta) < 1:
        raise ValueError(f"delta must be in (0, 1) for the Gaussian mechanism, got {delta}")
    return float(delta)


def laplace_scale(epsilon) -> np.ndarray:
    """Laplace scale ``b = 1 / epsilon`` (L1 sensitivity 1); 0 where epsilon is inf."""
    return 1.0 / _check_epsilon(epsilon)


def classic_gaussian_sigma(epsilon, delta: float) -> np.ndarray:
    """``sqrt(2 ln(1.25 / delta)) / epsilon`` (L2 sensitivity 1): (epsilon, delta)-DP only for
    epsilon < 1 (Dwork & Roth 2014, Theorem A.1); a reference for :func:`gaussian_sigma`."""
    return math.sqrt(2.0 * math.log(1.25 / _check_delta(delta))) / _check_epsilon(epsilon)


def gaussian_sigma(epsilon, delta: float, rel_tol: float = 1e-12) -> np.ndarray:
    """The analytic Gaussian mechanism's sigma at L2 sensitivity 1 (Balle & Wang 2018): the
    smallest sigma (to ``rel_tol``, rounded up) with :func:`_analytic_delta` <= delta; any
    epsilon > 0. Scalar or per-device epsilon -> the same shape; 0 where epsilon is inf."""
    eps = _check_epsilon(epsilon)
    delta = _check_delta(delta)

    def one(e: float) -> float:
        if math.isinf(e):
            return 0.0
        lo = hi = 1.0
        while _analytic_delta(hi, e) > delta:
            hi *= 2.0
        while _analytic_delta(lo, e) <= delta and lo > 1e-300:
            lo /= 2.0
        while hi - lo > rel_tol * hi:   # delta(sigma) decreases in sigma: keep delta(hi) <= delta
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if _analytic_delta(mid, e) <= delta else (mid, hi)
        return hi

    values, where = np.unique(eps.reshape(-1), return_inverse=True)   # one search per distinct epsilon
    return np.array([one(float(e)) for e in values])[where].reshape(eps.shape)


def noise_scale(mechanism: str, epsilon, delta: float | None = None) -> np.ndarray:
    """Per-coordinate noise scale: Laplace ``b`` or Gaussian ``sigma`` (0 for ``none`` / inf)."""
    if mechanism == "none":
        return np.zeros(np.shape(epsilon))
    if mechanism == "laplace":
        return laplace_scale(epsilon)
    if mechanism == "gaussian":
        return gaussian_sigma(epsilon, delta)
    raise ValueError(f"unknown mechanism {mechanism!r}; one of {', '.join(MECHANISMS)}")


def noisy_histograms(label_counts: np.ndarray, mechanism: str, epsilon, delta: float | None,
                     rng: np.random.Generator) -> np.ndarray:
    """``x_i + noise`` [N, C] float64 before post-processing; each device draws its own noise
    (the draws do not depend on the other devices' epsilons)."""
    x = np.asarray(label_counts, np.float64)
    n, c = x.shape
    _check_epsilon(epsilon, n)
    scale = np.broadcast_to(noise_scale(mechanism, epsilon, delta), (n,))
    if mechanism == "laplace":
        z = rng.laplace(0.0, 1.0, size=(n, c))
    elif mechanism == "gaussian":
        z = rng.standard_normal(size=(n, c))
    else:
        z = np.zeros((n, c))
    return x + scale[:, None] * z


def privatize_histograms(label_counts: np.ndarray, mechanism: str, epsilon, delta: float | None = None,
                         seed: int = 0) -> np.ndarray:
    """What each device uploads: its noisy histogram clipped at 0 and renormalised, [N, C] rows
    summing to 1 (uniform when every coordinate clipped to 0). Noise from
    ``default_rng([seed, SALT_GROUPING_NOISE])``."""
    rng = np.random.default_rng([int(seed), SALT_GROUPING_NOISE])
    y = np.maximum(noisy_histograms(label_counts, mechanism, epsilon, delta, rng), 0.0)
    tot = y.sum(axis=1, keepdims=True)
    return np.where(tot > 0, y / np.where(tot > 0, tot, 1.0), 1.0 / y.shape[1])


def private_label_counts(label_counts: np.ndarray, mechanism: str = "none", epsilon=math.inf,
                         delta: float | None = None, seed: int = 0) -> np.ndarray:
    """The counts grouping sees: ``n_i`` x the uploaded distribution (:func:`privatize_histograms`),
    ``n_i`` the device's sample count. Devices without noise (epsilon inf) keep their exact
    counts, and with no noise at all (``none`` or every epsilon inf) ``label_counts`` is returned
    as is, so grouping is bit for bit the non-private one.

    Args:
      label_counts: [N, C] non-negative label counts.
      mechanism: ``none`` | ``laplace`` | ``gaussian``.
      epsilon: scalar or [N] per-device budget, > 0 (inf: no noise).
      delta: the Gaussian mechanism's delta in (0, 1).
      seed: noise seed (with :data:`SALT_GROUPING_NOISE`).

    Returns:
      [N, C] float64 (or ``label_counts`` itself when nothing is perturbed).
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown mechanism {mechanism!r}; one of {', '.join(MECHANISMS)}")
    x = np.asarray(label_counts, np.float64)
    eps = _check_epsilon(epsilon, x.shape[0])
    if mechanism == "none" or np.all(np.isinf(eps)):
        return label_counts
    dist = privatize_histograms(x, mechanism, eps, delta, seed)
    noisy = x.sum(axis=1, keepdims=True) * dist
    return np.where(np.broadcast_to(np.isinf(eps), (x.shape[0],))[:, None], x, noisy)
