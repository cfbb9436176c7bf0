"""FedProx, SCAFFOLD and the server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad): their updates by
hand, their reductions to FedLoRA, and exact resume from a checkpoint."""
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from hfl_jax.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tests" / "configs" / "tiny_v1.yaml"
# 2 layers: the programs compile in about half the time of the fixture's 4 layers
FAST = ["lora.rank=4", "model.tiny.num_layers=2", "algorithm.depths=[1,2]"]


@functools.lru_cache(maxsize=None)
def _build(name, *overrides):
    from hfl_jax.driver import build
    return build(load_config(SMOKE, FAST + [f"algorithm.name={name}", *overrides]))


@functools.lru_cache(maxsize=None)
def _run(name, *overrides, rounds=1):
    """``[(state, record)]`` of the first ``rounds`` rounds (cached: the tests share their runs)."""
    from hfl_jax.driver import next_round
    exp = _build(name, *overrides)
    if rounds > 1:
        out = list(_run(name, *overrides, rounds=rounds - 1))
        return out + [next_round(exp, out[-1][0])]
    return [next_round(exp, exp.initial)]


def _state(name, *overrides, rounds=1):
    return _run(name, *overrides, rounds=rounds)[-1][0]


def _record(name, *overrides, rounds=1):
    return {k: v for k, v in _run(name, *overrides, rounds=rounds)[-1][1].items() if k != "wall_time"}


def _assert_trees(a, b, exact=True, **tol):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert len(la) == len(lb) > 0
    for (pa, xa), (pb, xb) in zip(la, lb):
        assert pa == pb
        if exact:
            np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb), err_msg=str(pa))
        else:
            np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), err_msg=str(pa), **tol)


# --- FedProx ---------------------------------------------------------------------------------------------

def _two_steps(opt):
    w0 = {"w": jnp.array([1.0, 2.0])}
    w, state = w0, opt.init(w0)
    for _ in range(2):
        u, state = opt.update({"w": jnp.array([0.2, 0.3])}, state, w)
        w = optax.apply_updates(w, u)
    return w["w"]


def test_fedprox_adds_the_proximal_gradient_by_hand():
    from hfl_jax.algos.fedprox import proximal
    mu, lr = 0.5, 0.1
    opt = proximal(mu, optax.sgd(lr))
    assert proximal(mu, opt) is proximal(mu, opt)            # cached: one optimizer, one compiled round
    w0 = {"w": jnp.array([1.0, 2.0])}
    state = opt.init(w0)
    g = {"w": jnp.array([0.2, 0.3])}
    w, expect = w0, np.array([1.0, 2.0])
    for _ in range(3):   # w_{k+1} = w_k - lr (g + mu (w_k - w0))
        updates, state = opt.update(g, state, w)
        w = optax.apply_updates(w, updates)
        expect = expect - lr * (np.array([0.2, 0.3]) + mu * (expect - np.array([1.0, 2.0])))
        np.testing.assert_allclose(np.asarray(w["w"]), expect, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.anchor["w"]), [1.0, 2.0])   # w0 stays the round's start
    # by hand, the second step: w1 = [0.98, 1.97]; w2 = w1 - 0.1 ([0.2, 0.3] + 0.5 [-0.02, -0.03])
    np.testing.assert_allclose(np.asarray(_two_steps(opt)), [0.98 - 0.1 * 0.19, 1.97 - 0.1 * 0.285], rtol=1e-6)


def test_fedprox_with_mu_0_is_fedlora_bit_for_bit():
    _assert_trees(_state("fedlora").trainable, _state("fedprox", "algorithm.fedprox.mu=0.0").trainable)
    assert _record("fedlora") == _record("fedprox", "algorithm.fedprox.mu=0.0")
    # a real mu changes the model (the proximal pull towards the round's global model)
    b = lambda s: np.asarray(s.trainable["lora"].weights["query"]["B"])
    s2 = _state("fedprox", "algorithm.fedprox.mu=1.0")
    assert not np.array_equal(b(s2), b(_state("fedlora"))) and np.abs(b(s2)).max() > 0


# --- SCAFFOLD --------------------------------------------------------------------------------------------

