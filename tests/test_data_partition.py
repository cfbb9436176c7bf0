"""Partitioners (coverage, determinism, skew), the report (hand-computed KL) and the plot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hfl_jax.data import (PartitionError, dirichlet, iid, load_task, partition, partition_report,
                          pathological, plot_partition, quantity)

LABELS = np.repeat(np.arange(4), [30, 20, 40, 10])  # 100 examples, 4 classes


def assert_exact_cover(parts, n, num_devices):
    assert len(parts) == num_devices
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts if p.size)
    allidx = np.concatenate(parts)
    assert allidx.size == n and np.array_equal(np.sort(allidx), np.arange(n))  # each index once


@pytest.mark.parametrize("method, kw", [
    ("iid", {}), ("dirichlet", {"alpha": 0.5, "min_samples": 2}),
    ("pathological", {"classes_per_device": 2}), ("quantity", {"beta": 0.5, "min_samples": 3}),
    ("quantity", {"distribution": "powerlaw", "exponent": 1.5}),
])
def test_cover_and_determinism(method, kw):
    a = partition(LABELS, 6, method, seed=1, **kw)
    assert_exact_cover(a, LABELS.size, 6)
    b = partition(LABELS, 6, method, seed=1, **kw)
    c = partition(LABELS, 6, method, seed=2, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes():
    assert sorted(len(p) for p in iid(np.zeros(10, int), 3, seed=0)) == [3, 3, 4]


def test_pathological_exact_classes():
    parts = pathological(LABELS, 4, seed=0, classes_per_device=2)
    held = [set(LABELS[p].tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    # round-robin over 4 classes with c=2: every class is held by exactly 2 devices and
    # split evenly between them
    for k, n_k in enumerate([30, 20, 40, 10]):
        holders = [i for i, h in enumerate(held) if k in h]
        assert len(holders) == 2
        assert sorted(int(np.sum(LABELS[parts[i]] == k)) for i in holders) == [n_k // 2] * 2


def test_quantity_sizes():
    parts = quantity(LABELS, 5, seed=0, distribution="powerlaw", exponent=0.0)  # flat: equal sizes
    assert [len(p) for p in parts] == [20] * 5
    parts = quantity(LABELS, 5, seed=0, beta=0.1, min_samples=7)
    assert min(len(p) for p in parts) >= 7


def test_dirichlet_min_samples_respected():
    parts = dirichlet(LABELS, 5, seed=3, alpha=0.3, min_samples=10, max_tries=1000)
    assert min(len(p) for p in parts) >= 10


@pytest.mark.parametrize("call, words", [
    (lambda: dirichlet(LABELS, 4, 0, alpha=0.0), "alpha must be > 0"),
    (lambda: dirichlet(LABELS, 4, 0, alpha=-1.0), "alpha must be > 0"),
    (lambda: partition(LABELS, 101, "iid", 0), "more devices (101) than training examples (100)"),
    (lambda: partition(LABELS, 101, "dirichlet", 0), "more devices (101)"),
    (lambda: partition(np.array([], int), 2, "iid", 0), "empty dataset"),
    (lambda: partition(LABELS, 0, "iid", 0), "num_devices must be >= 1"),
    (lambda: partition(LABELS, 4, "shards", 0), "unknown partition method 'shards'"),
    (lambda: dirichlet(LABELS, 50, 0, alpha=0.01, min_samples=2, max_tries=3),
     "did not give every device >= 2 examples in 3 draws"),
    (lambda: pathological(LABELS, 4, 0, classes_per_device=5), "classes_per_device must be in [1, 4]"),
    (lambda: pathological(LABELS, 1, 0, classes_per_device=2), "cannot cover all 4 classes"),
    (lambda: quantity(LABELS, 4, 0, beta=0.0), "beta must be > 0"),
])
def test_bad_arguments(call, words):
    with pytest.raises(PartitionError) as e:
        call()
    assert isinstance(e.value, ValueError) and words in str(e.value)


def test_report_hand_computed():
    labels = np.array([0, 0, 1, 1, 0, 1])
    r = partition_report(labels, [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]),
                                  np.array([], np.int64)], num_classes=2)
    assert r.histograms.tolist() == [[2, 0], [0, 2], [1, 1], [0, 0]]
    assert r.sizes.tolist() == [2, 2, 2, 0]
    np.testing.assert_allclose(r.global_dist, [0.5, 0.5])
    # one-class device vs uniform: KL = 1 * log(1 / 0.5) = log 2; balanced device: 0
    np.testing.assert_allclose(r.kl[:3], [math.log(2), math.log(2), 0.0], atol=1e-9)
    assert math.isnan(r.kl[3])  # empty device: undefined, excluded from the mean
    assert r.mean_kl == pytest.approx(2 * math.log(2) / 3, abs=1e-9)
    assert r.to_dict()["empty_devices"] == 1


def test_plot_writes_png(tmp_path):
    parts = dirichlet(LABELS, 8, seed=0, alpha=0.3, min_samples=0)
    path = plot_partition(partition_report(LABELS, parts, 4), tmp_path / "sub" / "p.png",
                          class_names=["a", "b", "c", "d"])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.fixture(scope="module")
def sst2_labels(sst2_dir):
    return load_task("sst2", "train", data_dir=sst2_dir).labels


@pytest.fixture(scope="module")
def sst2_dir():  # module-scoped wrapper of the conftest helper
    from conftest import sst2_dir as find
    return find()


def test_sst2_skew_ordering(sst2_labels):
    n = sst2_labels.size
    kl = {}
    # 2 classes and 80 devices: alpha=0.1 leaves ~1 device in 5 empty, so min_samples=0 there
    for name, method, kw in [("a0.1", "dirichlet", {"alpha": 0.1, "min_samples": 0}),
                             ("a10", "dirichlet", {"alpha": 10.0}), ("iid", "iid", {})]:
        parts = partition(sst2_labels, 80, method, seed=0, **kw)
        assert_exact_cover(parts, n, 80)
        kl[name] = partition_report(sst2_labels, parts, 2).mean_kl
    assert kl["a0.1"] > 5 * kl["a10"] and kl["a10"] > kl["iid"]
    assert kl["iid"] < 1e-3
    same = partition(sst2_labels, 80, "dirichlet", seed=0, alpha=0.1, min_samples=0)
    other = partition(sst2_labels, 80, "dirichlet", seed=1, alpha=0.1, min_samples=0)
    again = partition(sst2_labels, 80, "dirichlet", seed=0, alpha=0.1, min_samples=0)
    assert all(np.array_equal(x, y) for x, y in zip(same, again))
    assert not all(np.array_equal(x, y) for x, y in zip(same, other))
