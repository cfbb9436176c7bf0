"""The bf16 backward pass through transposed frozen kernels (issue 28): ``prepare_base`` gives every
stacked dense kernel a materialized ``kernel_t``, and ``LoRADense`` then takes the input gradient of
its frozen product as ``g_bf16 @ kernel_t`` (:func:`hfl_jax.models.layers.frozen_dot`). The forward pass
is unchanged bit for bit; the gradients differ from autodiff's only in one product's summation order."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from hfl_jax.fed.engine import make_group_round
from hfl_jax.fed.local import base_of
from hfl_jax.models import EncoderConfig, EncoderModel, LoRAConfig, init_lora
from hfl_jax.models.decoder import DecoderConfig, DecoderModel
from hfl_jax.models.layers import frozen_dot, prepare_base

BF16 = jnp.bfloat16


def test_frozen_dot_value_and_input_gradient_are_the_exact_products_rounded():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (16, 24)).astype(BF16)
    w = jax.random.normal(k[1], (24, 40)).astype(BF16)
    g = jax.random.normal(k[2], (16, 40)).astype(BF16).astype(jnp.float32)
    y, vjp = jax.vjp(lambda x: frozen_dot(x, w, jnp.swapaxes(w, 0, 1)), x)
    (dx,) = vjp(g)
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    assert y.dtype == jnp.float32 and dx.dtype == BF16
    np.testing.assert_allclose(np.asarray(y), x64 @ w64, rtol=1e-6, atol=1e-6)
    exact = (g64 @ w64.T).astype(ml_dtypes.bfloat16).astype(np.float64)   # rounded once to bf16
    ulp = np.abs(exact) * 2.0 ** -7 + 1e-30
    assert np.all(np.abs(np.asarray(dx, np.float64) - exact) <= ulp)      # at most one bf16 ulp off


def _encoder():
    cfg = EncoderConfig(model_type="bert", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = EncoderModel(cfg, compute_dtype=BF16)
    return model, model.init(jax.random.PRNGKey(0))


def _decoder():
    cfg = DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=32)
    model = DecoderModel(cfg, compute_dtype=BF16)
    return model, model.init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("build", [_encoder, _decoder], ids=["encoder", "decoder"])
def test_prepared_base_same_forward_and_gradients_to_one_products_rounding(build):
    model, params = build()
    targets = model.cfg.lora_targets if hasattr(model.cfg, "lora_targets") else ("query", "value", "output")
    lora = init_lora(jax.random.PRNGKey(1), model.cfg, LoRAConfig(4, 8.0, tuple(targets)))
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape), lora)  # B != 0
    base = base_of(params)
    prepared = prepare_base(model, base)
    kts = [p for p, _ in jax.tree_util.tree_flatten_with_path(prepared["layers"])[0] if "kernel_t" in str(p)]
    kernels = [p for p, _ in jax.tree_util.tree_flatten_with_path(base["layers"])[0] if "'kernel'" in str(p)]
    assert len(kts) == len(kernels) > 0
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, 64)
    mask = jnp.ones((2, 9), jnp.int32).at[1, 6:].set(0)
    extra = {"head": params["head"]} if "head" in params else {}

    def loss(lora, base):
        out = model.apply({**base, **extra}, ids, mask, lora=lora)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    graph = str(jax.make_jaxpr(jax.grad(loss))(lora, prepared))
    assert "custom_vjp_call" in graph and "custom_vjp_call" not in str(jax.make_jaxpr(jax.grad(loss))(lora, base))
    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss))(lora, b) for b in (base, prepared))
    assert float(l0) == float(l1)                       # the forward pass is the same program
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        rel = float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(a), 1e-12))
        assert rel < 2e-2, rel                          # one bf16 rounding of an input gradient apart
        assert float(jnp.linalg.norm(a)) > 0


def test_float32_model_gets_its_base_unchanged_and_group_round_uses_prepared_base():
    model, params = _encoder()
    base = base_of(params)
    f32 = EncoderModel(model.cfg)
    assert prepare_base(f32, base) is base
    lora = init_lora(jax.random.PRNGKey(1), model.cfg, LoRAConfig(4, 8.0, ("query", "value")))
    from hfl_jax.data import make_device_data
    rng = np.random.default_rng(0)
    rows = {"input_ids": rng.integers(0, 64, (24, 9)).astype(np.int32),
            "attention_mask": np.ones((24, 9), np.int32), "labels": rng.integers(0, 2, 24).astype(np.int32)}
    rows["token_type_ids"] = np.zeros((24, 9), np.int32)
    data = make_device_data(rows, [np.arange(i * 6, i * 6 + 6) for i in range(4)])
    fn = make_group_round(model, optax.adam(1e-2), depth=2, local_steps=2, batch_size=3, n_max=data.n_max)
    args = ({"lora": lora, "head": params["head"]}, data, jnp.arange(4, dtype=jnp.int32),
            jnp.asarray(data.counts, jnp.float32), jax.random.PRNGKey(4))
    out0, m0 = fn(args[0], base, *args[1:])
    out1, m1 = fn(args[0], prepare_base(model, base), *args[1:])
    np.testing.assert_array_equal(np.asarray(m0.loss)[:, 0], np.asarray(m1.loss)[:, 0])  # step 1's forward
    for a, b in zip(jax.tree.leaves(out0), jax.tree.leaves(out1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-3)