def test_scaffold_control_variate_updates_by_hand():
    from hfl_jax.algos.scaffold import correction, update_controls
    c = {"w": jnp.array([1.0, -1.0])}
    ci = {"w": jnp.array([[0.5, 0.5], [0.0, 2.0], [3.0, 3.0]])}      # [S=3, 2]
    x = {"w": jnp.array([2.0, 4.0])}
    y = {"w": jnp.array([[1.0, 5.0], [2.5, 3.0], [np.nan, 0.0]])}   # slot 2 dropped (non-finite)
    kept = jnp.array([True, True, False])
    K, lr, N = 2, 0.1, 5
    new_c, new_ci = update_controls(c, ci, x, y, kept, np.float32(1 / (K * lr)), np.float32(1 / N))
    # c_i+ = c_i - c + (x - y_i) / (K lr)
    p0 = np.array([0.5, 0.5]) - [1.0, -1.0] + (np.array([2.0, 4.0]) - [1.0, 5.0]) / 0.2   # [4.5, -3.5]
    p1 = np.array([0.0, 2.0]) - [1.0, -1.0] + (np.array([2.0, 4.0]) - [2.5, 3.0]) / 0.2   # [-3.5, 8.0]
    np.testing.assert_allclose(np.asarray(new_ci["w"]), [p0, p1, [3.0, 3.0]], rtol=1e-6)
    # c += (1 / N) sum over the kept devices of (c_i+ - c_i)
    expect_c = np.array([1.0, -1.0]) + ((p0 - [0.5, 0.5]) + (p1 - [0.0, 2.0])) / N
    np.testing.assert_allclose(np.asarray(new_c["w"]), expect_c, rtol=1e-6)
    # the local steps' correction: -lr (c - c_i) added to every update (SGD: a step on g - c_i + c)
    np.testing.assert_allclose(np.asarray(correction(c, ci, np.float32(lr))["w"]),
                               -lr * (np.array([1.0, -1.0])[None] - np.asarray(ci["w"])), rtol=1e-6)


def test_update_offset_hook_is_sgd_on_the_corrected_gradient():
    """``make_train_step``'s offset: with SGD, a step with offset ``-lr (c - c_i)`` is a step on ``g - c_i + c``."""
    from hfl_jax.fed.local import make_loss_fn, make_train_step
    exp = _build("fedlora")
    model, tr, base, lr = exp.env.model, exp.initial.trainable, exp.env.base, 0.05
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(5, 100, (4, 8)), jnp.int32),
             "attention_mask": jnp.ones((4, 8), jnp.int32), "token_type_ids": jnp.zeros((4, 8), jnp.int32),
             "labels": jnp.asarray([0, 1, 1, 0], jnp.int32), "mask": jnp.ones(4, bool)}
    corr = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), tr)   # c - c_i
    opt = optax.sgd(lr)
    step = make_train_step(model, opt, model.num_layers)
    new, _, _ = step(tr, opt.init(tr), base, batch, jax.tree.map(lambda a: -lr * a, corr))
    g, _ = jax.grad(make_loss_fn(model, model.num_layers), has_aux=True)(tr, base, batch)
    by_hand = jax.tree.map(lambda w, g_, c_: w - lr * (g_ + c_), tr, g, corr)
    _assert_trees(new, by_hand, exact=False, rtol=1e-5, atol=1e-6)


SGD = ("train.optimizer=sgd", "train.lr=0.05")


def test_scaffold_round_one_is_fedlora_and_its_controls_are_the_drifts():
    """Round 1 (c = c_i = 0, SGD): the global model is FedLoRA's, and every device's c_i+ = (x - y_i) / (K lr),
    so x_new = sum_i n_i (x - K lr c_i) / sum_i n_i and c = (1 / N) sum_i c_i. Traffic: twice FedLoRA's."""
    exp, s = _build("scaffold", *SGD), _state("scaffold", *SGD)
    _assert_trees(s.trainable, _state("fedlora", *SGD).trainable, exact=False, rtol=1e-6, atol=1e-7)
    x0, ci, c = exp.initial.trainable, s.device["ci"], s.device["c"]
    K, lr, slots = exp.env.workload.local_steps, 0.05, exp.env.group_slots[0]
    n = np.where(slots >= 0, exp.env.counts[np.where(slots >= 0, slots, 0)], 0).astype(np.float64)
    for path_x, leaf_x in jax.tree_util.tree_leaves_with_path(x0):
        get = lambda tree: np.asarray(dict(jax.tree_util.tree_leaves_with_path(tree))[path_x], np.float64)
        cis = get(ci)
        y = np.asarray(leaf_x, np.float64)[None] - K * lr * cis
        mean = np.tensordot(n, y, 1) / n.sum()
        np.testing.assert_allclose(get(s.trainable), mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(get(c), cis.sum(0) / exp.env.num_devices, rtol=1e-5, atol=1e-7)
    r0, r1 = _record("fedlora", *SGD), _record("scaffold", *SGD)
    for k in ("bytes_up", "bytes_down", "cloud_bytes_up", "cloud_bytes_down"):
        assert r1[k] == 2 * r0[k] > 0
    assert r1["round_time"] > r0["round_time"] and r1["time_compute"] == r0["time_compute"]
    # round 2 runs with the correction and keeps everything finite
    s2 = _state("scaffold", *SGD, rounds=2)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves((s2.trainable, s2.device)))


