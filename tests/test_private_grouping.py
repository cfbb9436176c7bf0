"""Grouping without uploading label histograms (issue 29 item 1): local-DP label histograms
(hfl_jax.algos.privacy) and the mean-embedding signal (hfl_jax.fed.signals,
hfl_jax.algos.grouping.group_by_embedding); docs/algorithm.md, "Grouping without label histograms"."""
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from hfl_jax.algos import grouping, privacy
from hfl_jax.algos.grouping import group_by_embedding, group_devices, group_report, random_groups
from hfl_jax.algos.hierfedlora import kl_groups
from hfl_jax.config import ConfigError, ExperimentConfig, load_config, validate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny_v1.yaml"


def dirichlet_counts(n_devices, n_classes, *, alpha=0.1, per_device=50, seed=0):
    """[N, C] label counts: each class's samples split over devices by Dirichlet(alpha)
    (as tests/test_grouping.py)."""
    rng = np.random.default_rng(seed)
    per_class = n_devices * per_device // n_classes
    out = np.zeros((n_devices, n_classes), np.int64)
    for c in range(n_classes):
        out[:, c] = rng.multinomial(per_class, rng.dirichlet(alpha * np.ones(n_devices)))
    return out


def _acfg(**grouping_kw):
    a = ExperimentConfig().algorithm
    return dataclasses.replace(a, num_groups=8, grouping=dataclasses.replace(a.grouping, **grouping_kw))


# ------------------------------------------------------------------ no noise = today's grouping


@pytest.mark.parametrize("kw", [{}, {"mechanism": "none", "epsilon": 1.0},
                                {"mechanism": "laplace", "epsilon": math.inf},
                                {"mechanism": "gaussian", "epsilon": math.inf}])
def test_no_noise_is_the_plain_grouping_bit_for_bit(kw):
    x = dirichlet_counts(64, 8, seed=3)
    speeds = np.random.default_rng(1).lognormal(size=64)
    assert privacy.private_label_counts(x, kw.get("mechanism", "none"), kw.get("epsilon", math.inf),
                                        1e-5, seed=5) is x
    acfg = dataclasses.replace(_acfg(**kw), lam=0.2)
    want = group_devices(x, 8, speeds=speeds, lam=0.2, seed=5)
    np.testing.assert_array_equal(kl_groups(acfg)(x, speeds, 5), want)


def test_no_noise_on_the_smoke_config_is_the_plain_grouping(monkeypatch):
    """The smoke config's groups (through driver.build) are those of group_devices on its label
    counts, and the algorithm built with epsilon = inf or mechanism none gives the same."""
    from hfl_jax import algos
    from hfl_jax.algos.stages import SALT_GROUPS
    from hfl_jax.driver import build, sub_seed

    monkeypatch.chdir(ROOT)
    cfg = load_config(TINY)
    exp = build(cfg)
    seed, flops = sub_seed(cfg.seed, SALT_GROUPS), exp.env.profiles["flops"]
    a = cfg.algorithm
    want = group_devices(exp.label_counts, a.num_groups, speeds=flops, lam=a.lam, balance=a.sample_balance,
                         seed=seed)
    np.testing.assert_array_equal(exp.env.assignment, want)
    for over in (["algorithm.grouping.mechanism=laplace", "algorithm.grouping.epsilon=.inf"],
                 ["algorithm.grouping.mechanism=gaussian"], ["algorithm.grouping.epsilon=0.5"]):
        c = load_config(TINY, over)
        got = algos.build(c, exp.env.model.num_layers).group(exp.label_counts, flops, seed)
        np.testing.assert_array_equal(got, want)


def test_devices_without_noise_keep_their_counts():
    x = dirichlet_counts(6, 4, seed=0)
    eps = np.array([np.inf, 1.0, np.inf, 0.5, 2.0, np.inf])
    y = privacy.private_label_counts(x, "laplace", eps, seed=0)
    np.testing.assert_array_equal(y[np.isinf(eps)], x[np.isinf(eps)])
    assert not np.allclose(y[~np.isinf(eps)], x[~np.isinf(eps)])
    # each noisy row is n_i x a distribution (clipped at 0, renormalised)
    np.testing.assert_allclose(y.sum(axis=1), x.sum(axis=1))
    assert np.all(y >= 0)


# ------------------------------------------------------------------ noise scales, hand-checked


