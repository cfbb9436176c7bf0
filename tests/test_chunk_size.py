"""Chunk size chosen from a memory budget (issue 14): the choice rule, the jaxpr estimate against XLA's
memory analysis, and an automatically chunked group round equal to the unchunked one."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine_fixtures import setup
from hfl_jax.fed.device_axis import DeviceAxis, choose_chunk_size, estimate_bytes, free_device_bytes
from hfl_jax.fed.local import make_local_train


def test_choose_chunk_size():
    assert choose_chunk_size(80, 1e9, 100e9) is None                 # all 80 fit in 80% of 100 GB
    assert choose_chunk_size(80, 1e9, 50e9) == 40                    # 40 fit, and 40 divides 80
    assert choose_chunk_size(80, 1e9, 30e9) == 20                    # 24 fit; largest divisor <= 24
    assert choose_chunk_size(80, 1e9, 30e9, num_shards=2) == 40      # 24 per accelerator x 2 -> 40
    assert choose_chunk_size(12, 10e9, 1e9) == 1                     # nothing fits: one at a time
    assert choose_chunk_size(12, 10e9, 1e9, num_shards=4) == 4       # ... one per accelerator
    if jax.default_backend() == "cpu":
        assert free_device_bytes() is None                           # CPU: never chunked automatically


def test_estimate_bounds_xla_and_auto_chunked_round_is_exact():
    model, params, trainable, data, _ = setup(num_devices=4)
    n_max = data.n_max
    base = {k: v for k, v in params.items() if k != "head"}
    M = data.counts.shape[0]
    local = make_local_train(model, optax.adam(1e-2), model.num_layers, 2, 2, n_max)
    key, rank = jax.random.PRNGKey(0), jnp.int32(trainable["lora"].rank)
    row = jax.tree.map(lambda x: x[0], data)
    est = estimate_bytes(local, trainable, base, row, key, jnp.int32(0), rank)
    xla = jax.jit(local).lower(trainable, base, row, key, jnp.int32(0), rank).compile().memory_analysis()
    assert xla.temp_size_in_bytes <= est <= 20 * xla.temp_size_in_bytes, (est, xla.temp_size_in_bytes)

    ids, ranks = jnp.arange(M, dtype=jnp.int32), jnp.full((M,), rank)
    run = lambda axis: jax.jit(axis.map(local, in_axes=(None, None, 0, None, 0, 0)))(
        trainable, base, data, key, ids, ranks)
    budget = int(1.5 * est / 0.8)  # one device fits, two do not -> chunks of 1
    assert choose_chunk_size(M, est, budget) == 1
    jaxpr = str(jax.make_jaxpr(DeviceAxis(memory_budget=budget).map(local, in_axes=(None, None, 0, None, 0, 0)))(
        trainable, base, data, key, ids, ranks))
    assert jaxpr.count("scan[") > str(jax.make_jaxpr(DeviceAxis().map(local, in_axes=(None, None, 0, None, 0, 0)))(
        trainable, base, data, key, ids, ranks)).count("scan[")  # the lax.map over chunks
    for a, b in zip(jax.tree.leaves(run(DeviceAxis(memory_budget=budget))), jax.tree.leaves(run(DeviceAxis()))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
