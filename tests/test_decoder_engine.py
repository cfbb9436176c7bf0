"""Decoder LLMs through the federated engine: the causal-LM objective, every algorithm, the CLI
(smoke run learns, kill and resume bit-identically), bad input, the cost model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfl_jax.algos import ALGORITHMS
from hfl_jax.config import load_config
from hfl_jax.driver import build, next_round
from hfl_jax.models import DecoderConfig, DecoderModel, LoRAConfig, init_lora
from hfl_jax.objectives import causal_lm

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "decoder_smoke.yaml"
FAST = ["train.rounds=2", "train.local_steps=2", "train.batch_size=4", "data.eval_subset=16",
        "train.eval_batch_size=16", "partition.num_devices=4", "data.train_subset=64"]


def hfl(*args, env=None, timeout=600):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "hfl_jax", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _tiny(vocab=64, layers=2):
    cfg = DecoderConfig(model_type="llama", vocab_size=vocab, hidden_size=32, num_layers=layers, num_heads=4,
                        num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=128,
                        tie_word_embeddings=True)
    model = DecoderModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    lora = init_lora(jax.random.PRNGKey(1), cfg, LoRAConfig(rank=2, alpha=4, targets=("q_proj", "v_proj", "down_proj")))
    # nonzero B so the adapters matter
    lora = lora.replace(weights={t: dict(ab, B=0.05 * jax.random.normal(jax.random.PRNGKey(i), ab["B"].shape))
                                 for i, (t, ab) in enumerate(lora.weights.items())})
    return model, params, lora


def _batch(rng, lengths, prompt_lengths, T, vocab):
    B = len(lengths)
    ids = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.int32)
    labels = np.full((B, T), -100, np.int32)
    for b, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids[b, :n] = rng.integers(3, vocab, n)
        mask[b, :n] = 1
        labels[b, p:n] = ids[b, p:n]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), "labels": labels,
            "mask": np.ones(B, bool)}


def test_loss_counts_response_tokens_only():
    """The loss is the mean next-token cross-entropy over response tokens, computed by hand from the
    logits; prompt and padding positions contribute nothing (their logits can be anything)."""
    model, params, lora = _tiny()
    rng = np.random.default_rng(0)
    batch = _batch(rng, [10, 7, 12], [4, 5, 3], 12, 64)
    fn = jax.jit(causal_lm.loss_fn(model, depth=2))
    loss, m = fn({"lora": lora}, params, batch)
    logits = np.asarray(jax.jit(model.apply)(params, batch["input_ids"], batch["attention_mask"], lora=lora),
                        np.float64)
    terms = []
    for b in range(3):
        for t in range(11):
            y = batch["labels"][b, t + 1]
            if y >= 0:
                z = logits[b, t]
                terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[y])
    assert int(m.count) == len(terms) == (10 - 4) + (7 - 5) + (12 - 3)
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
    # a masked-out example adds nothing
    masked = dict(batch, mask=np.array([True, False, True]))
    _, m2 = fn({"lora": lora}, params, masked)
    assert int(m2.count) == len(terms) - 2


def test_packed_loss_equals_padded_loss():
    from hfl_jax.data.packing import PackSpec, first_fit_decreasing, pack_batch

    model, params, lora = _tiny()
    rng = np.random.default_rng(1)
    lengths = [9, 5, 12, 4]
    batch = _batch(rng, lengths, [3, 2, 6, 1], 12, 64)
    row, offset, rows = first_fit_decreasing(np.array(lengths), 16)
    packed = pack_batch({k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(row), jnp.asarray(offset),
                        PackSpec(rows, 16, 0))
    fn = causal_lm.loss_fn(model, depth=2)
    value_and_grad = jax.jit(jax.value_and_grad(lambda l, b: fn({"lora": l}, params, b), has_aux=True))
    (padded_loss, pm), g_pad = value_and_grad(lora, batch)
    (packed_loss, km), g_pack = value_and_grad(lora, packed)
    assert rows < len(lengths) and int(pm.count) == int(km.count)
    np.testing.assert_allclose(float(packed_loss), float(padded_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_pad), jax.tree.leaves(g_pack)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_label_word_metric_scores_the_last_prompt_position():
    """evaluate's main metric on a classification-as-generation set: argmax over the label words'
    logits at the last prompt token, by hand."""
    model, params, lora = _tiny()
    rng = np.random.default_rng(2)
    batch = _batch(rng, [8, 6, 9, 7, 5], [5, 3, 6, 4, 2], 10, 64)
    label_ids = (7, 11, 13)
    classes = np.array([0, 2, 1, 1, 0])
    ev = causal_lm.lm_eval(batch, 2, classes, label_ids)
    loss, acc = jax.jit(causal_lm.evaluate_fn(model))({"lora": lora}, params, ev)
    logits = np.asarray(model.apply(params, batch["input_ids"], batch["attention_mask"], lora=lora))
    pos = causal_lm.answer_positions(batch["labels"])
    assert pos.tolist() == [4, 2, 5, 3, 1]
    pred = np.argmax(logits[np.arange(5), pos][:, list(label_ids)], -1)
    assert float(acc) == pytest.approx(np.mean(pred == classes))
    whole, m = causal_lm.loss_fn(model, depth=0)({"lora": lora}, params, batch)
    assert float(loss) == pytest.approx(float(whole), rel=1e-5)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_two_rounds_on_a_decoder(name):
    # one layer (depth 1; HierFedLoRA's bandit still chooses tau): half the compilation of two
    cfg = load_config(SMOKE, [f"algorithm.name={name}", *FAST, "model.tiny.num_layers=1", "algorithm.depths=[1]",
                              "algorithm.fixed_depth=1"])
    exp = build(cfg)
    assert "head" not in exp.initial.trainable   # decoders train LoRA only
    state = exp.initial
    for _ in range(2):
        state, rec = next_round(exp, state)
        active = [g for g in rec["groups"] if not g["skipped"]]
        assert active and all(np.isfinite(g["train_loss"]) and g["time"] > 0 for g in active)
        assert not rec["dropped_devices"]
    from hfl_jax.driver import evaluate_global
    metrics = evaluate_global(exp, state.trainable)
    assert np.isfinite(metrics["eval_loss"]) and 0 <= metrics["eval_accuracy"] <= 1
    assert metrics["eval_perplexity"] == pytest.approx(np.exp(metrics["eval_loss"]), rel=1e-6)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.trainable),
                                                         jax.tree.leaves(exp.initial.trainable))]
    assert max(moved) > 0


@pytest.fixture(scope="module")
def decoder_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "decoder_smoke"
    r = hfl("run", SMOKE, "--out", out, "--quiet", "--no-plots")
    assert r.returncode == 0, r.stderr
    return out


def _records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_decoder_smoke_learns(decoder_smoke):
    """Label-word accuracy clearly above the evaluation set's majority rate (65 of 120 negative)."""
    summary = json.loads((decoder_smoke / "summary.json").read_text())
    assert summary["final_accuracy"] >= 0.75 > 65 / 120 + 0.15
    rec = _records(decoder_smoke)[-1]
    assert rec["eval_perplexity"] == pytest.approx(np.exp(rec["eval_loss"]), rel=1e-6)


