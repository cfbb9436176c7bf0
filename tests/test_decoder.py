"""Decoder-only LMs (Llama, Qwen2, Mistral) against transformers' PyTorch models, on random weights.

Parity at the real widths of four hub checkpoints (fewer layers, a 512-token vocabulary), RoPE
variants, config layouts, sharded / bf16 checkpoints, and the model's own equivalences: LoRA ==
merged weights, depth cut, packed == padded, KV-cache greedy == repeated full forwards == HF generate.
"""
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hfl_jax.models import (DECODER_SHAPES, DECODER_TARGET_PATHS, DECODER_TARGETS, CheckpointError, ConfigError,
                            DecoderConfig, DecoderModel, LoRAConfig, greedy_generate, init_lora, left_pad,
                            load_pretrained, merge_lora)
from hfl_jax.models import rope as rope_lib


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _save(hf: dict, path, seed=0):
    """A random transformers model from a config.json dict (``torch.manual_seed``), saved as safetensors."""
    kw = {k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype", "model_type")}
    config = transformers.AutoConfig.for_model(hf["model_type"], **kw)
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    ref.save_pretrained(path, safe_serialization=True)
    return ref


def _right_padded(vocab, lengths=(10, 7), seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (len(lengths), max(lengths)))
    mask = (np.arange(max(lengths))[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return ids, mask


def _parity(ref, model, params, ids, mask):
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask)))
    m = mask.astype(bool)
    return _rel(got[m], want[m]), got, want