def test_laplace_noise_std_is_sqrt2_over_epsilon():
    """Per-coordinate std of x + Lap(1/eps) is sqrt(2)/eps. 250,000 draws per epsilon: the standard
    error of a Laplace sample std is sqrt((kurtosis - 1) / 4n) = sqrt(5 / 1e6) = 0.22% relative;
    tolerance 1.5% (7 standard errors)."""
    eps = np.repeat([0.1, 1.0, 10.0, np.inf], 25_000)
    z = privacy.noisy_histograms(np.zeros((eps.size, 10)), "laplace", eps, None, np.random.default_rng(0))
    for e in (0.1, 1.0, 10.0):
        np.testing.assert_allclose(z[eps == e].std(), math.sqrt(2) / e, rtol=0.015)
    assert np.all(z[np.isinf(eps)] == 0)
    np.testing.assert_allclose(privacy.laplace_scale([0.5, 2.0]), [2.0, 0.5])


def test_gaussian_noise_std_is_sigma():
    """sigma of the analytic Gaussian mechanism (Balle & Wang 2018) at delta = 1e-5: 3.7306 at
    eps = 1 (their example; the classic sqrt(2 ln(1.25/delta))/eps = 4.8448), its delta equal to the
    target, and the empirical std of 250,000 draws within 1% (standard error sqrt(2 / 4n) = 0.14%)."""
    delta = 1e-5
    sigma = privacy.gaussian_sigma([0.1, 0.5, 1.0, 10.0], delta)
    np.testing.assert_allclose(sigma[2], 3.7306, atol=1e-4)
    np.testing.assert_allclose(privacy.classic_gaussian_sigma(1.0, delta), math.sqrt(2 * math.log(1.25e5)))
    np.testing.assert_allclose(privacy.classic_gaussian_sigma(1.0, delta), 4.8448, atol=1e-4)
    for e, s in zip([0.1, 0.5, 1.0, 10.0], sigma):
        np.testing.assert_allclose(privacy._analytic_delta(float(s), e), delta, rtol=1e-6)
        if e <= 1:   # where the classic bound holds, the analytic sigma is smaller
            assert s < privacy.classic_gaussian_sigma(e, delta)
    eps = np.repeat([0.5, 1.0, 10.0], 25_000)
    z = privacy.noisy_histograms(np.zeros((eps.size, 10)), "gaussian", eps, delta, np.random.default_rng(1))
    for e, s in zip([0.5, 1.0, 10.0], sigma[1:]):
        np.testing.assert_allclose(z[eps == e].std(), s, rtol=0.01)


def test_noise_is_seeded_and_per_device():
    x = dirichlet_counts(16, 4, seed=0)
    a = privacy.privatize_histograms(x, "laplace", 1.0, seed=7)
    np.testing.assert_array_equal(a, privacy.privatize_histograms(x, "laplace", 1.0, seed=7))
    assert not np.array_equal(a, privacy.privatize_histograms(x, "laplace", 1.0, seed=8))
    np.testing.assert_allclose(a.sum(axis=1), 1.0)
    # a device's noise does not depend on the other devices' budgets
    eps = np.full(16, 1.0)
    eps[3] = 0.2
    b = privacy.privatize_histograms(x, "laplace", eps, seed=7)
    np.testing.assert_array_equal(np.delete(a, 3, axis=0), np.delete(b, 3, axis=0))


def test_bad_privacy_arguments_raise():
    x = dirichlet_counts(4, 3)
    with pytest.raises(ValueError, match="epsilon"):
        privacy.private_label_counts(x, "laplace", 0.0)
    with pytest.raises(ValueError, match="epsilon"):
        privacy.private_label_counts(x, "laplace", [1.0, 2.0])
    with pytest.raises(ValueError, match="delta"):
        privacy.private_label_counts(x, "gaussian", 1.0, delta=0.0)
    with pytest.raises(ValueError, match="mechanism"):
        privacy.private_label_counts(x, "exponential", 1.0)


# ------------------------------------------------------------------ utility falls with epsilon


def test_group_kl_rises_as_epsilon_falls():
    """64 devices, 8 classes, Dirichlet(0.1), 50 samples per device, 8 groups; mean group KL of
    the TRUE histograms, averaged over data/noise seeds 0-4 (measured: Laplace inf 0.044, eps 10
    0.042, 1 0.060, 0.1 0.191; Gaussian delta 1e-5: 10 0.056, 1 0.130, 0.1 0.315; random groups
    0.388)."""
    def mean_kl(mechanism, eps):
        kls = []
        for s in range(5):
            x = dirichlet_counts(64, 8, seed=s)
            a = group_devices(privacy.private_label_counts(x, mechanism, eps, 1e-5, seed=s), 8, seed=s)
            kls.append(group_report(x, a)["mean_kl"])
        return float(np.mean(kls))

    rand = np.mean([group_report(dirichlet_counts(64, 8, seed=s), random_groups(64, 8, s))["mean_kl"]
                    for s in range(5)])
    plain = mean_kl("none", math.inf)
    for mech in ("laplace", "gaussian"):
        kl = [mean_kl(mech, e) for e in (10.0, 1.0, 0.1)]
        assert kl[0] < kl[1] < kl[2], (mech, kl)
        assert kl[2] > 3 * plain, (mech, kl, plain)   # eps 0.1: the signal is mostly noise
        assert kl[2] < rand, (mech, kl, rand)           # ... but still better than random groups


