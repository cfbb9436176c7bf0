"""Exact speed-ups: trimming padding to a length bucket, and caching the layers no arm can tune."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_fixtures import OPT, setup
from hfl_jax.data import bucket_length, eval_batches, trim_padding
from hfl_jax.fed.engine import make_evaluate, make_group_round, make_probe
from hfl_jax.fed.frozen_cache import attach_hidden, check_untouched
from hfl_jax.fed.local import base_of
from hfl_jax.models import EncoderConfig, EncoderModel

E, B = 3, 4


def _close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def _pad_tokens(data, extra):
    """``data`` with ``extra`` all-padding columns appended to every token array."""
    pad = lambda x: np.concatenate([np.asarray(x), np.zeros((*x.shape[:-1], extra), np.int32)], -1)
    return data.replace(input_ids=pad(data.input_ids), attention_mask=pad(data.attention_mask),
                        token_type_ids=pad(data.token_type_ids))


def test_bucket_length():
    mask = np.zeros((2, 3, 32), np.int32)
    mask[0, 1, :9] = 1
    assert bucket_length(mask, 8) == 16 and bucket_length(mask, 1) == 9
    assert bucket_length(mask, (12, 24)) == 12 and bucket_length(mask, (4,)) == 32
    assert bucket_length(np.zeros((1, 32)), 8) == 8
    mask[1, 0, 31] = 1  # a real token at the end (or left padding): nothing can be cut
    assert bucket_length(mask, 8) == 32


def test_group_round_on_trimmed_data_equals_untrimmed():
    model, params, trainable, data, sizes = setup()
    padded = _pad_tokens(data, 8)                     # T = 16, real tokens only in the first 8 columns
    trimmed = trim_padding(padded, 8)
    assert trimmed.input_ids.shape[-1] == 8
    args = (base_of(params),)
    ids, w, key = jnp.arange(8, dtype=jnp.int32), jnp.asarray(sizes), jax.random.PRNGKey(5)
    fn = make_group_round(model, OPT, depth=2, local_steps=E, batch_size=B, n_max=data.n_max)
    full, m1 = fn(trainable, *args, padded, ids, w, key)
    cut, m2 = fn(trainable, *args, trimmed, ids, w, key)
    _close(full, cut, 1e-6)
    np.testing.assert_allclose(m1.loss, m2.loss, atol=1e-6)


@pytest.mark.parametrize("kind", ["roberta", "deberta-v1", "deberta-v3"])
def test_trailing_padding_does_not_change_logits(kind):
    kw = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
              max_position_embeddings=40, num_labels=3)
    if kind == "roberta":
        cfg = EncoderConfig(model_type="roberta", pad_token_id=1, **kw)
    elif kind == "deberta-v1":  # relative span min(T, 16) changes with T: the gathered rows must not
        cfg = EncoderConfig(model_type="deberta", relative_attention=True, max_relative_positions=16,
                            pos_att_type=("c2p", "p2c"), **kw)
    else:
        cfg = EncoderConfig(model_type="deberta-v2", relative_attention=True, max_relative_positions=16,
                            position_buckets=4, pos_att_type=("p2c", "c2p"), share_att_key=True,
                            norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0, **kw)
    model = EncoderModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))  # make the relative terms matter
    params = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    rng = np.random.default_rng(0)
    lengths = np.array([7, 3, 5])
    mask = (np.arange(24)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(3, 50, (3, 24)), cfg.pad_token_id).astype(np.int32)
    types = np.zeros_like(ids)
    full = model.apply(params, ids, mask, types)
    cut = model.apply(params, ids[:, :8], mask[:, :8], types[:, :8])
    np.testing.assert_allclose(np.asarray(full), np.asarray(cut), atol=1e-6, rtol=0)


def test_group_round_probe_and_eval_from_cached_layers_equal_full_forward():
    model, params, trainable, data, sizes = setup()   # L = 3; depth <= 2 leaves layer 0 frozen
    base = base_of(params)
    cached = attach_hidden(data, model, base, 1, batch_size=16)
    assert cached.hidden.shape == (*data.input_ids.shape, model.cfg.hidden_size) and cached.hidden_layer == 1
    assert not np.asarray(cached.hidden)[~np.asarray(data.valid)].any()
    check_untouched(trainable["lora"], 1)
    ids, w, key = jnp.arange(8, dtype=jnp.int32), jnp.asarray(sizes), jax.random.PRNGKey(9)
    for depth in (1, 2):
        fn = make_group_round(model, OPT, depth=depth, local_steps=E, batch_size=B, n_max=data.n_max)
        plain, m1 = fn(trainable, base, data, ids, w, key)
        fast, m2 = fn(trainable, base, cached, ids, w, key)
        _close(plain, fast, 1e-5)
        np.testing.assert_allclose(m1.loss, m2.loss, atol=1e-5)
    probe = make_probe(model, B, data.n_max)
    _close(probe(plain, base, data, ids, key), probe(plain, base, cached, ids, key), 1e-5)
    tok = {k: np.asarray(getattr(data, k)).reshape(-1, data.input_ids.shape[-1])
           for k in ("input_ids", "attention_mask", "token_type_ids")}
    tok["labels"] = np.asarray(data.labels).reshape(-1)
    ev = eval_batches(tok, 16)
    evaluate = make_evaluate(model)
    _close(evaluate(plain, base, ev), evaluate(plain, base, attach_hidden(ev, model, base, 1)), 1e-5)
    with pytest.raises(ValueError, match="non-zero"):
        check_untouched(plain["lora"], 2)   # depth-2 training moved layer 1's B


def test_probe_on_host_drawn_batches_equals_its_own_sampler():
    """The rounds' probe scores batches drawn by the training sampler on the host (its first step);
    the probe with its own in-graph sampler gives the same losses, bit for bit."""
    from hfl_jax.data.packing import sample_group_indices

    model, params, trainable, data, sizes = setup()
    base = base_of(params)
    ids, key = jnp.arange(8, dtype=jnp.int32), jax.random.PRNGKey(11)
    own = make_probe(model, B, data.n_max)(trainable, base, data, ids, key)
    idx, mask = sample_group_indices(key, ids, data.counts, n_max=data.n_max, num_steps=E, batch_size=B)
    drawn = make_probe(model, B, data.n_max, drawn=True)(trainable, base, data, idx[:, 0], mask[:, 0])
    for a, b in zip(own, drawn):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(own[1]).sum() > 0


SMOKE = "tests/configs/tiny_v1.yaml"   # the pre-issue-15 smoke setting


def test_driver_rounds_with_trimming_cache_and_packing_equal_plain(monkeypatch):
    from hfl_jax.config import load_config
    from hfl_jax.driver import build, next_round

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    # 2 layers, one depth: each variant compiles one group round (the suite's time); the cache holds layer 1
    common = ["model.tiny.num_layers=2", "algorithm.depths=[1]", "algorithm.taus=[1]", "data.pack=false"]
    runs = {}
    for name, extra in [("plain", ["data.trim_padding=false"]), ("trim", []),
                        ("cache", ["train.cache_frozen_layers=true"]), ("pack", ["data.pack=true"])]:
        exp = build(load_config(SMOKE, common + extra))
        state, arms = exp.initial, []
        for _ in range(2):
            state, rec = next_round(exp, state)
            arms.append([g.get("arm") for g in rec["groups"]])
        from hfl_jax.fed.engine import make_evaluate
        runs[name] = (exp, state, arms, make_evaluate(exp.env.model)(state.trainable, exp.env.base,
                                                                     exp.eval_data))
    plain, trim, cache, pack = runs["plain"], runs["trim"], runs["cache"], runs["pack"]
    T = plain[0].cfg.data.max_length
    assert plain[0].eval_data.input_ids.shape[-1] == T
    assert trim[0].eval_data.input_ids.shape[-1] < T   # the tiny sentences are short: something was cut
    assert cache[0].eval_data.hidden_layer == 1 and cache[0].env.group_data[0].hidden_layer == 1
    # Same maths, other shapes: XLA may sum in another order. Float rounding then moves the adapters
    # by far less than one Adam step (lr 3e-3 here; Adam turns a near-zero gradient's rounding into
    # up to a full step's change), and the evaluation agrees to 1e-5.
    assert pack[0].env.pack_row_len == 2 * T and pack[0].eval_data.segment_ids.size < pack[0].eval_data.labels.size * T
    for other in (trim, cache, pack):
        assert other[2] == plain[2]
        _close(plain[1].trainable, other[1].trainable, 1e-4)
        _close(plain[3], other[3], 1e-5)


def test_cache_is_refused_when_an_arm_tunes_every_layer(monkeypatch):
    from hfl_jax.config import load_config
    from hfl_jax.driver import build

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    with pytest.raises(ValueError, match="cache_frozen_layers"):
        build(load_config(SMOKE, ["algorithm.name=fedlora", "train.cache_frozen_layers=true"]))


def test_resume_with_cache_checks_the_restored_adapters(monkeypatch, tmp_path):
    import yaml

    from hfl_jax.config import load_config
    from hfl_jax.driver import resume, run

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    cfg = load_config(SMOKE, ["algorithm.depths=[1,2]", "train.cache_frozen_layers=true", "train.rounds=1"])
    run(cfg, tmp_path)
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw["train"]["rounds"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert resume(tmp_path)["rounds"] == 2