def _tiny(model_type="llama", **kw):
    hf = dict(model_type=model_type, vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    hf.update(kw)
    return hf


# ------------------------------------------------------------------ parity with transformers

@pytest.fixture
def mem_path(tmp_path):
    """A directory in memory (/dev/shm) when there is one: real-width checkpoints are ~1 GB."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        yield Path(d)


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "mistral-7b"])
def test_real_width_parity(mem_path, name):
    """Logits at the checkpoint's real widths (1-2 layers, vocab 512), right-padded batch, <= 1e-5."""
    hf = dict(DECODER_SHAPES[name], vocab_size=512, num_hidden_layers=1 if name == "mistral-7b" else 2,
              bos_token_id=1, eos_token_id=2)   # token ids inside the small vocabulary
    if name == "mistral-7b":
        hf["sliding_window"] = 4   # smaller than T = 10: the window masks
    ref = _save(hf, mem_path)
    model, params = load_pretrained(mem_path)
    # the saved config.json is transformers-5's layout; the hub dict (transformers-4) gives the same model
    assert json.loads((mem_path / "config.json").read_text()).get("rope_parameters")
    assert model.cfg == DecoderConfig.from_hf(hf)
    assert ("lm_head" in params) == (not hf["tie_word_embeddings"]) and "head" not in params
    ids, mask = _right_padded(512)
    err, got, want = _parity(ref, model, params, ids, mask)
    print(f"\n{name}: max|diff|/max|ref| = {err:.2e}")
    assert err <= 1e-5
    if name == "mistral-7b":   # the window changes the answer, so the test sees it
        full = DecoderModel(dataclasses.replace(model.cfg, sliding_window=None))
        assert _rel(np.asarray(full.apply(params, jnp.asarray(ids), jnp.asarray(mask)))[mask > 0],
                    want[mask > 0]) > 1e-3
    if name == "llama-3.2-1b":   # llama3 scaling changes the low frequencies
        inv = rope_lib.static_inv_freq(model.cfg.rope, model.cfg.head_dim)
        assert not np.allclose(inv, rope_lib.static_inv_freq(rope_lib.default_rope(500000.0), 64))


@pytest.mark.parametrize("case", ["linear", "dynamic", "qwen2_window_layers", "llama_biases"])
def test_tiny_variant_parity(tmp_path, case):
    """RoPE linear / dynamic (past max_position_embeddings), Qwen2 per-layer windows, Llama biases."""
    hf = {"linear": _tiny(rope_scaling={"type": "linear", "factor": 4.0}),
          "dynamic": _tiny(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=6),
          "qwen2_window_layers": _tiny("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1),
          "llama_biases": _tiny(attention_bias=True, mlp_bias=True, head_dim=16)}[case]
    ref = _save(hf, tmp_path)
    model, params = load_pretrained(tmp_path)
    assert model.cfg == DecoderConfig.from_hf(hf)
    ids, mask = _right_padded(96)
    err, _, want = _parity(ref, model, params, ids, mask)
    assert err <= 1e-5, err
    if case in ("linear", "dynamic"):   # the variant matters at these positions
        plain = DecoderModel(dataclasses.replace(model.cfg, rope=rope_lib.default_rope()))
        assert _rel(np.asarray(plain.apply(params, jnp.asarray(ids), jnp.asarray(mask)))[mask > 0],
                    want[mask > 0]) > 1e-4
    if case == "qwen2_window_layers":
        assert model.cfg.layer_windows == (None, 3)
        full = DecoderModel(dataclasses.replace(model.cfg, sliding_window=None, sliding_layers=None))
        assert _rel(np.asarray(full.apply(params, jnp.asarray(ids), jnp.asarray(mask)))[mask > 0],
                    want[mask > 0]) > 1e-4


def test_config_layouts_and_sharded_checkpoint(tmp_path):
    """transformers-4 and -5 config.json give one model; a sharded checkpoint loads the same weights."""
    hf = _tiny(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
               rope_theta=50000.0, tie_word_embeddings=True)
    ref = _save(hf, tmp_path / "t5")
    t5 = json.loads((tmp_path / "t5" / "config.json").read_text())
    assert "rope_parameters" in t5 and "rope_scaling" not in t5
    shutil.copytree(tmp_path / "t5", tmp_path / "t4")
    t4 = {k: v for k, v in t5.items() if k != "rope_parameters"}
    t4.update(rope_theta=50000.0, rope_scaling=dict(hf["rope_scaling"]))
    (tmp_path / "t4" / "config.json").write_text(json.dumps(t4))
    ref.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    m5, p5 = load_pretrained(tmp_path / "t5")
    m4, p4 = load_pretrained(tmp_path / "t4")
    ms, ps = load_pretrained(tmp_path / "sharded")
    assert m4 == m5 == ms
    assert dict(m5.cfg.rope)["rope_type"] == "llama3"
    # llama3 scaling at positions where it matters (wavelengths 6 to 2e4 against original 16)
    ids, mask = _right_padded(96, (14, 9))
    err, _, want = _parity(ref, m5, p5, ids, mask)
    assert err <= 1e-5, err
    plain = DecoderModel(dataclasses.replace(m5.cfg, rope=rope_lib.default_rope(50000.0)))
    assert _rel(np.asarray(plain.apply(p5, ids, mask))[mask > 0], want[mask > 0]) > 1e-4
    for other in (p4, ps):
        jax.tree.map(np.testing.assert_array_equal, other, p5)


def test_bf16_checkpoint_loads(tmp_path):
    """Hub decoders are stored in bfloat16 (which safetensors.numpy cannot read)."""
    ref = _save(_tiny("qwen2"), tmp_path)
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    _, params = load_pretrained(tmp_path / "bf16")
    want = ref.model.layers[1].self_attn.q_proj.weight.float().detach().numpy().T
    np.testing.assert_array_equal(params["layers"]["q_proj"]["kernel"][1], want)
    assert params["layers"]["q_proj"]["kernel"].dtype == jnp.float32


def test_config_and_checkpoint_errors(tmp_path):
    for arch, mt in [("GPT2LMHeadModel", "gpt2"), ("Phi3ForCausalLM", "phi3"), ("Phi3ForCausalLM", "llama")]:
        d = tmp_path / f"{arch}-{mt}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(_tiny(mt), architectures=[arch])))
        with pytest.raises(ConfigError, match="config.json") as e:
            load_pretrained(d)
        assert arch in str(e.value) or mt in str(e.value)
    with pytest.raises(ConfigError, match=r"config.json.*'yarn'.*rope_scaling"):
        DecoderConfig.from_hf(_tiny(rope_scaling={"type": "yarn", "factor": 2.0}))
    with pytest.raises(ConfigError, match=r"config.json.*gelu.*hidden_act"):
        DecoderConfig.from_hf(_tiny(hidden_act="gelu"))
    with pytest.raises(ValueError, match="q_proj"):
        DecoderConfig.from_hf(_tiny()).lora_target_dims("query")
    # a missing tensor is named
    from safetensors.numpy import load_file, save_file
    _save(_tiny(), tmp_path / "ok")
    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_pretrained(tmp_path / "ok")


# ------------------------------------------------------------------ the model's own equivalences

@functools.lru_cache(maxsize=None)
def _model(model_type="mistral", layers=4, **kw):
    """A random tiny model (cached: every test reads the same arrays and compiled programs); a
    Mistral one has a sliding window of 3 tokens."""
    kw = {"sliding_window": 3, **kw} if model_type == "mistral" else kw
    model = DecoderModel(DecoderConfig.from_hf(_tiny(model_type, num_hidden_layers=layers, **kw)))
    return model, jax.jit(model.init)(jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _lora(model, seed=1, top=None):
    """All seven targets, random nonzero B (on the top ``top`` layers only, if given)."""
    lora = jax.jit(init_lora, static_argnums=(1, 2))(
        jax.random.PRNGKey(seed), model.cfg, LoRAConfig(rank=4, alpha=8.0, targets=DECODER_TARGETS))
    L = model.num_layers
    keep = np.arange(L) >= L - (L if top is None else top)
    weights = {t: {"A": ab["A"], "B": 0.05 * np.random.default_rng(seed + i).normal(size=ab["B"].shape)
                   .astype(np.float32) * keep[:, None, None]} for i, (t, ab) in enumerate(lora.weights.items())}
    return dataclasses.replace(lora, weights=weights)


@functools.lru_cache(maxsize=None)
def _apply(model):
    return jax.jit(model.apply, static_argnames=("depth", "start_layer", "return_hidden"))


def test_layout_and_lora_equals_merged():
    qwen = DecoderModel(DecoderConfig.from_hf(_tiny("qwen2", num_hidden_layers=4)))
    shapes = jax.eval_shape(qwen.init, jax.random.PRNGKey(0))
    assert set(shapes) == {"embeddings", "layers", "final_norm", "lm_head"}
    assert shapes["layers"]["k_proj"]["kernel"].shape == (4, 32, 2 * 8)
    assert "bias" in shapes["layers"]["q_proj"] and "bias" not in shapes["layers"]["o_proj"]
    tied = DecoderModel(dataclasses.replace(qwen.cfg, tie_word_embeddings=True))
    assert "lm_head" not in jax.eval_shape(tied.init, jax.random.PRNGKey(0))
    model, params = _model()
    lora = _lora(model)
    ids, mask = _right_padded(96, (9, 6))
    apply = _apply(model)
    got = apply(params, ids, mask, lora=lora)
    want = apply(merge_lora(params, lora, DECODER_TARGET_PATHS), ids, mask)
    assert _rel(got, want) <= 1e-5 and _rel(got, apply(params, ids, mask)) > 1e-3


def test_depth_cut_gradients_and_traced_depth():
    model, params = _model()   # Mistral-style, sliding window 3
    lora = _lora(model)
    ids, mask = _right_padded(96, (8, 5))
    w = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 96))

    def loss(lora, depth):
        return jnp.sum(model.apply(params, ids, mask, lora=lora, depth=depth) * w)
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (_, full), (v_cut, cut) = grad(lora, None), grad(lora, 2)
    v_traced, traced = jax.jit(jax.value_and_grad(loss))(lora, jnp.int32(2))
    np.testing.assert_allclose(v_traced, v_cut, rtol=1e-6)
    for t in DECODER_TARGETS:
        for k in ("A", "B"):
            tol = 1e-5 * float(np.abs(full.weights[t][k]).max())
            np.testing.assert_allclose(cut.weights[t][k][2:], full.weights[t][k][2:], rtol=0, atol=tol)
            np.testing.assert_allclose(traced.weights[t][k], cut.weights[t][k], rtol=0, atol=tol)
            assert not np.any(np.asarray(cut.weights[t][k][:2])) and not np.any(np.asarray(traced.weights[t][k][:2]))
            assert np.any(np.asarray(cut.weights[t][k][2:]))


def test_bottom_hidden_and_start_layer():
    model, params = _model()
    lora = _lora(model, top=2)   # the bottom layers' adapters at init (B = 0)
    ids, mask = _right_padded(96, (9, 4))
    h0 = jax.jit(model.bottom_hidden, static_argnames="stop_layer")(params, ids, mask, stop_layer=2)
    got = _apply(model)(params, None, mask, lora=lora, depth=2, start_layer=2, hidden0=h0)
    assert _rel(got, _apply(model)(params, ids, mask, lora=lora)) <= 1e-6


def test_packed_equals_padded():
    model, params = _model()   # Mistral-style, sliding window 3 < both sequences
    lora = _lora(model)
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 96, 6), rng.integers(0, 96, 4)
    row = np.zeros((1, 12), np.int64)
    row[0, :10] = np.concatenate([a, b])
    seg = np.array([[1] * 6 + [2] * 4 + [0] * 2])
    pos = np.array([list(range(6)) + list(range(4)) + [0, 0]])
    packed = _apply(model)(params, row, seg > 0, lora=lora, position_ids=pos, segment_ids=seg)[0]
    ids, mask = _right_padded(96, (6, 4))   # each sequence alone, right-padded in one batch
    ids[0, :6], ids[1, :4] = a, b
    alone = _apply(model)(params, ids, mask, lora=lora)
    assert _rel(packed[:6], alone[0, :6]) <= 1e-5 and _rel(packed[6:10], alone[1, :4]) <= 1e-5


