"""DeBERTa v1 / v2 / v3 encoders against transformers (PyTorch), LoRA on them, unsupported options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hfl_jax.models import (ConfigError, EncoderConfig, EncoderModel, LoRA, LoRAConfig, init_lora, load_pretrained,
                             merge_lora)
from hfl_jax.models.deberta import log_bucket_position

COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64, num_labels=3, relative_attention=True)

CONFIGS = {
    # v1: absolute positions + token types, relative span clamped (T=12 > 4), tanh pooler.
    "deberta-v1": ("deberta", dict(pos_att_type="c2p|p2c", max_relative_positions=4, position_biased_input=True,
                                   type_vocab_size=2, pooler_hidden_act="tanh")),
    # v2 (deberta-v2-*): separate position projections, no buckets, no rel-embedding LayerNorm.
    "deberta-v2": ("deberta-v2", dict(pos_att_type="c2p|p2c", max_relative_positions=6, position_biased_input=True,
                                      type_vocab_size=2, share_att_key=False)),
    # v3 (deberta-v3-*): log buckets (|i-j| >= 4 bucketed), shared keys, LayerNorm-ed rel embeddings, embed_proj.
    "deberta-v3": ("deberta-v2", dict(pos_att_type="p2c|c2p", position_buckets=8, max_relative_positions=16,
                                      position_biased_input=False, type_vocab_size=0, share_att_key=True,
                                      norm_rel_ebd="layer_norm", embedding_size=24)),
}


def _batch(vocab, lengths=(12, 7, 3), seed=0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = rng.integers(3, vocab, size=(len(lengths), T))
    mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask > 0, ids, 0)
    types = (np.arange(T)[None] >= 4).astype(np.int64) * mask
    return ids, mask, types


def _torch_model(name):
    model_type, kw = CONFIGS[name]
    if model_type == "deberta":
        config = transformers.DebertaConfig(**COMMON, **kw)
        cls = transformers.DebertaForSequenceClassification
    else:
        config = transformers.DebertaV2Config(**COMMON, **kw)
        cls = transformers.DebertaV2ForSequenceClassification
    torch.manual_seed(0)
    ref = cls(config).eval()
    with torch.no_grad():  # HF init has zero biases / unit LayerNorms / tiny rel embeddings: perturb everything
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return config, ref


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, torch model, hfl_jax model, params, batch, torch outputs)."""
    config, ref = _torch_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path, safe_serialization=True)
    model, params = load_pretrained(str(path))
    ids, mask, types = _batch(config.vocab_size)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  token_type_ids=torch.tensor(types), output_hidden_states=True)
    return request.param, model, params, (ids, mask, types), out


def test_matches_transformers(pair):
    name, model, params, (ids, mask, types), out = pair
    logits, hidden = model.apply(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types),
                                 return_hidden=True)
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-5, rtol=0)
    # All positions, padding included: fully masked query rows attend uniformly in both implementations.
    np.testing.assert_allclose(hidden, out.hidden_states[-1].numpy(), atol=1e-5, rtol=0)


def test_lora_zero_b_is_identity_and_merges(pair):
    name, model, params, (ids, mask, types), _ = pair
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    lora = init_lora(jax.random.PRNGKey(1), model.cfg, LoRAConfig(rank=2, alpha=4.0,
                                                                  targets=("query", "key", "value", "output")))
    base = model.apply(params, *args)
    np.testing.assert_array_equal(model.apply(params, *args, lora=lora), base)
    rand = jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), lora.weights)
    lora = LoRA(weights=rand, scale=lora.scale)
    adapted = model.apply(params, *args, lora=lora)
    assert np.abs(np.asarray(adapted - base)).max() > 1e-3
    np.testing.assert_allclose(model.apply(merge_lora(params, lora), *args), adapted, atol=1e-5, rtol=0)


def test_log_buckets_match_transformers():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    rel = np.arange(512)[:, None] - np.arange(512)[None, :]
    for buckets, max_pos in [(256, 512), (8, 16)]:
        want = make_log_bucket_position(torch.tensor(rel), buckets, max_pos).to(torch.long).numpy()
        np.testing.assert_array_equal(log_bucket_position(rel, buckets, max_pos), want)


def test_random_init_and_param_names():
    cfg = EncoderConfig.from_hf(transformers.DebertaConfig(**COMMON, **CONFIGS["deberta-v1"][1]).to_dict())
    params = EncoderModel(cfg).init(jax.random.PRNGKey(0))
    assert set(params["layers"]["attention"]) == {"query", "key", "value", "pos_proj", "pos_q_proj"}
    assert params["extras"]["rel_embeddings"].shape == (8, 32)
    cfg3 = EncoderConfig.from_hf(transformers.DebertaV2Config(**COMMON, **CONFIGS["deberta-v3"][1]).to_dict())
    params3 = EncoderModel(cfg3).init(jax.random.PRNGKey(0))
    assert set(params3["layers"]["attention"]) == {"query", "key", "value"}  # share_att_key
    assert set(params3["extras"]) == {"rel_embeddings", "rel_ln"}
    assert params3["extras"]["rel_embeddings"].shape == (16, 32)  # 2 * position_buckets rows


def test_conv_layer_is_rejected(tmp_path):
    config = transformers.DebertaV2Config(**COMMON, conv_kernel_size=3, pos_att_type="c2p|p2c")
    torch.manual_seed(0)
    transformers.DebertaV2ForSequenceClassification(config).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ConfigError, match="conv_kernel_size"):
        load_pretrained(str(tmp_path))