# --- server optimizers -----------------------------------------------------------------------------------

def _server(name, **kw):
    from hfl_jax.algos import fedopt
    from hfl_jax.config import ServerOptConfig
    make = {"fedavgm": fedopt.sgd_momentum, "fedadam": fedopt.adam, "fedyogi": fedopt.yogi,
            "fedadagrad": fedopt.adagrad}[name]
    cfg = ServerOptConfig(**kw)
    return make(cfg.lr, cfg), cfg


def test_server_steps_by_hand():
    from hfl_jax.algos.fedopt import server_step
    x = {"w": jnp.array([1.0, 2.0, -1.0])}
    ybars = [np.array([0.5, 3.0, -1.0]), np.array([0.0, 2.5, 1.0])]

    def run(opt):
        xs, leaves, cur = [], jax.tree.leaves(opt.init(x)), x
        for yb in ybars:
            cur, leaves = server_step(opt, cur, {"w": jnp.asarray(yb, jnp.float32)}, leaves)
            xs.append(np.asarray(cur["w"], np.float64))
        return xs

    # FedAvgM: m <- beta m + delta, x <- x - lr m, delta = x - ybar
    opt, cfg = _server("fedavgm", lr=1.0, momentum=0.9)
    xs = run(opt)
    x0 = np.array([1.0, 2.0, -1.0])
    d1 = x0 - ybars[0]
    x1 = x0 - d1
    np.testing.assert_allclose(xs[0], x1, rtol=1e-6)
    m2 = 0.9 * d1 + (x1 - ybars[1])
    np.testing.assert_allclose(xs[1], x1 - m2, rtol=1e-6)
    # FedAdam (optax.adam, bias corrected): the first step is x - lr delta / (|delta| + eps)
    opt, cfg = _server("fedadam", lr=0.01, beta1=0.9, beta2=0.99, eps=1e-3)
    xs = run(opt)
    np.testing.assert_allclose(xs[0], x0 - 0.01 * d1 / (np.abs(d1) + 1e-3), rtol=1e-6)
    m, v = 0.1 * d1, 0.01 * d1 ** 2
    d2 = xs[0] - ybars[1]
    m, v = 0.9 * m + 0.1 * d2, 0.99 * v + 0.01 * d2 ** 2
    np.testing.assert_allclose(xs[1], xs[0] - 0.01 * (m / (1 - 0.9 ** 2)) / (np.sqrt(v / (1 - 0.99 ** 2)) + 1e-3),
                               rtol=1e-5)
    # FedAdagrad: v <- eps^2 + sum delta^2, x <- x - lr delta / sqrt(v) (optax's eps 1e-7 inside the root)
    opt, cfg = _server("fedadagrad", lr=0.01, eps=1e-3)
    xs = run(opt)
    v = 1e-6 + d1 ** 2
    np.testing.assert_allclose(xs[0], x0 - 0.01 * d1 / np.sqrt(v + 1e-7), rtol=1e-5)
    # every one is optax's own optimizer on the pseudo-gradient
    for name, kw in [("fedyogi", dict(lr=0.01)), ("fedadam", dict(lr=0.01)), ("fedavgm", dict(lr=1.0))]:
        opt, cfg = _server(name, **kw)
        ref = {"fedyogi": optax.yogi(0.01, b1=0.9, b2=0.99, eps=1e-3), "fedadam": optax.adam(0.01, 0.9, 0.99, 1e-3),
               "fedavgm": optax.sgd(1.0, momentum=0.9)}[name]
        s, cur = ref.init(x), x
        for yb, got in zip(ybars, run(opt)):
            u, s = ref.update(jax.tree.map(lambda a, b: a - b, cur, {"w": jnp.asarray(yb, jnp.float32)}), s, cur)
            cur = optax.apply_updates(cur, u)
            np.testing.assert_array_equal(np.asarray(cur["w"]), got.astype(np.float32))


