"""Engine equivalences: vmapped == looped, chunked/sharded == plain, NaN devices dropped, hand aggregation."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_fixtures import OPT, setup
from hfl_jax.fed.aggregate import layerwise_aggregate, weighted_mean
from hfl_jax.fed.device_axis import DeviceAxis
from hfl_jax.fed.engine import make_group_round
from hfl_jax.fed.local import base_of, make_local_train
from hfl_jax.models import LoRA

E, B = 3, 4


def _close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_vmapped_group_round_equals_separate_device_runs():
    model, params, trainable, data, sizes = setup()
    base, key = base_of(params), jax.random.PRNGKey(7)
    ids = jnp.arange(8, dtype=jnp.int32) + 100
    group_round = make_group_round(model, OPT, depth=2, local_steps=E, batch_size=B, n_max=data.n_max)
    agg, metrics = group_round(trainable, base, data, ids, jnp.asarray(sizes), key)
    local = jax.jit(make_local_train(model, OPT, 2, E, B, data.n_max))
    singles = [local(trainable, base, data.row(m), key, ids[m], 2) for m in range(8)]
    for m, (tr, met) in enumerate(singles):
        np.testing.assert_allclose(metrics.loss[m], met.loss, atol=1e-5)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[tr for tr, _ in singles])
    expected, _ = weighted_mean(stacked, jnp.asarray(sizes))
    _close(agg, expected)
    # the frozen layer below depth 2 kept its adapter exactly
    np.testing.assert_array_equal(agg["lora"].weights["query"]["B"][0], trainable["lora"].weights["query"]["B"][0])
    assert np.abs(np.asarray(agg["lora"].weights["query"]["B"][2])).max() > 0


def test_chunked_equals_unchunked():
    model, params, trainable, data, sizes = setup()
    args = (trainable, base_of(params), data, jnp.arange(8, dtype=jnp.int32), jnp.asarray(sizes),
            jax.random.PRNGKey(3))
    plain, m1 = make_group_round(model, OPT, depth=3, local_steps=E, batch_size=B, n_max=data.n_max)(*args)
    chunked, m2 = make_group_round(model, OPT, depth=3, local_steps=E, batch_size=B, n_max=data.n_max,
                                    axis=DeviceAxis(chunk_size=2))(*args)
    _close(plain, chunked)
    np.testing.assert_allclose(m1.loss, m2.loss, atol=1e-5)


def test_nan_device_is_dropped_and_named():
    model, params, trainable, data, sizes = setup()
    # token 39's embedding is NaN and appears only on device 5 (first row, unmasked position 1)
    emb = params["embeddings"]["word"]["embedding"]
    poisoned = dict(params, embeddings=dict(params["embeddings"], word={"embedding": emb.at[39].set(jnp.nan)}))
    ids = np.where(np.asarray(data.input_ids) == 39, 38, np.asarray(data.input_ids))
    ids[5, :, 1] = 39
    mask = np.asarray(data.attention_mask).copy()
    mask[5, :, 1] = 1
    bad = data.replace(input_ids=ids, attention_mask=mask)
    agg, metrics = make_group_round(model, OPT, depth=3, local_steps=E, batch_size=B, n_max=data.n_max)(
        trainable, base_of(poisoned), bad, jnp.arange(8, dtype=jnp.int32), jnp.asarray(sizes),
        jax.random.PRNGKey(0))
    finite = np.asarray(metrics.finite)
    assert not finite[5] and finite[np.arange(8) != 5].all()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(agg))
    assert float(metrics.weight[5]) == 0.0
    assert np.abs(np.asarray(agg["lora"].weights["query"]["B"])).max() > 0  # the others still trained


def test_layerwise_aggregation_hand_example():
    # L = 4 layers, one target, A: [L, 1, 1], B: [L, 1, 1]; groups with depths 1, 2, 4 and weights 1, 2, 3.
    L = 4
    vals = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [4.0, 4.0, 4.0, 4.0]])
    group = LoRA({"query": {"A": jnp.asarray(vals)[:, :, None, None], "B": jnp.asarray(10 * vals)[:, :, None, None]}}, 2.0)
    heads = {"w": jnp.asarray([[1.0], [2.0], [4.0]])}
    prev = LoRA({"query": {"A": jnp.full((L, 1, 1), -1.0), "B": jnp.full((L, 1, 1), -1.0)}}, 2.0)
    depths, weights = jnp.array([1, 2, 4]), jnp.array([1.0, 2.0, 3.0])
    lora, head = layerwise_aggregate(group, heads, depths, weights, prev)
    # layer 3 (top): all groups -> (1*1 + 2*2 + 3*4) / 6 = 17/6; layer 2: groups 2,3 -> (4+12)/5 = 16/5;
    # layers 0,1: group 3 only -> 4.
    want = np.array([4.0, 4.0, 16 / 5, 17 / 6])
    np.testing.assert_allclose(np.asarray(lora.weights["query"]["A"])[:, 0, 0], want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lora.weights["query"]["B"])[:, 0, 0], 10 * want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(head["w"]), [17 / 6], rtol=1e-6)
    # the depth-4 group skips the round: layers 0, 1 keep the previous value; layer 2 = group 2 alone (2);
    # layer 3 = (1*1 + 2*2) / 3
    lora2, _ = layerwise_aggregate(group, heads, depths, jnp.array([1.0, 2.0, 0.0]), prev)
    # every group dropped: adapters and head keep their previous values
    lora3, head3 = layerwise_aggregate(group, heads, depths, jnp.zeros(3), prev, {"w": jnp.array([7.0])})
    np.testing.assert_array_equal(np.asarray(lora3.weights["query"]["A"]), np.asarray(prev.weights["query"]["A"]))
    np.testing.assert_array_equal(np.asarray(head3["w"]), [7.0])
    np.testing.assert_allclose(np.asarray(lora2.weights["query"]["A"])[:, 0, 0], [-1, -1, 2.0, 5 / 3],
                               rtol=1e-6)


SHARDED = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np
    from engine_fixtures import OPT, setup
    from hfl_jax.fed.device_axis import DeviceAxis, make_mesh
    from hfl_jax.fed.engine import make_group_round
    from hfl_jax.fed.local import base_of
    assert len(jax.devices()) == 4, jax.devices()
    model, params, trainable, data, sizes = setup()
    ids, w, key = np.arange(8, dtype=np.int32), sizes, jax.random.PRNGKey(3)
    plain, _ = make_group_round(model, OPT, depth=2, local_steps=3, batch_size=4, n_max=data.n_max)(
        trainable, base_of(params), data, ids, w, key)
    for chunk in (None, 4):
        axis = DeviceAxis(make_mesh(), chunk_size=chunk)
        out, m = make_group_round(model, OPT, depth=2, local_steps=3, batch_size=4, n_max=data.n_max, axis=axis)(
            axis.replicate(trainable), axis.replicate(base_of(params)), axis.put(data), axis.put(ids),
            axis.put(w), axis.replicate(key))
        if chunk is None:
            shards = jax.tree.leaves(axis.put(data))[0].sharding
            assert len(shards.device_set) == 4
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(out)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    print("SHARDED_OK")
""")


def _run(code, env_extra, timeout=600):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_sharded_over_four_host_devices_equals_unsharded():
    tests = os.path.dirname(__file__)
    r = _run(SHARDED.format(tests=tests), {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                           "JAX_PLATFORMS": "cpu"})
    assert "SHARDED_OK" in r.stdout, r.stdout + r.stderr