# ------------------------------------------------------------------ the embedding signal


def test_embedding_groups_mix_the_clusters():
    """16 devices in 4 label-mix clusters with hand-made embeddings (a common offset, as real
    hidden states share one, plus the cluster's direction and small noise): every group of 4 gets
    one device of each cluster, its mean embedding then the global one (cosine distance ~ 0)."""
    rng = np.random.default_rng(0)
    cluster = np.repeat(np.arange(4), 4)
    e = 5.0 + rng.normal(size=(4, 16))[cluster] + 0.05 * rng.normal(size=(16, 16))
    for samples in (np.full(16, 100), rng.integers(80, 120, size=16)):
        for seed in range(3):
            a = group_by_embedding(e, samples, 4, seed=seed)
            for g in range(4):
                assert sorted(cluster[a == g]) == [0, 1, 2, 3], (seed, a)
    # the label signal of the same clusters (pure classes) groups them the same way
    a = group_devices(np.eye(4)[cluster] * 100, 4, seed=0)
    for g in range(4):
        assert sorted(cluster[a == g]) == [0, 1, 2, 3]


def test_embedding_grouping_of_linear_label_features_beats_random():
    """Embeddings a linear image of each device's label mix (plus an offset): grouping on them
    alone lowers the true group KL far below random groups (measured mean over seeds 0-4:
    embedding 0.086, labels 0.044, random 0.388)."""
    emb_kl, lab_kl, rnd_kl = [], [], []
    for s in range(5):
        x = dirichlet_counts(64, 8, seed=s)
        m = np.random.default_rng(100 + s).normal(size=(8, 32))
        p = x / np.maximum(x.sum(axis=1, keepdims=True), 1)
        emb_kl.append(group_report(x, group_by_embedding(3.0 + p @ m, x.sum(axis=1), 8, seed=s))["mean_kl"])
        lab_kl.append(group_report(x, group_devices(x, 8, seed=s))["mean_kl"])
        rnd_kl.append(group_report(x, random_groups(64, 8, s))["mean_kl"])
    assert np.mean(emb_kl) < np.mean(rnd_kl) / 2, (emb_kl, rnd_kl)


def test_cosine_objective_hand_computed():
    """Two devices e = [1, 0], [0, 1] (1 sample each) in one group of two and two empty devices:
    the group's mean is the global mean, distance 0; split, each group is at 45 degrees,
    1 - cos 45 = 1 - 1/sqrt(2), each weighted 1/2."""
    sig = grouping.embedding_signal(np.array([[1.0, 0], [0, 1], [3, 3], [0, 0]]), np.array([1, 1, 0, 0]))
    d = grouping._data_term(np.array([[1.0, 1, 2], [0, 0, 0]]), sig)
    np.testing.assert_allclose(d, [0, 0], atol=1e-15)
    d = grouping._data_term(np.array([[1.0, 0, 1], [0, 1, 1]]), sig)
    np.testing.assert_allclose(d, [0.5 * (1 - 1 / math.sqrt(2))] * 2)


@pytest.fixture(scope="module")
def tiny_embedding_exp():
    """The tiny config built with algorithm.grouping.signal=embedding."""
    from hfl_jax.driver import build

    here = Path.cwd()
    try:
        os.chdir(ROOT)
        cfg = load_config(TINY, ["algorithm.grouping.signal=embedding"])
        yield cfg, build(cfg)
    finally:
        os.chdir(here)


