"""hfl_jax.fed.xla: the CPU compiler option is applied when known, can be turned off, and changes no maths."""
import jax
import jax.numpy as jnp
import numpy as np

from hfl_jax.fed import xla


def _fresh(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    xla.compiler_options.cache_clear()
    return xla.compiler_options()


def test_cpu_option_applied_and_switchable(monkeypatch):
    monkeypatch.delenv("HFL_XLA_DEFAULT_FUSION", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    try:
        opts = _fresh(monkeypatch)
        assert jax.default_backend() == "cpu"
        assert dict(opts) == xla.CPU_OPTIONS    # this jaxlib knows the option
        assert _fresh(monkeypatch, HFL_XLA_DEFAULT_FUSION="1") == ()
        monkeypatch.delenv("HFL_XLA_DEFAULT_FUSION")
        assert _fresh(monkeypatch, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=") == ()
    finally:
        monkeypatch.undo()
        xla.compiler_options.cache_clear()


def test_individual_dots_compute_the_same_layer():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (64, 96))
    w1, w2 = jax.random.normal(k2, (96, 192)) / 10, jax.random.normal(k3, (192, 96)) / 10

    def mlp(x, w1, w2):
        h = jax.nn.gelu(x @ w1, approximate=False)
        y = h @ w2 + x
        return (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + 1e-12)

    loss = lambda *a: jnp.sum(mlp(*a) ** 2)
    ref = jax.jit(jax.value_and_grad(loss, argnums=(1, 2)))(x, w1, w2)
    opt = jax.jit(jax.value_and_grad(loss, argnums=(1, 2)), compiler_options=dict(xla.CPU_OPTIONS))(x, w1, w2)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(opt)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_jitted_function_nests_under_user_transforms():
    f = xla.jit(lambda x: jnp.sin(x) * x)
    x = jnp.float32(0.7)
    g = jax.jit(jax.grad(lambda y: f(y)))(x)                  # nested: compiled by the outer jit
    np.testing.assert_allclose(g, np.cos(0.7) * 0.7 + np.sin(0.7), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f)(jnp.arange(3.0)), np.sin(np.arange(3.0)) * np.arange(3.0), rtol=1e-6)
    np.testing.assert_allclose(f(x), np.sin(0.7) * 0.7, rtol=1e-6)


_DRAWS = """
import hashlib, sys, jax, jax.extend, jax.numpy as jnp, numpy as np
from hfl_jax.fed import xla
applied = xla.use_unrolled_threefry()
k = jax.random.PRNGKey(7)
outs = [jax.random.bits(k, (5, 3)), jax.random.uniform(jax.random.fold_in(k, 3), (2, 33, 4)),
        jax.random.normal(k, (17,)), jax.random.permutation(k, 101), jax.random.split(k, 5),
        jax.jit(lambda k: jax.random.choice(k, 50, (7,), replace=False))(k),
        jax.extend.random.threefry_2x32(jnp.array([0x13198a2e, 0x03707344], jnp.uint32),
                                 jnp.array([0x243f6a88, 0x85a308d3], jnp.uint32))]
h = hashlib.sha256(b"".join(np.asarray(o).tobytes() for o in outs)).hexdigest()
print(applied, h, hex(int(outs[-1][0])), hex(int(outs[-1][1])))
"""


def test_unrolled_threefry_gives_the_same_bits():
    """``use_unrolled_threefry`` changes how Threefry compiles on CPU, not one random bit: draws of
    several kinds equal JAX's default (rolled) lowering's, and the hash matches Random123's known answer."""
    import os
    import subprocess
    import sys

    out = {}
    for mode in ("rolled", ""):
        env = dict(os.environ, HFL_THREEFRY=mode, HFL_JAX_CACHE="off")
        r = subprocess.run([sys.executable, "-c", _DRAWS], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        out[mode] = r.stdout.split()
    assert out["rolled"][0] == "False" and out[""][0] == "True"   # applied only by default
    assert out["rolled"][1:] == out[""][1:]
    assert out[""][2:] == ["0xc4923a9c", "0x483df7a0"]   # Threefry-2x32, 20 rounds (Random123 test vector)
