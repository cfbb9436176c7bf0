"""Non-IID partitioners: pure numpy functions of (labels, num_devices, seed).

Each returns a list of `num_devices` disjoint, sorted int64 index arrays whose union is
`arange(len(labels))`.

* `iid`: a random permutation cut into near-equal pieces.
* `dirichlet`: label skew, the per-class Dirichlet split of Yurochkin et al. (2019) as used
  by Wang et al. (FedMA, 2020) and Li et al. (NIID-Bench, 2021): for every class k draw
  q_k ~ Dir(alpha * 1_N) and give device i the fraction q_k[i] of class k's examples;
  devices already holding more than N/num_devices examples get no more (NIID-Bench's
  balancing). The whole draw is repeated until every device holds >= `min_samples`
  examples, at most `max_tries` times.
* `pathological`: each device holds exactly `classes_per_device` distinct classes
  (McMahan et al., 2017 style), each class split evenly among the devices holding it.
* `quantity`: quantity skew with IID labels; device sizes are `min_samples` plus a share
  of the rest drawn from Dir(beta) ('dirichlet') or a randomly permuted power law
  size_i ~ rank^-exponent ('powerlaw').
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hfl_jax.data.tasks import DataError


class PartitionError(DataError):
    """A partition could not be made with the given arguments."""


def _check(labels: np.ndarray, num_devices: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be 1-D [N], got shape {labels.shape}")
    if labels.size == 0:
        raise PartitionError("cannot partition an empty dataset (0 labels)")
    if int(num_devices) < 1:
        raise PartitionError(f"num_devices must be >= 1, got {num_devices}")
    if num_devices > labels.size:
        raise PartitionError(
            f"more devices ({num_devices}) than training examples ({labels.size}); "
            "use fewer devices or more data")
    if labels.min() < 0:
        raise PartitionError(f"labels must be non-negative class ids, found {labels.min()}")
    return labels.astype(np.int64)


def _finish(groups: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(g, dtype=np.int64)) for g in groups]


def iid(labels: np.ndarray, num_devices: int, seed: int) -> list[np.ndarray]:
    """IID split: shuffle all indices, cut into `num_devices` pieces of size N//n or N//n+1."""
    labels = _check(labels, num_devices)
    perm = np.random.default_rng(seed).permutation(labels.size)
    return _finish(np.array_split(perm, num_devices))


def dirichlet(labels: np.ndarray, num_devices: int, seed: int, alpha: float = 0.5,
              min_samples: int = 10, max_tries: int = 100) -> list[np.ndarray]:
    """Per-class Dirichlet label skew with concentration `alpha` (small alpha: more skew).

    Args:
      labels: int [N] class ids.
      num_devices: number of devices.
      seed: numpy seed; the result is a pure function of (labels, arguments).
      alpha: Dirichlet concentration, > 0.
      min_samples: every device must get at least this many examples (0 allows empty devices).
      max_tries: number of whole redraws before giving up with `PartitionError`.

    Note: with few classes and many devices a small alpha leaves devices empty with high
    probability (SST-2, 2 classes, 80 devices, alpha=0.1: about one device in five), so
    `min_samples > 0` may be infeasible there; the error says so and how to fix it.
    """
    labels = _check(labels, num_devices)
    if not alpha > 0:
        raise PartitionError(f"Dirichlet alpha must be > 0, got {alpha}")
    if min_samples < 0 or min_samples * num_devices > labels.size:
        raise PartitionError(f"min_samples={min_samples} x {num_devices} devices is not "
                             f"satisfiable with {labels.size} examples")
    if max_tries < 1:
        raise PartitionError(f"max_tries must be >= 1, got {max_tries}")
    rng = np.random.default_rng(seed)
    n, cap = labels.size, labels.size / num_devices
    classes = np.unique(labels)
    smallest = 0
    for _ in range(max_tries):
        groups: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        sizes = np.zeros(num_devices, np.int64)
        for k in classes:
            idx_k = rng.permutation(np.flatnonzero(labels == k))
            q = rng.dirichlet(np.full(num_devices, float(alpha)))
            q = np.where(sizes < cap, q, 0.0)
            total = q.sum()
            q = q / total if total > 0 else np.full(num_devices, 1.0 / num_devices)
            cuts = (np.cumsum(q) * idx_k.size).astype(np.int64)[:-1]
            for i, part in enumerate(np.split(idx_k, cuts)):
                groups[i].append(part)
                sizes[i] += part.size
        smallest = int(sizes.min())
        if smallest >= min_samples:
            return _finish([np.concatenate(g) for g in groups])
    raise PartitionError(
        f"Dirichlet partition (alpha={alpha}, {num_devices} devices, {classes.size} classes, "
        f"{n} examples) did not give every device >= {min_samples} examples in {max_tries} "
        f"draws (smallest device in the last draw: {smallest}); raise alpha, use fewer "
        f"devices, lower min_samples (0 allows empty devices) or raise max_tries")


