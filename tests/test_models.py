"""Encoders against transformers (PyTorch), checkpoint import errors, the packaged MiniLM."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hfl_jax.models import CheckpointError, ConfigError, FreshHeadWarning, load_pretrained


def _batch(vocab, seed=0, lengths=(7, 4, 2), with_types=True):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = rng.integers(5, vocab, size=(len(lengths), T))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = np.where(mask > 0, ids, 1)  # pad id 1 (RoBERTa's); BERT treats it as a token id under mask 0
    types = np.where(np.arange(T)[None] >= 2, 1, 0) * mask if with_types else np.zeros_like(ids)
    return ids, mask, types


def _tiny(model_type, **kw):
    common = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=40, num_labels=3)
    common.update(kw)
    if model_type == "bert":
        return transformers.BertConfig(**common), transformers.BertForSequenceClassification
    return (transformers.RobertaConfig(pad_token_id=1, type_vocab_size=1, **common),
            transformers.RobertaForSequenceClassification)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_matches_transformers(tmp_path, model_type):
    config, cls = _tiny(model_type)
    torch.manual_seed(0)
    ref = cls(config).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model, params = load_pretrained(str(tmp_path))
    ids, mask, types = _batch(config.vocab_size, with_types=model_type == "bert")
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  token_type_ids=torch.tensor(types), output_hidden_states=True)
    logits, hidden = model.apply(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types),
                                 return_hidden=True)
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-5)
    m = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[m], out.hidden_states[-1].numpy()[m], atol=1e-5)


def test_minilm_matches_bertmodel_on_real_sentences():
    from transformers import AutoTokenizer, BertModel
    from hfl_jax.models import resolve_model_dir

    path = resolve_model_dir("minilm-l6")
    tok = AutoTokenizer.from_pretrained(str(path))
    sentences = ["it 's a charming and often affecting journey .",
                 "unflinchingly bleak and desperate",
                 "the acting , costumes , music , cinematography and sound are all astounding given the production 's austere locales ."]
    enc = tok(sentences, padding=True, return_tensors="np")
    ref = BertModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        want = ref(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    with pytest.warns(FreshHeadWarning):
        model, params = load_pretrained("minilm-l6")
    _, hidden = model.apply(params, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                            return_hidden=True)
    m = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[m], want[m], atol=1e-4)
    assert model.cfg.num_layers == 6 and model.cfg.hidden_size == 384


# --- bad inputs -------------------------------------------------------------------------------------

def _save_tiny(path, model_type="bert", **kw):
    config, cls = _tiny(model_type, **kw)
    torch.manual_seed(0)
    cls(config).save_pretrained(path, safe_serialization=True)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(str(tmp_path))


def test_bin_only_checkpoint_is_refused(tmp_path):
    _save_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # transformers 5 only writes safetensors: fake a .bin-only dir
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"never unpickles.*save_pretrained"):
        load_pretrained(str(tmp_path))


def test_unknown_model_type(tmp_path):
    _save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown model_type 'gpt2'"):
        load_pretrained(str(tmp_path))


def test_wrong_num_labels_against_checkpoint_head(tmp_path):
    _save_tiny(tmp_path)  # 3 labels
    with pytest.raises(CheckpointError, match="num_labels=5"):
        load_pretrained(str(tmp_path), num_labels=5)
    with pytest.warns(FreshHeadWarning):
        model, params = load_pretrained(str(tmp_path), num_labels=5, reinit_head=True)
    assert params["head"]["classifier"]["kernel"].shape == (32, 5)


def test_missing_tensor_and_shape_mismatch_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    _save_tiny(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "bert.encoder.layer.1.attention.self.value.weight"
    broken = {k: v for k, v in state.items() if k != key}
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_pretrained(str(tmp_path))
    state[key] = state[key][:, :16]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_pretrained(str(tmp_path))


def test_unknown_hub_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not find model"):
        load_pretrained("no-such-org/no-such-model-xyz")
