"""Guard against recompilation: a group round with unchanged shapes compiles exactly once."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine_fixtures import CFG, setup
from hfl_jax.fed.engine import make_group_round
from hfl_jax.fed.local import base_of
from hfl_jax.models import LoRAConfig, init_lora

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Records XLA backend compilations (jax.monitoring events, with the jitted function's name) while active."""

    def __init__(self):
        self.names = []

    def __call__(self, event, duration, **kwargs):
        if event == COMPILE_EVENT:
            self.names.append(kwargs.get("fun_name", "?"))

    def count(self, fun: str) -> int:
        return sum(name == f"jit({fun})" for name in self.names)

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_group_round_compiles_once_across_rounds():
    model, params, trainable, data, sizes = setup()
    base = base_of(params)
    # a fresh optimizer object: its own lru_cache entry, so nothing compiled by other tests is reused
    group_round = make_group_round(model, optax.adam(3e-3), depth=2, local_steps=2, batch_size=4, n_max=data.n_max)
    ids = jnp.arange(8, dtype=jnp.int32)
    other_ids = ids + 8
    # every input of every round prepared up front, so only the round itself can compile
    other_lora = init_lora(jax.random.PRNGKey(42), CFG, LoRAConfig(rank=2, alpha=4))
    other_trainable = jax.block_until_ready(
        {"lora": other_lora, "head": jax.tree.map(lambda x: x + 0.5, trainable["head"])})
    keys = [jax.random.PRNGKey(k) for k in (1, 2, 3)]
    w1 = jnp.asarray(sizes)
    w2 = jnp.asarray(np.where(np.arange(8) % 2 == 0, sizes, 0.0).astype(np.float32))
    jax.block_until_ready((keys, w1, w2, other_ids))

    with CompileCounter() as counter:
        out1, m1 = group_round(trainable, base, data, ids, w1, keys[0])
        out2, m2 = group_round(out1, base, data, ids, w2, keys[1])  # the previous round's output fed back
        out3, m3 = group_round(other_trainable, base, data, other_ids, w1, keys[2])
        jax.block_until_ready((out1, out2, out3, m1, m2, m3))
    assert counter.count("group_round") == 1, f"compilations over 3 rounds of unchanged shapes: {counter.names}"
    assert counter.names == ["jit(group_round)"], counter.names  # nothing else compiled either
    if hasattr(group_round, "_cache_size"):
        assert group_round._cache_size() == 1
    # the rounds really did different work
    assert not np.allclose(np.asarray(m1.loss), np.asarray(m3.loss))
    assert jax.tree.structure(out2) == jax.tree.structure(trainable)


def test_counter_sees_a_recompilation():
    """The counter itself works: a new shape compiles again."""
    def double(x):
        return x * 2

    f = jax.jit(double)
    a, b, c = jnp.ones(3), jnp.zeros(3), jnp.ones(4)
    with CompileCounter() as counter:
        f(a).block_until_ready()
        f(b).block_until_ready()
        f(c).block_until_ready()
    assert counter.count("double") == 2, counter.names


def test_precompiled_executables_serve_later_calls_without_compiling():
    """``jit(...).precompile`` compiles once ahead of time; calls with the same signature (other values,
    also under a thread pool) compile nothing and give the same results as the jitted function."""
    from concurrent.futures import ThreadPoolExecutor

    from hfl_jax.fed.xla import jit

    def affine(x, w, scale=1.0):
        return jnp.tanh(x @ w) * scale

    f = jit(affine)
    x, w = jnp.ones((4, 3)), jnp.full((3, 2), 0.5)
    x8 = jnp.ones((8, 3))
    with CompileCounter() as counter:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda a: f.precompile(a, w, scale=2.0), [x, x8]))
    assert counter.count("affine") == 2 and len(f.compiled) == 2
    x1, w2 = jax.block_until_ready((x + 1, w * 2))   # other values, same signatures
    with CompileCounter() as counter:
        y = f(x1, w, scale=3.0)
        y8 = f(x8, w2, scale=2.0)
        jax.block_until_ready((y, y8))
    assert counter.names == [], counter.names
    np.testing.assert_allclose(np.asarray(y), np.asarray(jax.jit(affine)(x1, w, scale=3.0)), rtol=1e-6)
    with CompileCounter() as counter:
        f(jnp.ones((5, 3)), w).block_until_ready()   # a new shape: the jit path compiles it
    assert counter.count("affine") == 1
