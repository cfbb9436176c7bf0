"""PEFT export of decoder LLM adapters (CAUSAL_LM): PEFT in PyTorch on the exported adapter gives
hfl_jax's logits and greedy generations; PEFT's own save has our layout; load_peft round-trips and
reads PEFT's adapters."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hfl_jax.export import export_peft, load_peft, peft_layout
from hfl_jax.models import DECODER_TARGETS, LoRAConfig, greedy_generate, init_lora, left_pad, load_pretrained

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
CASES = {   # name -> (model_type, config overrides, layers whose adapters were trained: None = all)
    "llama": ("llama", {}, None),
    "qwen2": ("qwen2", {}, None),
    # SmolLM2-like tied embeddings; wider init so the layers, not the tied input embedding, pick the next token
    "smollm2-tied": ("llama", dict(tie_word_embeddings=True, num_hidden_layers=3, initializer_range=0.2), 1),
}
PAD, EOS = 0, 95


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _right_padded(lengths=(10, 7, 3), seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], (len(lengths), max(lengths)))
    mask = (np.arange(max(lengths))[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return np.where(mask > 0, ids, PAD), mask


def _hf_base(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    """(name, tmp dir with base/ and adapter/, hfl_jax model, base params, exported lora)."""
    model_type, kw, top = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **kw})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():   # HF init has unit norms and zero (qwen2) biases: perturb everything
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref.save_pretrained(tmp / "base", safe_serialization=True)
    model, params = load_pretrained(str(tmp / "base"))
    assert ("lm_head" in params) == (not model.cfg.tie_word_embeddings)
    lora = init_lora(jax.random.PRNGKey(1), model.cfg, LoRAConfig(rank=4, alpha=8.0, targets=DECODER_TARGETS))
    L = model.num_layers
    trained = (np.arange(L) >= L - (L if top is None else top)).astype(np.float32)[:, None, None]
    rng = np.random.default_rng(2)
    lora = lora.replace(weights={t: {"A": ab["A"], "B": jnp.asarray(
        0.05 * rng.standard_normal(ab["B"].shape, np.float32) * trained)} for t, ab in lora.weights.items()})
    export_peft(model, params, lora, tmp / "adapter", str(tmp / "base"))
    return request.param, tmp, model, params, lora


def test_peft_logits_match(exported):
    name, tmp, model, params, lora = exported
    ids, mask = _right_padded()
    want = np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask), lora=lora))
    m = mask.astype(bool)
    assert _rel(_hf_logits(_hf_base(tmp / "base"), ids, mask)[m], want[m]) > 1e-2   # the adapters matter
    pm = peft.PeftModel.from_pretrained(_hf_base(tmp / "base"), tmp / "adapter").eval()
    assert isinstance(pm, peft.PeftModelForCausalLM)
    err = _rel(_hf_logits(pm, ids, mask)[m], want[m])
    print(f"\n{name}: PEFT vs hfl_jax logits, max|diff|/max|ref| = {err:.2e}")
    assert err <= 1e-5


def test_peft_generate_matches_greedy(exported):
    _, tmp, model, params, lora = exported
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22, 23]], pad_token_id=PAD)
    n = 8

    def hf_generate(hf_model):
        with torch.no_grad():
            new = hf_model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                    attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                                    max_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS).numpy()[:, ids.shape[1]:]
        return np.pad(new, ((0, 0), (0, n - new.shape[1])), constant_values=PAD)   # stopped early at EOS

    want = hf_generate(peft.PeftModel.from_pretrained(_hf_base(tmp / "base"), tmp / "adapter").eval())
    out = np.asarray(greedy_generate(model, params, lora, ids, mask, max_new_tokens=n, eos_token_id=EOS,
                                     pad_token_id=PAD))
    np.testing.assert_array_equal(out, want)
    assert (out != hf_generate(_hf_base(tmp / "base"))).any()   # the adapters change the continuation


def test_layout_matches_peft_save_and_peft_adapters_load(exported, tmp_path):
    """PEFT, given our adapter_config.json, saves our tensor names and shapes; its adapter (random
    weights, set in torch) read by load_peft gives PEFT's logits."""
    from safetensors.numpy import load_file

    name, tmp, model, params, _ = exported
    saved = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert {k: saved[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "fan_in_fan_out", "bias",
                                  "layers_to_transform", "modules_to_save")} == \
        dict(peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=8, fan_in_fan_out=False, bias="none",
             layers_to_transform=None, modules_to_save=None)
    assert saved["target_modules"] == list(DECODER_TARGETS)
    assert saved["base_model_name_or_path"] == str(tmp / "base")

    pm = peft.get_peft_model(_hf_base(tmp / "base"), peft.LoraConfig.from_pretrained(tmp / "adapter")).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for key, p in pm.named_parameters():
            if ".lora_" in key:
                p.copy_(0.2 * torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    ours = load_file(str(tmp / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    L = model.num_layers
    assert len(ours) == 2 * 7 * L   # A and B, 7 targets, every layer (also the never-trained ones)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours
    assert f"base_model.model.model.layers.{L - 1}.mlp.down_proj.lora_B.weight" in ours

    params2, lora2 = load_peft(model, params, tmp_path)
    ids, mask = _right_padded()
    m = mask.astype(bool)
    got = np.asarray(model.apply(params2, jnp.asarray(ids), jnp.asarray(mask), lora=lora2))
    assert _rel(got[m], _hf_logits(pm, ids, mask)[m]) <= 1e-5


def test_load_peft_round_trip_is_exact(exported):
    _, tmp, model, params, lora = exported
    params2, lora2 = load_peft(model, params, tmp / "adapter")
    assert lora2.scale == lora.scale
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert jax.tree.structure(lora2) == jax.tree.structure(lora)
    for g, w in zip(jax.tree.leaves(lora2), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_subset_of_targets_and_refusals(exported, tmp_path):
    """Only the adapted targets are written; a classification adapter, a LoRA tensor on the LM head
    or an encoder target are refused."""
    from safetensors.numpy import load_file, save_file

    _, tmp, model, params, lora = exported
    assert peft_layout(model).task_type == "CAUSAL_LM"
    some = lora.replace(weights={t: lora.weights[t] for t in ("v_proj", "q_proj", "down_proj")})
    export_peft(model, params, some, tmp_path / "some", "base", lora_alpha=16)
    config = json.loads((tmp_path / "some" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj", "down_proj"] and config["lora_alpha"] == 16
    _, lora2 = load_peft(model, params, tmp_path / "some")
    assert list(lora2.weights) == ["q_proj", "v_proj", "down_proj"] and lora2.scale == 4.0
    for t, ab in some.weights.items():   # scale 2 -> 4: B halves (exactly), the function is unchanged
        np.testing.assert_array_equal(lora2.weights[t]["A"], ab["A"])
        np.testing.assert_array_equal(lora2.weights[t]["B"], 0.5 * np.asarray(ab["B"]))

    with pytest.raises(ValueError, match="query"):
        export_peft(model, params, lora.replace(weights={"query": lora.weights["q_proj"]}), tmp_path / "x", "base")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    with pytest.raises(ValueError, match="SEQ_CLS"):
        load_peft(model, params, tmp_path / "cls")
    state = load_file(str(tmp_path / "some" / "adapter_model.safetensors"))
    state["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 32), np.float32)
    save_file(state, str(tmp_path / "some" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lm_head"):
        load_peft(model, params, tmp_path / "some")
