"""Device grouping for HierFedLoRA (arXiv 2503.21213), host-side numpy.

HierFedLoRA splits the N devices into K groups; each group aggregates its
devices' LoRA adapters frequently and the groups are aggregated globally less
often. Groups should (a) look IID, i.e. each group's pooled label
distribution should be close to the global one, so that the intra-group
aggregate behaves like an IID update, and (b) not mix very fast and very slow
devices, so that a group does not wait on its stragglers.

The exact objective of the paper is not public in what we have; the form
below is our reconstruction (see docs/algorithm.md, "## Grouping"):

    J(g) = sum_k (n_k / n) * KL(q_k || q)
           + lam * sum_k (m_k / N) * std_{i in k}(log s_i)
           + balance * sum_k K * (n_k / n - 1 / K)^2

with n_k the samples and m_k the devices of group k, q_k the group's pooled
label distribution, q the global one (both epsilon-smoothed, ``KL_EPS``) and
s_i the device speeds. The data term is the mutual information between the
group index and the label (up to smoothing). The optional sample-balance term
(``balance``, config ``algorithm.sample_balance``; 0 by default = the paper's
objective) keeps groups from differing much in samples: on skewed partitions the
data term alone can put most samples in one group (group sizes bound devices, not
samples). It is K times the squared deviation of each group's sample share from 1/K.

The same greedy K-means runs on another per-device signal through a distance to
the global signal (:class:`Signal`): :func:`group_by_embedding` replaces KL(q_k || q)
by the cosine distance between a group's sample-weighted mean embedding and the
global one (docs/algorithm.md, "Grouping without label histograms").

All functions are pure: they take explicit seeds and return new arrays.
"""

from __future__ import annotations

import numbers
from typing import Callable, NamedTuple

import numpy as np

from hfl_jax.data.stats import kl_divergence

# A refinement step must lower the objective by more than this (relative) to
# be taken; guards against cycling on floating-point noise.
_REL_TOL = 1e-12


class _GroupStats(NamedTuple):
  """Sufficient statistics of a grouping; the objective is a sum over groups."""
  counts: np.ndarray  # [K, C] float64, pooled label counts
  sizes: np.ndarray  # [K] int64, number of devices
  s1: np.ndarray  # [K] float64, sum of log-speeds
  s2: np.ndarray  # [K] float64, sum of squared log-speeds


# --------------------------------------------------------------------------
# Objective pieces (vectorised over any leading axes).
# --------------------------------------------------------------------------


# Smoothing of the grouping objective's KL (hfl_jax.data.stats.kl_divergence): larger than the
# reports' so the greedy search never sees log(0)-sized terms; hand-computed (unsmoothed) KLs
# agree to ~1e-5.
KL_EPS = 1e-6


def _global_dist(label_counts: np.ndarray) -> np.ndarray:
  """Global label distribution q [C]."""
  tot = label_counts.sum(axis=0)
  n = tot.sum()
  return tot / n if n > 0 else np.full_like(tot, 1.0 / tot.size)


def _kl_rows(counts: np.ndarray, q: np.ndarray) -> np.ndarray:
  """KL(q_row || q) for label-count rows [..., C] -> [...] (smoothed,
  :func:`hfl_jax.data.stats.kl_divergence`); 0 for empty rows."""
  n = counts.sum(axis=-1, keepdims=True)
  kl = kl_divergence(np.divide(counts, n, out=np.zeros_like(counts), where=n > 0), q, eps=KL_EPS)
  return np.where(n[..., 0] > 0, kl, 0.0)


def _data_term(counts: np.ndarray, sig: "Signal") -> np.ndarray:
  """(n_k / n) * distance_k per group (labels: KL(q_k || q)); pooled rows [..., D] -> [...]."""
  if sig.n_total <= 0:
    return np.zeros(counts.shape[:-1])
  return sig.samples(counts) / sig.n_total * sig.distance(counts)


def _balance_term(counts: np.ndarray, sig: "Signal", k: int) -> np.ndarray:
  """K * (n_k / n - 1 / K)^2 per group; pooled rows [..., D] -> [...]."""
  if sig.n_total <= 0:
    return np.zeros(counts.shape[:-1])
  return k * (sig.samples(counts) / sig.n_total - 1.0 / k) ** 2


