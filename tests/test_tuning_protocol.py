"""The tuning protocol's data (a validation set carved from the training split, the same for every
seed and method) and the bandit's held-out probe examples."""
import numpy as np
import pytest

from hfl_jax.config import ConfigError, load_config
from hfl_jax.driver import build, next_round, split_probe_holdout, training_rows

SMOKE = "tests/configs/tiny_v1.yaml"
TWO_LAYERS = ["model.tiny.num_layers=2", "algorithm.depths=[1,2]"]


@pytest.fixture(autouse=True)
def _root(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])


def test_validation_rows_are_shared_by_seeds_and_never_trained_on():
    cfg = lambda seed, *o: load_config(SMOKE, [f"seed={seed}", "data.validation_size=30", "data.train_subset=50", *o])
    t0, v0 = training_rows(cfg(0), 200)
    t1, v1 = training_rows(cfg(1), 200)
    assert len(v0) == 30 and np.array_equal(v0, v1)            # one carve for every run seed
    assert len(t0) == len(t1) == 50 and not np.array_equal(t0, t1)   # the subset is per seed
    assert not set(t0) & set(v0) and not set(t1) & set(v1)
    _, v2 = training_rows(cfg(0, "data.validation_seed=1"), 200)
    assert not np.array_equal(v0, v2)
    # without a validation set the rows are those of earlier versions (subset drawn from all rows)
    t, v = training_rows(load_config(SMOKE, ["data.train_subset=50"]), 200)
    expect = np.sort(np.random.default_rng([0, 14, 0]).choice(200, 50, replace=False))
    assert len(v) == 0 and np.array_equal(t, expect)
    with pytest.raises(ValueError, match="validation_size"):
        training_rows(load_config(SMOKE, ["data.validation_size=200"]), 200)


def test_evaluate_on_validation_needs_a_validation_set():
    with pytest.raises(ConfigError, match="data.evaluate"):
        load_config(SMOKE, ["data.evaluate=validation"])
    with pytest.raises(ConfigError, match="data.evaluate"):
        load_config(SMOKE, ["data.evaluate=dev"])


def test_probe_holdout_split():
    parts = [np.arange(0, 40), np.arange(40, 43), np.arange(43, 43)]
    train, probe = split_probe_holdout(parts, 8, seed=0)
    assert [len(p) for p in probe] == [8, 0, 0]               # at most a quarter of a device's data
    for p, t, h in zip(parts, train, probe):
        assert sorted(np.concatenate([t, h]).tolist()) == p.tolist() and not set(t) & set(h)


def test_build_holds_probe_examples_out_only_for_a_probing_bandit():
    over = [*TWO_LAYERS, "algorithm.bandit.probe_holdout=4", "data.validation_size=20", "data.evaluate=validation"]
    bandit = build(load_config(SMOKE, over))
    flat = build(load_config(SMOKE, [*over, "algorithm.name=fedlora"]))
    total = sum(len(p) for p in bandit.parts)
    held = sum(min(4, len(p) // 4) for p in bandit.parts)
    assert bandit.env.probe_data is not None and bandit.env.counts.sum() == total - held
    assert flat.env.probe_data is None and flat.env.counts.sum() == total
    # evaluation reads the 20 carved validation examples
    assert int(np.asarray(bandit.eval_data.valid).sum()) == 20
    # the bandit's probe scores the held-out examples
    _, rec = next_round(bandit, bandit.initial)
    active = [g for g in rec["groups"] if not g["skipped"]]
    assert active and all(np.isfinite(g["loss_before"]) and np.isfinite(g["loss_after"]) for g in active)


def test_clip_norm_bounds_each_local_step():
    import jax.numpy as jnp

    from hfl_jax.driver import make_optimizer
    opt = make_optimizer(load_config(SMOKE, ["train.optimizer=sgd", "train.lr=1.0", "train.clip_norm=1.0"]))
    g = {"w": jnp.array([6.0, 8.0])}                      # norm 10 -> scaled to norm 1
    upd, _ = opt.update(g, opt.init(g), g)
    np.testing.assert_allclose(np.asarray(upd["w"]), [-0.6, -0.8], rtol=1e-6)
    with pytest.raises(ConfigError, match="train.clip_norm"):
        load_config(SMOKE, ["train.clip_norm=0"])