def test_killed_decoder_run_resumes_bit_identically(decoder_smoke, tmp_path):
    out = tmp_path / "killed"
    r = hfl("run", SMOKE, "--out", out, "--quiet", "--no-plots", env={"HFL_FAULT_KILL_ROUND": "3"})
    assert r.returncode == -9, (r.returncode, r.stderr)
    r = hfl("resume", out, "--quiet", "--no-plots")
    assert r.returncode == 0, r.stderr
    strip = lambda recs: [{k: v for k, v in x.items() if k != "wall_time"} for x in recs]
    assert strip(_records(out)) == strip(_records(decoder_smoke))
    from hfl_jax import checkpoint as ckpt
    a = ckpt.manager(decoder_smoke / "checkpoints", 10)
    b = ckpt.manager(out / "checkpoints", 10)
    assert a.latest_step() == b.latest_step() == 15
    la = jax.tree_util.tree_leaves_with_path(a.restore(15)["trainable"])
    lb = jax.tree_util.tree_leaves_with_path(b.restore(15)["trainable"])
    assert len(la) == len(lb) > 0
    for (pa, xa), (pb, xb) in zip(la, lb):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))


def _one_error_line(r):
    """Exit code 2 and one error line, the last (progress lines about the data read may precede it)."""
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("hfl-jax:")]
    assert r.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0], (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    return errors[0]


def test_unsupported_architecture_exits_2_naming_config_json(tmp_path):
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                       "n_layer": 2}))
    out = tmp_path / "never"
    line = _one_error_line(hfl("run", SMOKE, "--set", f"model.name={model_dir}", "--out", out))
    assert "config.json" in line and "gpt2" in line
    assert not out.exists()


