"""Sequence packing (hfl_jax/data/packing.py) is exact up to float reordering.

What holds: packed and padded batches give the same logits, loss and gradients within 1e-5
(f32; not bit-identical: the softmax sums run over rows of another length and XLA blocks the
matmuls of a [R*L, H] operand differently), the host draws exactly the batches the compiled round
draws, and evaluation agrees within 1e-5. Whole driver rounds packed vs padded:
tests/test_fast_paths.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_fixtures import CFG, T, setup
from hfl_jax.data import eval_batches, gather_batches
from hfl_jax.data.packing import (PackSpec, first_fit_decreasing, pack_batch, pack_eval, plan_group_round,
                                  position_offset)
from hfl_jax.fed.engine import make_evaluate
from hfl_jax.fed.local import base_of, make_loss_fn
from hfl_jax.models import EncoderConfig, EncoderModel, LoRAConfig, init_lora

E, B, L = 3, 4, 2 * T


def _close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_first_fit_decreasing_places_every_sequence_without_overlap():
    lengths = np.array([5, 0, 8, 3, 3, 2, 7, 1])
    row, offset, rows = first_fit_decreasing(lengths, 8)
    assert rows == 4                           # 8 | 7+1 | 5+3 | 3+2 (29 tokens in 4 rows of 8)
    used = np.zeros((rows, 8), int)
    for n, r, o in zip(lengths, row, offset):
        assert o + n <= 8
        used[r, o:o + n] += 1
    assert used.max() == 1 and used.sum() == lengths.sum()
    with pytest.raises(ValueError):
        first_fit_decreasing(np.array([9]), 8)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_packed_batch_gives_the_padded_logits_loss_and_gradients(kind):
    cfg = CFG if kind == "bert" else EncoderConfig(
        model_type="roberta", vocab_size=40, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24,
        max_position_embeddings=T + 2, pad_token_id=1, num_labels=2, type_vocab_size=1)
    model = EncoderModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    lora = init_lora(jax.random.PRNGKey(1), cfg, LoRAConfig(rank=2, alpha=4))
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), lora)  # B != 0
    trainable = {"lora": lora, "head": params["head"]}
    rng = np.random.default_rng(0)
    n = 6
    lens = np.array([T, 3, 2, 5, T, 4])
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    pad = cfg.pad_token_id
    batch = {"input_ids": np.where(mask > 0, rng.integers(3, cfg.vocab_size, (n, T)), pad).astype(np.int32),
             "attention_mask": mask, "token_type_ids": np.zeros((n, T), np.int32),
             "labels": rng.integers(0, 2, n).astype(np.int32), "mask": np.array([1, 1, 1, 0, 1, 1], bool)}
    row, offset, rows = first_fit_decreasing(lens * batch["mask"], L)
    packed = pack_batch(batch, row, offset, PackSpec(rows, L, position_offset(cfg)))
    assert packed["input_ids"].shape == (rows, L) and rows < n
    loss_fn = jax.jit(make_loss_fn(model, depth=2))
    grad = jax.jit(jax.grad(lambda tr, b: loss_fn(tr, base_of(params), b)[0]))
    (l1, m1), (l2, m2) = loss_fn(trainable, base_of(params), batch), loss_fn(trainable, base_of(params), packed)
    _close((l1, m1), (l2, m2))
    _close(grad(trainable, batch), grad(trainable, packed))


def test_host_plan_draws_the_batches_of_the_compiled_round_and_packs_them_smaller():
    """The group round itself, packed vs padded through the driver, is compared in
    tests/test_fast_paths.py::test_driver_rounds_with_trimming_cache_and_packing_equal_plain."""
    from hfl_jax.data import sample_batch_indices

    _, _, _, data, _ = setup()
    key = jax.random.PRNGKey(5)
    lengths = np.asarray(data.attention_mask).sum(-1)
    plan, rows = plan_group_round(lengths, np.asarray(data.counts), np.arange(8), key, num_steps=E,
                                  batch_size=B, row_len=L)
    assert rows < B                              # the packed step is smaller than the padded one
    for d in (0, 7):
        idx, mask = sample_batch_indices(key, d, data.counts[d], data.n_max, E, B)
        np.testing.assert_array_equal(plan["idx"][d], idx)
        np.testing.assert_array_equal(plan["mask"][d], mask)
    used = np.take_along_axis(lengths, plan["idx"].reshape(8, -1), 1).reshape(plan["idx"].shape) * plan["mask"]
    assert (plan["offset"] + used <= L).all() and (plan["row"] < rows).all()


def test_packed_evaluation_equals_the_padded_one():
    model, params, trainable, data, _ = setup()
    rows = data.row(7)
    tok = {k: np.asarray(getattr(rows, k))[:30] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    ev = make_evaluate(model)
    padded = ev(trainable, base_of(params), eval_batches(tok, 8))
    packed_set = pack_eval(tok, row_len=L, num_batches=4)
    assert packed_set.num_examples == 30 and packed_set.input_ids.size < 30 * T
    _close(padded, ev(trainable, base_of(params), packed_set))


def test_gather_then_pack_keeps_each_sequence_at_its_slot():
    _, _, _, data, _ = setup()
    idx = jnp.array([[0, 3, 5, 29]])
    batch = dict(jax.tree.map(lambda x: x[0], gather_batches(data.row(7), idx)), mask=jnp.ones(4, bool))
    lens = np.asarray(batch["attention_mask"]).sum(-1)
    row, offset, rows = first_fit_decreasing(lens, L)
    p = pack_batch(batch, row, offset, PackSpec(rows, L, 0))
    flat = np.asarray(p["input_ids"]).reshape(-1)
    for b in range(4):
        s = int(p["slots"][b])
        np.testing.assert_array_equal(flat[s:s + lens[b]], np.asarray(batch["input_ids"])[b, :lens[b]])
        np.testing.assert_array_equal(np.asarray(p["position_ids"]).reshape(-1)[s:s + lens[b]], np.arange(lens[b]))
        assert (np.asarray(p["segment_ids"]).reshape(-1)[s:s + lens[b]] == b + 1).all()