class Signal(NamedTuple):
  """What the greedy K-means groups on: per-device rows that add up when devices are pooled.

  ``x`` [N, D] float64 rows; ``samples(rows [..., D]) -> [...]`` the samples behind pooled
  rows; ``distance(rows [..., D]) -> [...]`` the divergence of pooled rows from the global
  pool (0 for rows without samples); ``n_total`` all samples. The data term of a group is
  ``samples / n_total * distance``.
  """
  x: np.ndarray
  samples: Callable[[np.ndarray], np.ndarray]
  distance: Callable[[np.ndarray], np.ndarray]
  n_total: float


def label_signal(x: np.ndarray) -> Signal:
  """Label counts [N, C] with KL(q_k || q) (the module docstring's objective)."""
  q = _global_dist(x)
  return Signal(x, lambda rows: rows.sum(axis=-1), lambda rows: _kl_rows(rows, q), float(x.sum()))


def _cosine_rows(rows: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """1 - cos(row, ref) for rows [..., H] -> [...]; 0 for zero rows (or a zero ``ref``)."""
  norms = np.linalg.norm(rows, axis=-1) * np.linalg.norm(ref)
  dots = rows @ ref
  return np.where(norms > 0, 1.0 - dots / np.where(norms > 0, norms, 1.0), 0.0)


def embedding_signal(embeddings: np.ndarray, samples: np.ndarray) -> Signal:
  """Mean embeddings [N, H] weighted by samples [N]: rows ``[n_i e_i, n_i]`` pool to a group's
  sample sum, and the distance is the cosine distance of the group's mean embedding to the
  global mean embedding (cosine ignores the scale, so sums serve as means)."""
  e = np.asarray(embeddings, np.float64)
  w = np.asarray(samples, np.float64)
  if e.ndim != 2 or w.shape != (e.shape[0],):
    raise ValueError(f"embeddings must be [N, H] and samples [N], got {e.shape} and {w.shape}")
  if not np.all(np.isfinite(e)) or not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError("embeddings must be finite and samples finite and non-negative")
  x = np.concatenate([e * w[:, None], w[:, None]], axis=1)
  ref = x[:, :-1].sum(axis=0)
  return Signal(x, lambda rows: rows[..., -1], lambda rows: _cosine_rows(rows[..., :-1], ref), float(w.sum()))


def _speed_term(sizes, s1, s2, n_devices: int) -> np.ndarray:
  """(m_k / N) * std(log-speed) per group, from sums; all [...] -> [...]."""
  sizes = np.asarray(sizes, np.float64)
  safe = np.maximum(sizes, 1.0)
  var = np.maximum(s2 / safe - (s1 / safe) ** 2, 0.0)
  return np.where(sizes > 0, sizes / n_devices * np.sqrt(var), 0.0)


def _stats(x: np.ndarray, logs: np.ndarray, assignment: np.ndarray,
           k: int) -> _GroupStats:
  counts = np.zeros((k, x.shape[1]))
  np.add.at(counts, assignment, x)
  return _GroupStats(
      counts=counts,
      sizes=np.bincount(assignment, minlength=k).astype(np.int64),
      s1=np.bincount(assignment, weights=logs, minlength=k),
      s2=np.bincount(assignment, weights=logs**2, minlength=k))


# --------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------


def _check_counts(label_counts) -> np.ndarray:
  x = np.asarray(label_counts, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(
        f"label_counts must have shape [N, C] with N, C >= 1, got {x.shape}")
  if not np.all(np.isfinite(x)) or np.any(x < 0):
    raise ValueError("label_counts must be finite and non-negative")
  return x


def _check_k(num_groups, n: int) -> int:
  if (not isinstance(num_groups, numbers.Integral)
      or isinstance(num_groups, bool)):
    raise ValueError(f"num_groups must be an int, got {num_groups!r}")
  k = int(num_groups)
  if k < 1:
    raise ValueError(f"num_groups must be >= 1, got {k}")
  if k > n:
    raise ValueError(
        f"num_groups={k} exceeds the number of devices N={n}")
  return k


def _log_speeds(speeds, n: int) -> np.ndarray:
  if speeds is None:
    return np.zeros(n)
  s = np.asarray(speeds, dtype=np.float64)
  if s.shape != (n,):
    raise ValueError(f"speeds must have shape [N]=({n},), got {s.shape}")
  if not np.all(np.isfinite(s)) or np.any(s <= 0):
    raise ValueError("speeds must be finite and > 0")
  return np.log(s)


def default_size_bounds(n: int, k: int) -> tuple[int, int]:
  """Default (min_size, max_size) = (floor(N/K), ceil(N/K)): balanced groups."""
  return n // k, -(-n // k)


def _check_bounds(min_size, max_size, n: int, k: int) -> tuple[int, int]:
  lo, hi = default_size_bounds(n, k)
  lo = lo if min_size is None else int(min_size)
  hi = hi if max_size is None else int(max_size)
  if lo < 1 or hi < lo:
    raise ValueError(f"need 1 <= min_size <= max_size, got {lo}, {hi}")
  if lo * k > n or hi * k < n:
    raise ValueError(
        f"size bounds [{lo}, {hi}] cannot partition N={n} devices into "
        f"K={k} groups")
  return lo, hi


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def grouping_objective(label_counts: np.ndarray, assignment: np.ndarray, *,
                       speeds: np.ndarray | None = None, lam: float = 0.0,
                       balance: float = 0.0, num_groups: int | None = None) -> float:
  """The grouping objective J (module docstring) of an assignment.

  Args:
    label_counts: [N, C] per-device label counts (rows may be all zero).
    assignment: [N] int group index in [0, K).
    speeds: [N] positive device speeds (e.g. samples/s); None = all equal.
    lam: weight of the speed-spread term (config ``algorithm.lam``).
    balance: weight of the sample-balance term.
    num_groups: K; default ``assignment.max() + 1``.

  Returns:
    J as a python float.
  """
  rep = group_report(label_counts, assignment, speeds=speeds, lam=lam,
                     balance=balance, num_groups=num_groups)
  return rep["objective"]


def group_report(label_counts: np.ndarray, assignment: np.ndarray,
                 speeds: np.ndarray | None = None, *, lam: float = 0.0,
                 balance: float = 0.0, num_groups: int | None = None) -> dict:
  """Per-group diagnostics of an assignment.

  Args:
    label_counts: [N, C] per-device label counts.
    assignment: [N] int group index in [0, K).
    speeds: [N] positive device speeds or None.
    lam: weight of the speed term in ``objective``.
    balance: weight of the sample-balance term in ``objective``.
    num_groups: K; default ``assignment.max() + 1``.

  Returns:
    dict with numpy arrays ``sizes`` [K] (devices), ``samples`` [K],
    ``kl`` [K] (KL(q_k || q), 0 for groups without samples),
    ``speed_spread`` [K] (std of log-speed, 0 if ``speeds`` is None) and
    floats ``mean_kl`` (unweighted mean over groups), ``data_objective``
    (sum_k n_k/n KL_k), ``speed_objective`` (sum_k m_k/N spread_k),
    ``balance_objective`` (sum_k K (n_k/n - 1/K)^2) and
    ``objective`` (= data + lam * speed + balance * balance_objective).
  """
  x = _check_counts(label_counts)
  n = x.shape[0]
  a = np.asarray(assignment)
  if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f"assignment must be int of shape ({n},), got "
                     f"{a.dtype} {a.shape}")
  k = int(a.max()) + 1 if num_groups is None else int(num_groups)
  if np.any(a < 0) or np.any(a >= k):
    raise ValueError(f"assignment values must lie in [0, {k})")
  logs = _log_speeds(speeds, n)
  st = _stats(x, logs, a, k)
  sig = label_signal(x)
  kl = sig.distance(st.counts)
  data = float(_data_term(st.counts, sig).sum())
  spread_w = _speed_term(st.sizes, st.s1, st.s2, n)
  safe = np.maximum(st.sizes, 1)
  spread = np.sqrt(np.maximum(st.s2 / safe - (st.s1 / safe) ** 2, 0.0))
  speed = float(spread_w.sum())
  bal = float(_balance_term(st.counts, sig, k).sum())
  return {
      "sizes": st.sizes,
      "samples": st.counts.sum(axis=1),
      "kl": kl,
      "speed_spread": spread,
      "mean_kl": float(kl.mean()),
      "data_objective": data,
      "speed_objective": speed,
      "balance_objective": bal,
      "objective": data + float(lam) * speed + float(balance) * bal,
  }


def random_groups(num_devices: int, num_groups: int, seed: int = 0
                  ) -> np.ndarray:
  """Balanced random assignment [N] int (sizes floor/ceil(N/K)); ablation."""
  k = _check_k(num_groups, int(num_devices))
  rng = np.random.default_rng(seed)
  a = np.empty(num_devices, np.int64)
  a[rng.permutation(num_devices)] = np.arange(num_devices) % k
  return a


def group_devices(label_counts: np.ndarray, num_groups: int, *,
                  speeds: np.ndarray | None = None, lam: float = 0.0,
                  balance: float = 0.0,
                  min_size: int | None = None, max_size: int | None = None,
                  max_iters: int = 100, seed: int = 0) -> np.ndarray:
  """Groups devices so each group is near-IID and speed-homogeneous.

  Greedy K-means on the objective J of the module docstring:
    1. seed: the K most skewed devices open the K groups. Skew is
       n_i * KL(p_i || q), the device's own weight in the data term, so a
       tiny single-class device does not outrank a large skewed one; ties
       are broken by a seeded random key;
    2. greedy fill: the rest, most skewed first, each join the group whose
       term grows least, subject to the size bounds (a group may not exceed
       ``max_size``; once the remaining devices are just enough to lift all
       groups to ``min_size``, only groups below it are eligible); ties go to
       the smallest, then lowest-index group;
    3. refine: sweeps over devices in seeded random order; each device takes
       its best improving single move (within bounds) or pairwise swap. Stops
       after a sweep without improvement or ``max_iters`` sweeps.

  Devices with zero samples add nothing to the data term, so with lam = 0
  they go to the smallest group (keeping sizes balanced); with lam > 0 they
  are placed by speed like any device.

  Args:
    label_counts: [N, C] non-negative per-device label counts.
    num_groups: K, 1 <= K <= N.
    speeds: [N] positive device speeds; None = all equal (no speed term).
    lam: weight of the speed spread (config ``algorithm.lam``); 0 = pure data.
    balance: weight of the sample-balance term (config ``algorithm.sample_balance``).
    min_size: smallest group (no config key); default floor(N/K).
    max_size: largest group (no config key); default ceil(N/K).
    max_iters: maximum refinement sweeps.
    seed: seeds tie-breaks and sweep order; same seed -> same result.

  Returns:
    assignment [N] int64 with values in [0, K).

  Raises:
    ValueError: bad shapes, negative counts, K < 1, K > N, infeasible bounds.
  """
  x = _check_counts(label_counts)
  return _greedy_kmeans(label_signal(x), num_groups, speeds=speeds, lam=lam, balance=balance,
                        min_size=min_size, max_size=max_size, max_iters=max_iters, seed=seed)


def group_by_embedding(embeddings: np.ndarray, samples: np.ndarray, num_groups: int, *,
                       speeds: np.ndarray | None = None, lam: float = 0.0, balance: float = 0.0,
                       min_size: int | None = None, max_size: int | None = None,
                       max_iters: int = 100, seed: int = 0) -> np.ndarray:
  """:func:`group_devices` on mean embeddings instead of label counts (no labels uploaded).

  The data term of a group is (n_k / n) * (1 - cos(e_k, e)), e_k the group's
  sample-weighted mean embedding and e the global one; seeds, greedy fill and
  refinement are those of :func:`group_devices` with this term.

  Args:
    embeddings: [N, H] each device's mean frozen-model embedding
      (:func:`hfl_jax.fed.signals.mean_embeddings`); rows of empty devices are ignored.
    samples: [N] each device's number of examples (its weight in the pooled mean).
    num_groups, speeds, lam, balance, min_size, max_size, max_iters, seed: as
      :func:`group_devices`.

  Returns:
    assignment [N] int64 with values in [0, K).
  """
  return _greedy_kmeans(embedding_signal(embeddings, samples), num_groups, speeds=speeds, lam=lam,
                        balance=balance, min_size=min_size, max_size=max_size, max_iters=max_iters,
                        seed=seed)


def _greedy_kmeans(sig: Signal, num_groups, *, speeds, lam, balance, min_size, max_size, max_iters,
                   seed) -> np.ndarray:
  """The procedure of :func:`group_devices` on any :class:`Signal`."""
  x = sig.x
  n = x.shape[0]
  k = _check_k(num_groups, n)
  logs = _log_speeds(speeds, n)
  lo, hi = _check_bounds(min_size, max_size, n, k)
  if k == 1:
    return np.zeros(n, np.int64)
  lam, balance = float(lam), float(balance)
  rng = np.random.default_rng(seed)

  def term(counts, sizes, s1, s2):
    out = _data_term(counts, sig)
    if lam != 0.0:
      out = out + lam * _speed_term(sizes, s1, s2, n)
    if balance != 0.0:
      out = out + balance * _balance_term(counts, sig, k)
    return out

  # 1-2. Seed with the most skewed devices, then greedy fill. Sample-weighted
  # skew: ordering by plain KL made the greedy start worse than random on
  # Dirichlet(0.1) splits (tiny pure devices first, big ones placed late).
  skew = sig.samples(x) * sig.distance(x)
  order = np.lexsort((rng.random(n), -skew))
  a = np.full(n, -1, np.int64)
  st = _GroupStats(np.zeros((k, x.shape[1])), np.zeros(k, np.int64),
                   np.zeros(k), np.zeros(k))

  def add(i, g):
    a[i] = g
    st.counts[g] += x[i]
    st.sizes[g] += 1
    st.s1[g] += logs[i]
    st.s2[g] += logs[i] ** 2

  for g, i in enumerate(order[:k]):
    add(i, g)
  for r, i in enumerate(order[k:]):
    remaining = n - k - r
    deficit = np.maximum(lo - st.sizes, 0)
    ok = st.sizes < hi
    if remaining <= deficit.sum():
      ok &= deficit > 0
    cur = term(st.counts, st.sizes, st.s1, st.s2)
    new = term(st.counts + x[i], st.sizes + 1, st.s1 + logs[i],
               st.s2 + logs[i] ** 2)
    delta = np.where(ok, new - cur, np.inf)
    g = np.lexsort((np.arange(k), st.sizes, delta))[0]
    add(i, g)

  # 3. Refinement by single moves and pairwise swaps.
  idx = np.arange(n)
  for _ in range(max_iters):
    improved = False
    for i in rng.permutation(n):
      gi = a[i]
      cur = term(st.counts, st.sizes, st.s1, st.s2)  # [K]
      base_i = cur[gi]
      # Single moves i: gi -> g.
      if st.sizes[gi] - 1 >= lo:
        t_from = term(st.counts[gi] - x[i], st.sizes[gi] - 1,
                      st.s1[gi] - logs[i], st.s2[gi] - logs[i] ** 2)
        t_to = term(st.counts + x[i], st.sizes + 1, st.s1 + logs[i],
                    st.s2 + logs[i] ** 2)
        d_move = t_from + t_to - base_i - cur
        d_move[(st.sizes + 1 > hi) | (idx[:k] == gi)] = np.inf
      else:
        d_move = np.full(k, np.inf)
      # Swaps i <-> j for every j outside gi.
      gj = a
      dx = x - x[i]  # [N, C]: x_j - x_i
      dl = logs - logs[i]
      dl2 = logs**2 - logs[i] ** 2
      t_i = term(st.counts[gi] + dx, st.sizes[gi], st.s1[gi] + dl,
                 st.s2[gi] + dl2)
      t_j = term(st.counts[gj] - dx, st.sizes[gj], st.s1[gj] - dl,
                 st.s2[gj] - dl2)
      d_swap = np.where(gj != gi, t_i + t_j - base_i - cur[gj], np.inf)
      best_move, best_swap = int(np.argmin(d_move)), int(np.argmin(d_swap))
      tol = _REL_TOL * max(1.0, abs(float(cur.sum())))
      if min(d_move[best_move], d_swap[best_swap]) >= -tol:
        continue
      improved = True
      if d_move[best_move] <= d_swap[best_swap]:
        _move(st, x, logs, a, i, best_move)
      else:
        j = best_swap
        g2 = a[j]
        _move(st, x, logs, a, i, g2)
        _move(st, x, logs, a, j, gi)
    if not improved:
      break
  return a


def _move(st: _GroupStats, x, logs, a, i: int, g: int) -> None:
  """In-place move of device i to group g (local scratch state only)."""
  src = a[i]
  st.counts[src] -= x[i]
  st.sizes[src] -= 1
  st.s1[src] -= logs[i]
  st.s2[src] -= logs[i] ** 2
  st.counts[g] += x[i]
  st.sizes[g] += 1
  st.s1[g] += logs[i]
  st.s2[g] += logs[i] ** 2
  a[i] = g