def test_instruction_file_without_the_response_field_exits_2(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"q{i}", "solution": "a"}) for i in range(20)))
    out = tmp_path / "never"
    line = _one_error_line(hfl("run", SMOKE, "--set", "data.task=instruct", "--set", "data.custom=null",
                               "--set", f"data.instruct={{train: {data}, prompt: question, response: answer}}",
                               "--set", "data.validation_size=4", "--out", out))
    assert "answer" in line and "train.jsonl" in line
    assert not out.exists()


def test_every_response_truncated_away_exits_2(tmp_path):
    out = tmp_path / "never"
    line = _one_error_line(hfl("run", SMOKE, "--set", "data.max_length=3", "--out", out))
    assert "max_length" in line
    assert not out.exists()


def test_tokenizer_without_pad_or_eos_exits_2(tmp_path):
    from hfl_jax.data.instruct import build_tokenizer
    tok = build_tokenizer(["some text to train on", "more text"], vocab_size=300)
    tok.pad_token = None
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    cfg.pop("eos_token", None), cfg.pop("pad_token", None)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "never"
    line = _one_error_line(hfl("run", SMOKE, "--set", f"data.tokenizer={tmp_path / 'tok'}", "--out", out))
    assert "tok" in line and "EOS" in line
    assert not out.exists()


def test_decoder_cost_model_hand_count():
    """Forward and backward FLOPs of a tiny decoder, by hand (N = B*T tokens)."""
    from hfl_jax.fed import timemodel

    cfg = DecoderConfig(model_type="llama", vocab_size=100, hidden_size=16, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=4, intermediate_size=24)
    B, T, r = 2, 5, 2
    N, H, I, V, Dq, Dkv = B * T, 16, 24, 100, 16, 8
    mm = lambda m, k, n: 2 * m * k * n
    proj = mm(N, H, Dq) + 2 * mm(N, H, Dkv) + mm(N, Dq, H) + 2 * mm(N, H, I) + mm(N, I, H)
    attn = 2 * mm(N, Dq, T)
    lora_q = mm(N, H, r) + mm(N, r, Dq)
    fwd = 3 * (proj + attn + lora_q) + mm(N, H, V)
    assert timemodel.forward_flops(cfg, B, T, r, ("q_proj",)) == fwd
    # depth 1, LoRA on q only: the LM head's dx, then the top layer with a dead input: q's LoRA
    # (dB, dy B^T, dA), dP and dQ, o's dx (context live), the MLP's dx products
    lora_bwd = mm(r, N, Dq) + mm(N, Dq, r) + mm(H, N, r)
    layer = lora_bwd + 2 * mm(N, Dq, T) + mm(N, H, Dq) + 2 * mm(N, I, H) + mm(N, H, I)
    assert timemodel.backward_flops(cfg, B, T, 1, r, ("q_proj",)) == mm(N, V, H) + layer
    assert timemodel.head_param_count(cfg) == 0
    assert timemodel.lora_param_count(cfg, 2, r, ("q_proj", "down_proj")) == 2 * r * (H + Dq + I + H)


def test_gsm8k_instruction_run_with_generation_exact_match(tmp_path):
    """GSM8K as instruction data (the real files, a small subset) on the tiny decoder: response-only
    labels, IID partition (no category), greedy generations scored by the GSM8K extractor become
    the main metric, beside perplexity and next-token accuracy."""
    from tests.test_instruct import gsm8k_dir
    from hfl_jax.driver import evaluate_global
    from hfl_jax.objectives import causal_lm as lm

    g = gsm8k_dir()
    cfg = load_config(SMOKE, [
        "data.task=instruct", "data.custom=null",
        f"data.instruct={{train: {g / 'train.jsonl'}, validation: {g / 'test.jsonl'}, prompt: question, response: answer}}",
        "data.max_length=128", "data.train_subset=48", "data.eval_subset=8", "partition.method=iid",
        "partition.num_devices=4", "train.rounds=1", "train.local_steps=1", "train.batch_size=2",
        "train.eval_batch_size=8", "evaluation.generate=3", "evaluation.max_new_tokens=6",
        "evaluation.extractor=gsm8k", "evaluation.batch_size=2", "model.tiny.vocab_size=512"])
    exp = build(cfg)
    assert exp.label_names == ("all",) and set(exp.train_labels.tolist()) == {0}
    tr = exp.prepared.train
    resp = tr["labels"] != -100
    assert resp.any(1).all() and (tr["input_ids"][resp] == tr["labels"][resp]).all()
    state, _ = next_round(exp, exp.initial)
    metrics = evaluate_global(exp, state.trainable)
    assert set(metrics) >= {"eval_loss", "eval_accuracy", "eval_perplexity", "eval_exact_match", "eval_token_accuracy"}
    assert metrics["eval_accuracy"] == metrics["eval_exact_match"] in (0.0, 1 / 3, 2 / 3, 1.0)
    gen = exp.prepared.extras["generation"]
    match, texts = lm.generation_metric(exp.env.model, state.trainable, exp.env.base, gen["prompts"],
                                        gen["references"], tokenizer=exp.prepared.extras["tokenizer"],
                                        extractor=lambda a, b: True, max_new_tokens=6, batch_size=2)
    assert len(texts) == 3 and match == 1.0


