"""The bf16 backward pass through transposed frozen kernels (issue 28): ``prepare_base`` gives every
stacked dense kernel a materialized ``kernel_t``, and ``LoRADense`` then takes the input gradient of
its frozen product as ``g_bf16 @ kernel_t`` (:func:`hfl_jax.models.layers.frozen_dot`). The forward pass
is unchanged bit for bit; the gradients differ from autodiff's only in one product's summation order.
The attention's activation products (:func:`hfl_jax.models.layers.mixed_einsum`) take bf16 cotangents in
their backward pass, as ``torch.autocast``'s bf16 ``bmm`` does."""
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
from hfl_jax.models.layers import frozen_dot, mixed_einsum, prepare_base

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
    assert "name=frozen_dot" in graph and "name=frozen_dot" not in str(jax.make_jaxpr(jax.grad(loss))(lora, base))
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


# the attention products of the encoder (BERT) and decoder (grouped-query) paths
SPECS = {"bqhd,bkhd->bhqk": ((2, 5, 3, 4), (2, 6, 3, 4)), "bhqk,bkhd->bqhd": ((2, 3, 5, 6), (2, 6, 3, 4)),
         "bqkgd,bskd->bkgqs": ((2, 5, 2, 3, 4), (2, 6, 2, 4)), "bkgqs,bskd->bqkgd": ((2, 2, 3, 5, 6), (2, 6, 2, 4))}


def _operands(spec, dtype, seed=0):
    sa, sb = SPECS[spec]
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    return jax.random.normal(k[0], sa).astype(dtype), jax.random.normal(k[1], sb).astype(dtype)


@pytest.mark.parametrize("spec", list(SPECS))
def test_mixed_einsum_float32_is_the_plain_einsum_bit_for_bit(spec):
    a, b = _operands(spec, jnp.float32)
    plain = lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)  # noqa: E731
    f = lambda fn: jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b))), argnums=(0, 1)))  # noqa: E731
    (v0, g0), (v1, g1) = f(plain)(a, b), f(lambda a, b: mixed_einsum(spec, a, b))(a, b)
    assert float(v0) == float(v1)
    for x, y in zip(g0, g1):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda a, b: mixed_einsum(spec, a, b))(a, b))


@pytest.mark.parametrize("spec", list(SPECS))
def test_mixed_einsum_bf16_backward_is_the_bf16_cotangent_products_rounded(spec):
    a, b = _operands(spec, BF16)
    g = jax.random.normal(jax.random.PRNGKey(9), jnp.einsum(spec, a, b).shape, jnp.float32)
    y, vjp = jax.vjp(lambda a, b: mixed_einsum(spec, a, b), a, b)
    da, db = vjp(g)
    assert y.dtype == jnp.float32 and da.dtype == db.dtype == BF16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)))
    ins, out = spec.split("->")
    x, z = ins.split(",")
    g16 = np.asarray(g.astype(BF16), np.float64)                    # the cotangent rounded to bf16 first
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for got, exact in ((da, np.einsum(f"{out},{z}->{x}", g16, b64)), (db, np.einsum(f"{out},{x}->{z}", g16, a64))):
        exact = exact.astype(ml_dtypes.bfloat16).astype(np.float64)   # one rounding to bf16
        ulp = np.abs(exact) * 2.0 ** -7 + 1e-30
        assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= ulp)
    # and within bf16 precision of autodiff's float32-cotangent gradients
    _, vjp32 = jax.vjp(lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32), a, b)
    for got, ref in zip((da, db), vjp32(g)):
        ref = np.asarray(ref, np.float64)
        assert np.linalg.norm(np.asarray(got, np.float64) - ref) <= 1e-2 * np.linalg.norm(ref)


@pytest.mark.parametrize("spec", ["ij,jk->i", "ij,jk", "ij,jk,kl->il"])
def test_mixed_einsum_refuses_specs_without_a_one_einsum_gradient(spec):
    a = jnp.ones((2, 3), BF16)
    with pytest.raises(ValueError, match="mixed_einsum"):
        mixed_einsum(spec, a, jnp.ones((3, 4), BF16))
