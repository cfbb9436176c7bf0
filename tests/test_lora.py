"""LoRA: identity at init, merge equivalence, PEFT equivalence, depth masking and compute cut."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hfl_jax.fed.local import base_of, make_optimizer, make_train_step
from hfl_jax.models import EncoderConfig, EncoderModel, LoRA, LoRAConfig, init_lora, load_pretrained, merge_lora

CFG = EncoderConfig(model_type="bert", vocab_size=50, hidden_size=32, num_layers=6, num_heads=4,
                    intermediate_size=48, max_position_embeddings=32, num_labels=2)


def _batch(B=4, T=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, (B, T))
    mask = (np.arange(T)[None] < rng.integers(3, T + 1, (B, 1))).astype(np.int32)
    return {"input_ids": jnp.asarray(ids * mask), "attention_mask": jnp.asarray(mask),
            "token_type_ids": jnp.zeros((B, T), jnp.int32), "labels": jnp.asarray(rng.integers(0, 2, B)),
            "mask": jnp.ones(B, bool)}


def _randomise_B(lora, seed=1):
    k = jax.random.PRNGKey(seed)
    return LoRA({t: {"A": ab["A"], "B": 0.1 * jax.random.normal(jax.random.fold_in(k, i), ab["B"].shape)}
                 for i, (t, ab) in enumerate(lora.weights.items())}, lora.scale)


@pytest.fixture(scope="module")
def tiny():
    model = EncoderModel(CFG)
    return model, model.init(jax.random.PRNGKey(0))


def test_untrained_lora_is_exact_identity(tiny):
    model, params = tiny
    b = _batch()
    lora = init_lora(jax.random.PRNGKey(3), CFG, LoRAConfig(rank=4, targets=("query", "value", "output")))
    base = model.apply(params, b["input_ids"], b["attention_mask"])
    adapted = model.apply(params, b["input_ids"], b["attention_mask"], lora=lora)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))


def test_merge_lora_equals_adapted_model(tiny):
    model, params = tiny
    b = _batch()
    lora = _randomise_B(init_lora(jax.random.PRNGKey(3), CFG, LoRAConfig(rank=4, targets=tuple(
        ["query", "key", "value", "attention_output", "intermediate", "output"]))))
    adapted = model.apply(params, b["input_ids"], b["attention_mask"], lora=lora)
    merged = model.apply(merge_lora(params, lora), b["input_ids"], b["attention_mask"])
    assert np.abs(np.asarray(adapted) - np.asarray(model.apply(params, b["input_ids"], b["attention_mask"]))).max() > 1e-3
    np.testing.assert_allclose(adapted, merged, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 3])
def test_one_step_at_depth_changes_only_top_layers_and_head(tiny, depth):
    model, params = tiny
    trainable = {"lora": _randomise_B(init_lora(jax.random.PRNGKey(3), CFG, LoRAConfig(rank=4))),
                 "head": params["head"]}
    opt = make_optimizer(optax.adamw(1e-2, weight_decay=0.1), CFG.num_layers, depth)
    step = jax.jit(make_train_step(model, opt, depth))
    new, _, metrics = step(trainable, opt.init(trainable), base_of(params), _batch())
    assert np.isfinite(metrics.loss)
    L = CFG.num_layers
    for t, ab in trainable["lora"].weights.items():
        for k in ("A", "B"):
            before, after = np.asarray(ab[k]), np.asarray(new["lora"].weights[t][k])
            np.testing.assert_array_equal(before[: L - depth], after[: L - depth])  # bit-identical
            assert np.all(np.abs(before[L - depth:] - after[L - depth:]).reshape(depth, -1).max(1) > 0)
    for a, b in zip(jax.tree.leaves(trainable["head"]), jax.tree.leaves(new["head"])):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0


@pytest.mark.parametrize("depth", [0, 3])   # the cut at the output and inside
def test_shared_depth_program_equals_static_depth(tiny, depth):
    """One program for every depth (``train.depth_program: shared``: the depth traced): the same
    step as the static-depth program, frozen layers' adapters bit-identical, up to float rounding
    elsewhere; the backward pass through the frozen layers is computed, not skipped."""
    model, params = tiny
    trainable = {"lora": _randomise_B(init_lora(jax.random.PRNGKey(3), CFG, LoRAConfig(rank=4))),
                 "head": params["head"]}
    inner = optax.adamw(1e-2, weight_decay=0.1)
    L = CFG.num_layers

    def static(tr, base, batch):
        opt = make_optimizer(inner, L, depth)
        return make_train_step(model, opt, depth)(tr, opt.init(tr), base, batch)

    @jax.jit
    def shared(tr, base, batch, d):
        opt = make_optimizer(inner, L, d)
        return make_train_step(model, opt, d)(tr, opt.init(tr), base, batch)

    ref, _, m_ref = jax.jit(static)(trainable, base_of(params), _batch())
    new, _, m_new = shared(trainable, base_of(params), _batch(), jnp.int32(depth))
    np.testing.assert_allclose(m_new.loss, m_ref.loss, rtol=1e-6)
    for t, ab in trainable["lora"].weights.items():
        for k in ("A", "B"):
            before, a, b = (np.asarray(x) for x in (ab[k], ref["lora"].weights[t][k], new["lora"].weights[t][k]))
            np.testing.assert_array_equal(before[: L - depth], b[: L - depth])   # frozen: untouched
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(ref["head"]), jax.tree.leaves(new["head"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    # one program: a second depth reuses it
    assert shared._cache_size() == 1
    shared(trainable, base_of(params), _batch(), jnp.int32((depth + 1) % (L + 1)))
    assert shared._cache_size() == 1


def _step_flops(model, params, depth):
    trainable = {"lora": init_lora(jax.random.PRNGKey(3), CFG, LoRAConfig(rank=8)), "head": params["head"]}
    opt = make_optimizer(optax.sgd(0.1), CFG.num_layers, depth)
    compiled = jax.jit(make_train_step(model, opt, depth)).lower(
        trainable, opt.init(trainable), base_of(params), _batch(B=8, T=32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_shallow_depth_costs_fewer_flops(tiny):
    # XLA's cost analysis counts a while-loop body once, so unroll the layer scan to count every layer.
    model, params = EncoderModel(CFG, unroll=True), tiny[1]
    full, shallow = _step_flops(model, params, 6), _step_flops(model, params, 1)
    assert shallow <= (2 / 3) * full, (shallow, full)


def test_matches_peft(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=40, num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path, safe_serialization=True)
    ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    r, alpha, targets = 4, 8, ("query", "value")
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                   lora_dropout=0.0, task_type="SEQ_CLS")).eval()
    model, params = load_pretrained(str(tmp_path))
    lora = _randomise_B(init_lora(jax.random.PRNGKey(5), model.cfg, LoRAConfig(rank=r, alpha=alpha, targets=targets)))
    with torch.no_grad():
        for name, module in ref.named_modules():
            if hasattr(module, "lora_A") and name.split(".")[-1] in targets:
                layer = int(name.split("layer.")[1].split(".")[0])
                t = name.split(".")[-1]
                module.lora_A["default"].weight.copy_(torch.tensor(np.asarray(lora.weights[t]["A"][layer]).T))
                module.lora_B["default"].weight.copy_(torch.tensor(np.asarray(lora.weights[t]["B"][layer]).T))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 99, (3, 9))
    mask = (np.arange(9)[None] < np.array([[9], [5], [2]])).astype(np.int64)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = model.apply(params, ids, mask, lora=lora)
    assert np.abs(want - np.asarray(model.apply(params, ids, mask))).max() > 1e-4  # LoRA matters
    np.testing.assert_allclose(got, want, atol=1e-5)