def test_server_sgd_lr_1_without_momentum_is_fedlora():
    plain = ("algorithm.server.lr=1.0", "algorithm.server.momentum=0.0")
    assert _build("fedavgm", *plain).initial.device is None      # plain SGD: no server state
    _assert_trees(_state("fedlora", rounds=2).trainable, _state("fedavgm", *plain, rounds=2).trainable,
                  exact=False, rtol=1e-5, atol=1e-6)
    # FedAdam keeps its moments in the state: the step count, then mu and nu for every leaf
    exp = _build("fedadam")
    assert len(exp.initial.device["server"]) == 1 + 2 * len(jax.tree.leaves(exp.initial.trainable))


def test_config_keys_are_validated():
    for bad in ["algorithm.fedprox.mu=-1", "algorithm.server.lr=0", "algorithm.server.momentum=1.0",
                "algorithm.server.beta2=1.5", "algorithm.server.eps=0"]:
        key = bad.split("=")[0]
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(SMOKE, [bad], check_model=False)
    cfg = load_config(SMOKE, [], check_model=False)
    assert cfg.algorithm.fedprox.mu == 0.01 and cfg.algorithm.server.lr is None
    assert (cfg.algorithm.server.momentum, cfg.algorithm.server.eps) == (0.9, 1e-3)


@pytest.mark.parametrize("name", ["scaffold", "fedadam"])
def test_no_round_compiles_after_compile_ahead(name):
    from test_recompilation import CompileCounter
    from hfl_jax.driver import build, next_round, precompile
    # a fresh optimizer setting (lr) so no program compiled by another test is reused
    exp = build(load_config(SMOKE, FAST + [f"algorithm.name={name}", "train.lr=0.00277"]))
    state = exp.initial
    with CompileCounter() as ahead:
        precompile(exp, state)
    assert any("group_round" in x for x in ahead.names)
    with CompileCounter() as rounds:
        for _ in range(2):
            state, _ = next_round(exp, state)
    assert rounds.names == [], f"compiled during rounds: {rounds.names}"


# --- exact resume ----------------------------------------------------------------------------------------

def _strip(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k != "wall_time"}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _arrays(run_dir):
    from hfl_jax import checkpoint as ckpt
    mgr = ckpt.manager(run_dir / "checkpoints", 10)
    return mgr.latest_step(), mgr.restore(mgr.latest_step())["trainable"]


@pytest.mark.parametrize("name", ["fedavgm"])   # scaffold, fedadam: test_killed_run_resumes_bit_identically
def test_resume_is_bit_identical(name, tmp_path, monkeypatch):
    from hfl_jax import cli
    monkeypatch.chdir(ROOT)
    full, part = tmp_path / "full", tmp_path / "part"
    sets = sum((["--set", s] for s in FAST + ["train.rounds=3", "checkpoint.every=1", f"algorithm.name={name}"]), [])
    assert cli.main(["run", str(SMOKE), *sets, "--out", str(full), "--quiet"]) == 0
    assert cli.main(["run", str(SMOKE), *sets, "--set", "train.rounds=2", "--out", str(part), "--quiet"]) == 0
    raw = yaml.safe_load((part / "config.yaml").read_text())
    raw["train"]["rounds"] = 3
    (part / "config.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["resume", str(part), "--quiet"]) == 0
    assert _strip(full) == _strip(part) and len(_strip(full)) == 3
    (s1, a), (s2, b) = _arrays(full), _arrays(part)
    assert s1 == s2 == 3 and "device" in a     # the control variates / server moments are checkpointed
    _assert_trees(a, b)


@pytest.mark.parametrize("name", ["scaffold", "fedadam"])
def test_killed_run_resumes_bit_identically(name, tmp_path, monkeypatch):
    """SIGKILL after round 2's metrics line, before its checkpoint (``HFL_FAULT_KILL_ROUND``): the resumed run
    redoes round 2 from checkpoint 1 (control variates / server moments restored) and ends as the uninterrupted one."""
    import os
    import subprocess
    import sys
    from hfl_jax import cli
    monkeypatch.chdir(ROOT)
    full, killed = tmp_path / "full", tmp_path / "killed"
    sets = sum((["--set", s] for s in FAST + ["train.rounds=3", "checkpoint.every=1", f"algorithm.name={name}"]), [])
    assert cli.main(["run", str(SMOKE), *sets, "--out", str(full), "--quiet"]) == 0
    env = dict(os.environ, HFL_FAULT_KILL_ROUND="2")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-m", "hfl_jax", "run", str(SMOKE), *sets, "--out", str(killed), "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert len(_strip(killed)) == 2 and _arrays(killed)[0] == 1
    assert cli.main(["resume", str(killed), "--quiet"]) == 0
    assert _strip(full) == _strip(killed)
    (s1, a), (s2, b) = _arrays(full), _arrays(killed)
    assert s1 == s2 == 3
    _assert_trees(a, b)