def pathological(labels: np.ndarray, num_devices: int, seed: int,
                 classes_per_device: int = 2) -> list[np.ndarray]:
    """Pathological label skew: device i holds exactly `classes_per_device` distinct classes.

    Classes are dealt round-robin from a seeded permutation, device i getting classes
    perm[(i*c + j) % K] for j < c, so every class is held when num_devices * c >= K; each
    class's shuffled examples are split evenly among the devices holding it.
    """
    labels = _check(labels, num_devices)
    classes = np.unique(labels)
    k, c = classes.size, int(classes_per_device)
    if not 1 <= c <= k:
        raise PartitionError(f"classes_per_device must be in [1, {k}] (the number of classes), got {c}")
    if num_devices * c < k:
        raise PartitionError(f"{num_devices} devices x {c} classes each cannot cover all {k} classes")
    rng = np.random.default_rng(seed)
    order = classes[rng.permutation(k)]
    held = [[order[(i * c + j) % k] for j in range(c)] for i in range(num_devices)]
    groups: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for cls in classes:
        holders = [i for i in range(num_devices) if cls in held[i]]
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if idx.size < len(holders):
            raise PartitionError(f"class {cls} has {idx.size} examples but {len(holders)} devices "
                                 "must hold it; use fewer devices or fewer classes per device")
        for i, part in zip(holders, np.array_split(idx, len(holders))):
            groups[i].append(part)
    return _finish([np.concatenate(g) for g in groups])


def quantity(labels: np.ndarray, num_devices: int, seed: int, beta: float = 0.5,
             min_samples: int = 1, distribution: str = "dirichlet",
             exponent: float = 1.0) -> list[np.ndarray]:
    """Quantity skew with IID labels.

    Device sizes are `min_samples + floor-split of the remaining N - n*min_samples` by
    proportions p: p ~ Dir(beta * 1_n) ('dirichlet', NIID-Bench) or p_i proportional to
    (rank_i + 1)^-exponent with ranks a seeded permutation ('powerlaw'). Examples are
    assigned from one random permutation, so labels stay IID.
    """
    labels = _check(labels, num_devices)
    n = labels.size
    if min_samples < 0 or min_samples * num_devices > n:
        raise PartitionError(f"min_samples={min_samples} x {num_devices} devices exceeds {n} examples")
    rng = np.random.default_rng(seed)
    if distribution == "dirichlet":
        if not beta > 0:
            raise PartitionError(f"quantity-skew Dirichlet beta must be > 0, got {beta}")
        p = rng.dirichlet(np.full(num_devices, float(beta)))
    elif distribution == "powerlaw":
        if not exponent >= 0:
            raise PartitionError(f"power-law exponent must be >= 0, got {exponent}")
        p = (rng.permutation(num_devices) + 1.0) ** -float(exponent)
        p = p / p.sum()
    else:
        raise PartitionError(f"unknown quantity distribution {distribution!r}; use 'dirichlet' or 'powerlaw'")
    rest = n - min_samples * num_devices
    cuts = (np.cumsum(p) * rest).astype(np.int64)
    cuts[-1] = rest
    sizes = np.diff(np.concatenate([[0], cuts])) + min_samples
    perm = rng.permutation(n)
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid, "dirichlet": dirichlet, "pathological": pathological, "quantity": quantity}


def partition(labels: np.ndarray, num_devices: int, method: str, seed: int,
              **kw) -> list[np.ndarray]:
    """Dispatch to a partitioner by name ('iid', 'dirichlet', 'pathological', 'quantity').

    Extra keyword arguments go to the partitioner (alpha, min_samples, classes_per_device,
    beta, ...). Returns `num_devices` disjoint sorted int64 index arrays covering labels.
    """
    if method not in PARTITIONERS:
        raise PartitionError(f"unknown partition method {method!r}; choose from {list(PARTITIONERS)}")
    return PARTITIONERS[method](labels, num_devices, seed, **kw)