def test_mean_embeddings_by_hand(tiny_embedding_exp):
    """fed.signals.mean_embeddings on the tiny model = the masked token mean of bottom_hidden at
    the last layer, one example at a time, averaged over the device's examples."""
    import jax

    from hfl_jax.fed.local import base_of
    from hfl_jax.fed.signals import mean_embeddings

    model, params = tiny_embedding_exp[1].prepared.model[:2]
    rng = np.random.default_rng(0)
    n, t = 7, 12
    lengths = rng.integers(2, t + 1, size=n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    tokens = {"input_ids": rng.integers(1, 50, size=(n, t)).astype(np.int32) * mask, "attention_mask": mask,
              "token_type_ids": np.zeros((n, t), np.int32)}
    parts = [np.array([0, 3, 5]), np.array([], np.int64), np.array([6, 1, 2, 4])]
    got = mean_embeddings(model, base_of(params), tokens, parts, batch_size=3)
    assert got.shape == (3, model.cfg.hidden_size)
    one = jax.jit(lambda ids, m, tt: model.bottom_hidden(base_of(params), ids, m, tt, stop_layer=model.num_layers))
    for d, p in enumerate(parts):
        rows = []
        for i in p:
            h = np.asarray(one(tokens["input_ids"][i:i + 1], mask[i:i + 1], tokens["token_type_ids"][i:i + 1]))[0]
            rows.append(h[: lengths[i]].mean(axis=0))
        want = np.mean(rows, axis=0) if rows else np.zeros(model.cfg.hidden_size)
        np.testing.assert_allclose(got[d], want, rtol=1e-5, atol=1e-5)


def test_embedding_signal_end_to_end_on_tiny(tiny_embedding_exp, tmp_path):
    """driver.build with algorithm.grouping.signal=embedding: balanced groups equal to
    group_by_embedding on the devices' mean embeddings; partition.json records the signal."""
    from hfl_jax.algos.stages import SALT_GROUPS
    from hfl_jax.driver import sub_seed, write_partition
    from hfl_jax.fed.local import base_of
    from hfl_jax.fed.signals import mean_embeddings

    cfg, exp = tiny_embedding_exp
    a, k = exp.env.assignment, cfg.algorithm.num_groups
    sizes = np.bincount(a, minlength=k)
    assert sizes.min() >= len(a) // k and sizes.max() <= -(-len(a) // k)
    model, params = exp.prepared.model[:2]
    emb = mean_embeddings(model, base_of(params), exp.prepared.train, exp.parts)
    assert emb.shape == (len(a), model.cfg.hidden_size) and np.all(np.isfinite(emb))
    want = group_by_embedding(emb, exp.label_counts.sum(axis=1), k, speeds=exp.env.profiles["flops"],
                              lam=cfg.algorithm.lam, balance=cfg.algorithm.sample_balance,
                              seed=sub_seed(cfg.seed, SALT_GROUPS))
    np.testing.assert_array_equal(a, want)
    info = write_partition(exp, tmp_path, plot=False)
    rec = json.loads((tmp_path / "partition.json").read_text())["grouping"]
    assert rec == info["grouping"] == {"signal": "embedding", "mechanism": "none", "epsilon": None,
                                       "delta": None, "noise_scale": 0.0}


def test_partition_json_records_the_mechanism():
    from hfl_jax.driver import grouping_record

    cfg = load_config(TINY, ["algorithm.grouping.mechanism=gaussian", "algorithm.grouping.epsilon=1"])
    rec = grouping_record(cfg)
    assert rec["signal"] == "labels" and rec["mechanism"] == "gaussian" and rec["epsilon"] == 1.0
    assert rec["delta"] == 1e-5 and abs(rec["noise_scale"] - 3.7306) < 1e-4
    assert grouping_record(load_config(TINY))["mechanism"] == "none"


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("over, key", [
    (["algorithm.grouping.mechanism=exponential"], "algorithm.grouping.mechanism"),
    (["algorithm.grouping.signal=gradients"], "algorithm.grouping.signal"),
    (["algorithm.grouping.epsilon=0"], "algorithm.grouping.epsilon"),
    (["algorithm.grouping.epsilon=-1"], "algorithm.grouping.epsilon"),
    (["algorithm.grouping.delta=1"], "algorithm.grouping.delta"),
    (["algorithm.grouping.signal=embedding", "algorithm.grouping.mechanism=laplace"],
     "algorithm.grouping.mechanism"),
    (["algorithm.grouping.signal=embedding", "algorithm.name=fedlora"], "algorithm.grouping.signal"),
])
def test_config_validation_names_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(load_config(TINY, over))


def test_config_defaults_and_inf():
    g = ExperimentConfig().algorithm.grouping
    assert (g.signal, g.mechanism, g.epsilon, g.delta) == ("labels", "none", math.inf, 1e-5)
    assert load_config(TINY, ["algorithm.grouping.epsilon=.inf"]).algorithm.grouping.epsilon == math.inf
