"""Issue 14 on a tiny encoder: dot_product_attention == the einsum reference, every remat policy ==
no remat (float32, 1e-5), and the bf16 mixed-precision policy's dtypes (f32 masters and gradients,
bf16 stored activations) and closeness to float32."""
import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfl_jax.models import EncoderConfig, EncoderModel, LoRA, LoRAConfig, init_lora
from hfl_jax.models.layers import attention_impl
from hfl_jax.models.precision import REMAT_POLICIES


def _setup(model_type="bert", **model_kw):
    cfg = EncoderConfig(model_type=model_type, vocab_size=61, hidden_size=32, num_layers=3, num_heads=4,
                        intermediate_size=48, max_position_embeddings=40, num_labels=3,
                        pad_token_id=1 if model_type == "roberta" else 0,
                        type_vocab_size=1 if model_type == "roberta" else 2)
    model = EncoderModel(cfg, **model_kw)
    params = model.init(jax.random.PRNGKey(0))
    lora = init_lora(jax.random.PRNGKey(1), cfg, LoRAConfig(4, 8.0, ("query", "value", "intermediate")))
    # non-zero B so that every adapter has a gradient
    lora = LoRA({t: {"A": ab["A"], "B": 0.1 * jax.random.normal(jax.random.PRNGKey(2 + i), ab["B"].shape)}
                 for i, (t, ab) in enumerate(lora.weights.items())}, lora.scale)
    rng = np.random.default_rng(0)
    lengths = (9, 5, 1, 0)  # right padding, a one-token row and an all-padding row
    ids = rng.integers(5, cfg.vocab_size, (len(lengths), 9)).astype(np.int32)
    mask = (np.arange(9)[None] < np.array(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, cfg.pad_token_id)
    labels = np.array([0, 2, 1, 0], np.int32)
    return model, params, lora, (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels))


def _loss(model, depth=None):
    def loss(trainable, params, batch):
        ids, mask, labels = batch
        logits = model.apply({**params, "head": trainable["head"]}, ids, mask, lora=trainable["lora"], depth=depth)
        w = (mask.sum(-1) > 0).astype(jnp.float32)
        ll = jax.nn.log_softmax(logits.astype(jnp.float32))[jnp.arange(labels.shape[0]), labels]
        return -(ll * w).sum() / w.sum()
    return loss


def _value_and_grad(model, params, lora, batch, depth=None):
    trainable = {"lora": lora, "head": params["head"]}
    return jax.jit(jax.value_and_grad(_loss(model, depth)))(trainable, params, batch)


def _close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def test_dot_product_attention_matches_einsum():
    """XLA's dot_product_attention (the GPU/float32 choice of "auto") == the einsum path: BERT loss and
    gradients, RoBERTa logits (right padding, a one-token row and an all-padding row)."""
    ref_model, params, lora, batch = _setup("bert", attention="einsum")
    model = EncoderModel(ref_model.cfg, attention="xla")
    _close(_value_and_grad(model, params, lora, batch), _value_and_grad(ref_model, params, lora, batch))
    ref_model, params, lora, (ids, mask, _) = _setup("roberta", attention="einsum")
    logits = lambda m: jax.jit(lambda p, i, k, a: m.apply(p, i, k, lora=a))(params, ids, mask, lora)
    np.testing.assert_allclose(logits(EncoderModel(ref_model.cfg, attention="xla")), logits(ref_model), atol=1e-5)


def test_attention_auto_resolution():
    assert attention_impl("einsum", jnp.bfloat16) == "einsum"
    if jax.default_backend() == "gpu":
        assert attention_impl("auto", jnp.bfloat16) == "cudnn"
        assert attention_impl("auto", jnp.float32) == "xla"  # cuDNN flash attention has no float32 path
    else:   # CPU keeps the einsum path: results bit-identical to earlier versions
        assert attention_impl("auto", jnp.bfloat16) == "einsum"
        assert attention_impl("auto", jnp.float32) == "einsum"
    with pytest.raises(ValueError, match="unknown attention"):
        EncoderModel(_setup()[0].cfg, attention="flash")


def test_remat_policies_match_no_remat():
    """Every policy gives the loss and gradients (LoRA and head) of no rematerialisation: at depth 2
    of 3 vmapped over devices (how the engine runs it), and at full depth for "full"."""
    model, params, lora, batch = _setup()
    stacked = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), {"lora": lora, "head": params["head"]})
    vg = lambda m: jax.jit(jax.vmap(jax.value_and_grad(_loss(m, 2)), in_axes=(0, None, None)))(stacked, params, batch)
    ref = vg(model)
    for policy in REMAT_POLICIES:
        if policy != "none":
            _close(vg(EncoderModel(model.cfg, remat=policy)), ref)
    _close(_value_and_grad(EncoderModel(model.cfg, remat="full"), params, lora, batch),
           _value_and_grad(model, params, lora, batch))


def test_remat_policy_unknown_is_refused():
    with pytest.raises(ValueError, match="unknown remat policy"):
        EncoderModel(_setup()[0].cfg, remat="some")


def _saved_residuals(fn, *args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return out.getvalue()


def test_bf16_policy_dtypes_and_closeness():
    model32, params, lora, batch = _setup()
    model16 = EncoderModel(model32.cfg, compute_dtype=jnp.bfloat16)
    ids, mask, _ = batch
    logits16 = model16.apply(params, ids, mask, lora=lora)
    assert logits16.dtype == jnp.float32  # head and logits stay float32
    np.testing.assert_allclose(logits16, model32.apply(params, ids, mask, lora=lora), atol=5e-2)
    (l16, g16), (l32, g32) = (_value_and_grad(m, params, lora, batch) for m in (model16, model32))
    assert l16.dtype == jnp.float32 and abs(float(l16) - float(l32)) < 2e-2
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert a.dtype == jnp.float32  # gradients of the float32 masters
        rel = float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-6))
        assert rel < 0.1, rel
    # what the backward pass keeps: the stored activations are mostly bf16 (matmul inputs, dense
    # outputs, GELU output); float32 only for the LayerNorm/residual stream and softmax
    trainable = {"lora": lora, "head": params["head"]}
    res16 = _saved_residuals(_loss(model16), trainable, params, batch)
    res32 = _saved_residuals(_loss(model32), trainable, params, batch)
    # (stacked over the 3 layers by the layer scan) the GELU input, the heads of q/k/v, x A (rank 4)
    assert all(s in res16 for s in ("bf16[3,4,9,48]", "bf16[3,4,9,4,8]", "bf16[3,4,9,4]")), res16
    assert "f32[3,4,9,48]" not in res16, res16  # GELU's float32 internals are recomputed, not stored
    assert "bf16" not in res32


def test_config_keys_reach_the_model():
    from pathlib import Path

    from hfl_jax.config import ConfigError, load_config
    from hfl_jax.driver import build_model

    smoke = Path(__file__).resolve().parents[1] / "experiments/configs/smoke.yaml"
    for override, key in [("model.remat=some", r"model\.remat"), ("model.attention=flash", r"model\.attention")]:
        with pytest.raises(ConfigError, match=key):
            load_config(smoke, [override])
    cfg = load_config(smoke, ["model.remat=dense", "model.attention=einsum"])
    model, _ = build_model(cfg, 2)
    assert (model.remat, model.attention) == ("dense", "einsum")
    assert build_model(load_config(smoke), 2)[0].remat == "none"  # defaults: no remat, float32
