"""Device-major layout, the JAX batch sampler, eval batches, and custom CSV end to end."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfl_jax.data import (CustomSpec, DataError, eval_batches, gather_batches, load_task,
                          make_device_data, partition, sample_batch_indices, tokenize_dataset)


def fake_tokenized(n, t=3):
    """Row i has input_ids [i, i, i] so gathered rows reveal their origin."""
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], t, axis=1)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "labels": (np.arange(n) % 3).astype(np.int32)}


def sample(key, device_id, count, n_max, e, b):
    idx, mask = sample_batch_indices(key, device_id, count, n_max=n_max, num_steps=e, batch_size=b)
    return np.asarray(idx), np.asarray(mask)


def test_make_device_data_layout():
    tok = fake_tokenized(7)
    dd = make_device_data(tok, [np.array([5, 1]), np.array([], np.int64), np.array([0, 2, 6])])
    assert dd.input_ids.shape == (3, 3, 3) and dd.labels.shape == (3, 3)
    assert dd.counts.tolist() == [2, 0, 3] and dd.counts.dtype == np.int32
    assert dd.valid.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert dd.input_ids[:, :, 0].tolist() == [[5, 1, 0], [0, 0, 0], [0, 2, 6]]
    assert dd.attention_mask[0, 2].tolist() == [0, 0, 0]  # padding rows are all zeros
    assert make_device_data(tok, [np.arange(7)], pad_to=10).n_max == 10
    with pytest.raises(DataError, match="pad_to=1"):
        make_device_data(tok, [np.arange(7)], pad_to=1)
    with pytest.raises(DataError, match="outside"):
        make_device_data(tok, [np.array([7])])


def test_epochs_are_permutations_without_replacement():
    key = jax.random.key(0)
    # count divisible by B: steps 0-2 are epoch 0, steps 3-5 epoch 1
    idx, mask = sample(key, 4, 12, 16, 6, 4)
    assert mask.all()
    assert sorted(idx[:3].ravel()) == list(range(12)) and sorted(idx[3:].ravel()) == list(range(12))
    assert not np.array_equal(idx[:3], idx[3:])  # a fresh permutation per epoch
    # count not divisible by B: the stream of 15 slots is 3 consecutive epochs of 5
    idx, mask = sample(key, 4, 5, 16, 5, 3)
    stream = idx.ravel()
    assert mask.all() and all(sorted(stream[i:i + 5]) == list(range(5)) for i in (0, 5, 10))


def test_small_and_empty_devices():
    key = jax.random.key(1)
    idx, mask = sample(key, 0, 2, 8, 4, 5)   # count < B: the 2 examples each step, rest masked
    assert mask.tolist() == [[True, True, False, False, False]] * 4
    assert all(sorted(row[:2]) == [0, 1] for row in idx)
    idx, mask = sample(key, 0, 0, 8, 4, 5)   # empty device: nothing valid
    assert not mask.any() and idx.shape == (4, 5)


def test_same_key_same_batches_other_key_differs():
    a = sample(jax.random.key(7), 3, 50, 64, 5, 8)
    b = sample(jax.random.key(7), 3, 50, 64, 5, 8)
    c = sample(jax.random.key(8), 3, 50, 64, 5, 8)
    d = sample(jax.random.key(7), 2, 50, 64, 5, 8)  # another device id
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])


def test_vmap_one_vs_five_devices_and_no_padding():
    tok = fake_tokenized(40)
    parts = [np.array([], np.int64), np.array([3]), np.arange(4, 9), np.arange(9, 16), np.arange(16, 40)]
    dd = make_device_data(tok, parts)                      # n_max = 24
    key, e, b = jax.random.key(42), 6, 4
    ids = jnp.arange(5, dtype=jnp.int32)

    def one_device(device_id, count, row, n_max):
        idx, mask = sample_batch_indices(key, device_id, count, n_max=n_max, num_steps=e, batch_size=b)
        return idx, mask, gather_batches(row, idx), jnp.take(row.valid, idx, axis=0)

    many = jax.jit(jax.vmap(functools.partial(one_device, n_max=dd.n_max)))(ids, dd.counts, dd)
    for d in range(5):
        # the same device alone: its own DeviceData (n_max = its count), vmapped over 1 device
        solo = make_device_data(tok, [parts[d]])
        one = jax.vmap(functools.partial(one_device, n_max=solo.n_max))(ids[d:d + 1], solo.counts, solo)
        assert np.array_equal(many[0][d], one[0][0]) and np.array_equal(many[1][d], one[1][0])
        for k in ("input_ids", "labels"):
            assert np.array_equal(np.asarray(many[2][k][d])[many[1][d]], np.asarray(one[2][k][0])[one[1][0]])
        mask, valid = np.asarray(many[1][d]), np.asarray(many[3][d])
        assert np.all(valid[mask])                          # never a padding row as a real example
        got = np.asarray(many[2]["input_ids"][d])[..., 0][mask]
        assert set(got.tolist()) <= set(parts[d].tolist())  # rows really are this device's data
        assert mask.sum() == e * min(len(parts[d]), b)


def test_eval_batches_padding():
    ev = eval_batches(fake_tokenized(10), batch_size=4)
    assert ev.input_ids.shape == (3, 4, 3) and len(ev) == 3 and ev.num_examples == 10
    assert ev.valid[-1].tolist() == [True, True, False, False]
    batches = list(ev)
    rows = np.concatenate([bt["input_ids"][bt["valid"]][:, 0] for bt in batches])
    assert rows.tolist() == list(range(10))
    with pytest.raises(DataError, match="empty"):
        eval_batches(fake_tokenized(0), 4)


def test_custom_csv_end_to_end(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]) + "\n")
    tok = BertTokenizerFast(vocab=str(vocab))
    words = {"pos": "good film", "neg": "bad film"}
    lab = ["pos", "neg", "neg", "pos", "pos", "neg", "pos", "neg", "pos", "pos", "neg", "pos"]
    (tmp_path / "train.csv").write_text("review,sentiment\n" + "".join(f"{words[l]},{l}\n" for l in lab))
    ds = load_task("custom", "train", custom=CustomSpec(train=str(tmp_path / "train.csv"),
                                                        text_a="review", label="sentiment"))
    assert ds.label_names == ("neg", "pos") and len(ds) == 12
    toks = tokenize_dataset(ds, tok, max_length=6, cache_dir=tmp_path / "cache")
    parts = partition(ds.labels, 3, "dirichlet", seed=0, alpha=1.0, min_samples=1)
    dd = make_device_data(toks, parts)
    for d in range(3):
        idx, mask = sample_batch_indices(jax.random.key(0), d, int(dd.counts[d]), n_max=dd.n_max,
                                         num_steps=2, batch_size=2)
        batch = gather_batches(dd.row(d), idx)
        m = np.asarray(mask)
        for ids, y in zip(np.asarray(batch["input_ids"])[m], np.asarray(batch["labels"])[m]):
            # [CLS] good|bad film [SEP]: the word matches the label from the CSV string
            assert ids[1] == (5 if ds.label_names[y] == "pos" else 6)