def test_frozen_base_is_not_copied_per_device():
    """XLA's memory analysis of a decoder group round for M = 1 and 4 devices (abstract shapes,
    nothing allocated): arguments grow by the per-device inputs only, temporaries by per-device
    adapters, optimizer state and activations (logits included), far below a copy of the base."""
    import optax
    from hfl_jax.data import make_device_data
    from hfl_jax.fed.engine import make_group_round
    from hfl_jax.fed.local import base_of

    T, N_MAX, E, B, V = 8, 4, 2, 2, 8192
    cfg = DecoderConfig(model_type="llama", vocab_size=V, hidden_size=256, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=64, intermediate_size=256, max_position_embeddings=64)
    model = DecoderModel(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
    lora = jax.eval_shape(lambda: init_lora(jax.random.PRNGKey(1), cfg, LoRAConfig(2, 4, ("q_proj", "v_proj"))))
    base = base_of(params)
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    group_round = make_group_round(model, optax.adam(1e-3), depth=1, local_steps=E, batch_size=B, n_max=N_MAX)
    stats, per_in = {}, None
    for m in (1, 4):
        n = m * N_MAX
        tok = {"input_ids": np.ones((n, T), np.int32), "attention_mask": np.ones((n, T), np.int32),
               "token_type_ids": np.zeros((n, T), np.int32), "labels": np.ones((n, T), np.int32)}
        data = make_device_data(tok, [np.arange(d * N_MAX, (d + 1) * N_MAX) for d in range(m)])
        data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), data)
        per_in = nbytes(data) // m + 8
        ids, w = jax.ShapeDtypeStruct((m,), jnp.int32), jax.ShapeDtypeStruct((m,), jnp.float32)
        stats[m] = group_round.lower({"lora": lora}, base, data, ids, w, jax.random.PRNGKey(0)).compile().memory_analysis()
    grow = lambda f: (getattr(stats[4], f) - getattr(stats[1], f)) / 3
    base_bytes = nbytes(base)
    print(f"\ndecoder base {base_bytes} B; per added device: argument {grow('argument_size_in_bytes'):.0f} B, "
          f"temp {grow('temp_size_in_bytes'):.0f} B")
    assert 0 < grow("argument_size_in_bytes") <= per_in
    assert 0 < grow("temp_size_in_bytes") < 0.5 * base_bytes


def test_user_checkpoint_config_runs_on_a_local_checkpoint(tmp_path):
    """experiments/configs/decoder/gsm8k.yaml with model.name a local transformers checkpoint (a tiny
    random Llama saved by transformers, its tokenizer beside it): the user path end to end, one round."""
    pytest.importorskip("torch")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from tests.test_instruct import gsm8k_dir
    from hfl_jax.data.instruct import build_tokenizer

    gsm8k_dir()
    tok = build_tokenizer(["Natalia sold clips to 48 of her friends", "#### 72", "How many"], vocab_size=300)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True))
    ckpt = tmp_path / "ckpt"
    hf.save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    out = tmp_path / "run"
    r = hfl("run", ROOT / "experiments/configs/decoder/gsm8k.yaml", "--set", f"model.name={ckpt}",
            "--set", "data.train_subset=32", "--set", "data.eval_subset=4", "--set", "data.max_length=96",
            "--set", "train.rounds=1", "--set", "train.local_steps=1", "--set", "partition.num_devices=4",
            "--set", "evaluation.generate=2", "--set", "evaluation.max_new_tokens=4", "--set", "train.eval_batch_size=4",
            "--out", out, "--quiet", "--no-plots")
    assert r.returncode == 0, r.stderr
    rec = _records(out)[-1]
    assert {"eval_exact_match", "eval_perplexity", "eval_token_accuracy"} <= set(rec)
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
