"""PEFT export: an exported adapter loaded by PEFT in PyTorch gives hfl_jax's logits; load_peft round-trips."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hfl_jax.export import export_peft, load_peft
from hfl_jax.models import EncoderConfig, EncoderModel, LoRAConfig, init_lora, load_pretrained
from hfl_jax.models.lora import TARGETS

COMMON = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              num_labels=2, max_position_embeddings=40)
FAMILIES = {
    "bert": (transformers.BertConfig, transformers.BertForSequenceClassification, {}),
    "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification,
                dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    # deberta-v3 style: shared attention keys, so the query LoRA also acts on the relative embeddings.
    "deberta-v3": (transformers.DebertaV2Config, transformers.DebertaV2ForSequenceClassification,
                   dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=8,
                        max_relative_positions=16, position_biased_input=False, type_vocab_size=0,
                        share_att_key=True, norm_rel_ebd="layer_norm")),
}


def _batch(pad_id, lengths=(9, 5, 2), vocab=99, seed=0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask > 0, rng.integers(3, vocab, size=(len(lengths), T)), pad_id)
    return ids, mask


def _perturbed(tree, key, std):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    """(family, torch class, base dir, adapter dir, hfl_jax model, params with new head, lora)."""
    config_cls, model_cls, kw = FAMILIES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    ref = model_cls(config_cls(**COMMON, **kw)).eval()
    with torch.no_grad():  # HF init has zero biases and unit LayerNorms: perturb everything
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp / "base", safe_serialization=True)
    model, params = load_pretrained(str(tmp / "base"))
    lora = init_lora(jax.random.PRNGKey(1), model.cfg, LoRAConfig(rank=4, alpha=8.0, targets=TARGETS))
    lora = lora.replace(weights={t: {"A": ab["A"], "B": 0.1 * jax.random.normal(jax.random.PRNGKey(i), ab["B"].shape)}
                                 for i, (t, ab) in enumerate(lora.weights.items())})
    params = {**params, "head": _perturbed(params["head"], jax.random.PRNGKey(2), 0.3)}
    export_peft(model, params, lora, tmp / "adapter", str(tmp / "base"))
    return request.param, model_cls, tmp, model, params, lora


def test_peft_in_pytorch_matches(exported):
    name, model_cls, tmp, model, params, lora = exported
    pad = 1 if name == "roberta" else 0
    ids, mask = _batch(pad)
    want = model.apply(params, jnp.asarray(ids), jnp.asarray(mask), lora=lora)
    base_only = model.apply({**params, "head": load_pretrained(str(tmp / "base"))[1]["head"]},
                            jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(want) - np.asarray(base_only)).max() > 1e-2  # adapters and head both matter

    pm = peft.PeftModel.from_pretrained(model_cls.from_pretrained(tmp / "base"), tmp / "adapter").eval()
    with torch.no_grad():
        got = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=0)


def test_key_layout_matches_peft_save(exported):
    """PEFT itself, given our adapter_config.json, saves exactly our tensor names and shapes."""
    from safetensors.numpy import load_file

    name, model_cls, tmp, *_ = exported
    config = peft.LoraConfig.from_pretrained(tmp / "adapter")
    peft.get_peft_model(model_cls.from_pretrained(tmp / "base"), config).save_pretrained(tmp / "reference")
    ours = load_file(str(tmp / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(tmp / "reference" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    saved = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["task_type"], saved["r"], saved["lora_alpha"]) == ("LORA", "SEQ_CLS", 4, 8)


def test_load_peft_round_trip_is_exact(exported):
    _, _, tmp, model, params, lora = exported
    base = load_pretrained(str(tmp / "base"))[1]
    params2, lora2 = load_peft(model, base, tmp / "adapter")
    assert lora2.scale == lora.scale
    for got, want in ((params2["head"], params["head"]), (lora2.weights, lora.weights)):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_other_alpha_rescales_b(exported, tmp_path):
    """Recording another lora_alpha keeps the function: B absorbs the change of scale."""
    _, _, tmp, model, params, lora = exported
    export_peft(model, params, lora, tmp_path, "base", lora_alpha=16)
    params2, lora2 = load_peft(model, params, tmp_path)
    assert lora2.scale == 4.0
    ids, mask = _batch(0)
    np.testing.assert_allclose(model.apply(params2, ids, mask, lora=lora2), model.apply(params, ids, mask, lora=lora),
                               atol=1e-5, rtol=0)


def test_deberta_v1_is_refused(tmp_path):
    cfg = EncoderConfig(model_type="deberta", vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=37)
    model = EncoderModel(cfg)
    lora = init_lora(jax.random.PRNGKey(0), cfg, LoRAConfig(rank=2))
    with pytest.raises(NotImplementedError, match="in_proj"):
        export_peft(model, {"head": {}}, lora, tmp_path, "microsoft/deberta-base")