# ------------------------------------------------------------------ generation

@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_greedy_kv_cache_equals_full_forwards(model_type):
    model, params = _model(model_type, layers=2)   # mistral: sliding window 3
    lora = _lora(model)
    ids, mask = left_pad([[5, 6, 7, 8, 9], [11, 12], [20, 21, 22]], pad_token_id=0)
    n, T = 6, ids.shape[1]
    out = np.asarray(greedy_generate(model, params, lora, ids, mask, max_new_tokens=n, eos_token_id=None,
                                     pad_token_id=0))
    # argmax of full forwards over prompt + tokens so far (one shape: later slots cannot be seen)
    seq = np.concatenate([ids, np.zeros((3, n), ids.dtype)], 1)
    seq_mask = np.concatenate([mask, np.ones((3, n), mask.dtype)], 1)
    for s in range(n):
        logits = _apply(model)(params, seq, seq_mask, lora=lora)
        seq[:, T + s] = np.asarray(jnp.argmax(logits[:, T + s - 1], -1))
    want = seq[:, T:]
    np.testing.assert_array_equal(out, want)
    # EOS: the row emits it, then pads; other rows stop at their own first EOS
    eos = int(want[0, 1])
    stopped = np.asarray(greedy_generate(model, params, lora, ids, mask, max_new_tokens=n, eos_token_id=[eos, 95],
                                         pad_token_id=0))
    expect = want.copy()
    for r in range(3):
        hits = np.flatnonzero(np.isin(want[r], [eos, 95]))
        if hits.size:
            expect[r, hits[0] + 1:] = 0
    np.testing.assert_array_equal(stopped, expect)
    assert stopped[0, 1] == eos and not stopped[0, 2:].any()


def test_greedy_matches_transformers_generate(tmp_path):
    hf = _tiny(num_hidden_layers=2)
    ref = _save(hf, tmp_path)
    model, params = load_pretrained(tmp_path)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22, 23]], pad_token_id=0)
    n = 8
    with torch.no_grad():
        hf_out = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                              attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                              max_new_tokens=n, pad_token_id=0, eos_token_id=95).numpy()[:, ids.shape[1]:]
    hf_out = np.pad(hf_out, ((0, 0), (0, n - hf_out.shape[1])), constant_values=0)
    out = np.asarray(greedy_generate(model, params, None, ids, mask, max_new_tokens=n, eos_token_id=95,
                                     pad_token_id=0))
    np.testing.assert_array_equal(out, hf_out)
    assert len(np.unique(out)) > 3   # a real continuation, not one repeated token


def test_bf16_compute_dtype_close():
    model, params = _model()
    cfg = model.cfg
    ids, mask = _right_padded(96, (9, 6))
    f32 = _apply(model)(params, ids, mask)
    bf16 = DecoderModel(cfg, compute_dtype=jnp.bfloat16).apply(params, ids, mask)
    assert bf16.dtype == jnp.float32 and _rel(bf16, f32) < 5e-2
