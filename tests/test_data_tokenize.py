"""Tokenization: pair encoding per model family, padding/truncation, the npz cache, aliases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hfl_jax.data.tokenize as tok_mod
from hfl_jax.data import TextDataset, load_tokenizer, resolve_tokenizer, tokenize_dataset

# ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 the=5 cat=6 sat=7 dog=8 ran=9
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "dog", "ran"]


def tiny_bert(tmp_path: Path, vocab=VOCAB):
    """A WordPiece BERT tokenizer from a vocab file written to tmp_path."""
    from transformers import BertTokenizerFast

    path = tmp_path / f"vocab{len(vocab)}.txt"
    path.write_text("\n".join(vocab) + "\n")
    # transformers >= 5 takes the file as `vocab=`; `vocab_file=` is silently ignored there
    tok = BertTokenizerFast(vocab=str(path))
    assert tok.vocab_size == len(vocab)
    return tok


def tiny_roberta():
    """A byte-level BPE RoBERTa tokenizer over single letters (no merges)."""
    from transformers import RobertaTokenizerFast

    toks = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + list("abcdefghijklmnopqrstuvwxyz")
    return RobertaTokenizerFast(vocab={t: i for i, t in enumerate(toks)}, merges=[])


def ds(a, b=None, labels=None):
    labels = np.arange(len(a)) % 2 if labels is None else np.asarray(labels)
    return TextDataset(text_a=list(a), text_b=None if b is None else list(b),
                       labels=labels.astype(np.int64), label_names=("n", "p"), source="test")


def test_bert_pair_has_token_types(tmp_path):
    out = tokenize_dataset(ds(["the cat", "dog"], ["dog ran", "the sat cat"], [1, 0]),
                           tiny_bert(tmp_path), max_length=9, cache_dir=tmp_path / "c")
    assert out["input_ids"].tolist() == [[2, 5, 6, 3, 8, 9, 3, 0, 0],
                                         [2, 8, 3, 5, 7, 6, 3, 0, 0]]
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 0, 0],
                                              [0, 0, 0, 1, 1, 1, 1, 0, 0]]
    assert out["attention_mask"].tolist() == [[1] * 7 + [0] * 2] * 2
    assert out["labels"].tolist() == [1, 0]
    assert all(v.dtype == np.int32 for v in out.values())


def test_bert_single_and_truncation(tmp_path):
    out = tokenize_dataset(ds(["the cat sat the dog ran", "dog"]), tiny_bert(tmp_path),
                           max_length=5, cache_dir=tmp_path / "c")
    assert out["input_ids"].tolist() == [[2, 5, 6, 7, 3], [2, 8, 3, 0, 0]]
    assert out["token_type_ids"].tolist() == [[0] * 5] * 2


def test_roberta_pair_uses_separators_and_zero_type_ids(tmp_path):
    out = tokenize_dataset(ds(["ab"], ["c"]), tiny_roberta(), max_length=8, cache_dir=tmp_path)
    # <s> a b </s></s> c </s> <pad>
    assert out["input_ids"].tolist() == [[0, 5, 6, 2, 2, 7, 2, 1]]
    assert out["attention_mask"].tolist() == [[1] * 7 + [0]]
    assert out["token_type_ids"].tolist() == [[0] * 8]


def test_cache_hit_skips_tokenizing(tmp_path, monkeypatch):
    calls = []
    real = tok_mod.encode
    monkeypatch.setattr(tok_mod, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok, d = tiny_bert(tmp_path), ds(["the cat", "dog"], ["ran", "sat"])
    first = tokenize_dataset(d, tok, 8, cache_dir=tmp_path / "c")
    second = tokenize_dataset(d, tok, 8, cache_dir=tmp_path / "c")
    assert len(calls) == 1 and len(list((tmp_path / "c").glob("*.npz"))) == 1
    assert all(np.array_equal(first[k], second[k]) for k in first)
    tokenize_dataset(d, tok, 6, cache_dir=tmp_path / "c")                   # other max_length
    tokenize_dataset(ds(["the cat", "dog"], ["ran", "dog"]), tok, 8, cache_dir=tmp_path / "c")  # other data
    other = tiny_bert(tmp_path, VOCAB[:5] + ["dog", "cat", "the", "sat", "ran"])  # same size, other vocab
    tokenize_dataset(d, other, 8, cache_dir=tmp_path / "c")
    assert len(calls) == 4 and len(list((tmp_path / "c").glob("*.npz"))) == 4
    monkeypatch.setenv("HFL_CACHE_DIR", str(tmp_path / "env"))             # env default location
    tokenize_dataset(d, tok, 8)
    assert len(list((tmp_path / "env").glob("*.npz"))) == 1


def test_minilm_alias_offline(tmp_path):
    path = Path(resolve_tokenizer("minilm-l6"))
    assert (path / "vocab.txt").is_file() and path.name == "model"
    assert resolve_tokenizer("bert-base-uncased") == "bert-base-uncased"
    out = tokenize_dataset(ds(["hello world"], ["a b"]), "minilm-l6", 10, cache_dir=tmp_path)
    assert out["input_ids"][0].tolist() == [101, 7592, 2088, 102, 1037, 1038, 102, 0, 0, 0]
    assert out["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert load_tokenizer("minilm-l6").vocab_size == 30522


def test_bad_arguments(tmp_path):
    from hfl_jax.data import DataError

    with pytest.raises(DataError, match="empty dataset"):
        tokenize_dataset(ds([], labels=[]), tiny_bert(tmp_path), 8, cache_dir=tmp_path)
    with pytest.raises(DataError, match="max_length"):
        tokenize_dataset(ds(["the"]), tiny_bert(tmp_path), 1, cache_dir=tmp_path)


def test_subset_tokenized_alone_equals_the_same_rows_of_the_whole(tmp_path, monkeypatch):
    """load_data draws the subset before tokenizing: the rows equal those of the whole set tokenized,
    and only the subset is written to the cache."""
    from hfl_jax.config import load_config
    from hfl_jax.data import load_task
    from hfl_jax.driver import load_data

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("HFL_CACHE_DIR", str(tmp_path))
    cfg = load_config(root / "experiments/configs/smoke.yaml", ["data.train_subset=100", "data.eval_subset=30"])
    train, valid, _ = load_data(cfg)
    assert len(train["labels"]) == 100 and len(valid["labels"]) == 30
    cached = sorted(tmp_path.glob("*.npz"))
    assert len(cached) == 2 and all(len(np.load(p)["labels"]) in (100, 30) for p in cached)
    whole = load_task("custom", "train", custom=cfg.data.custom)
    full = tokenize_dataset(whole, "minilm-l6", cfg.data.max_length, cache_dir=tmp_path / "full")
    rows = np.sort(np.random.default_rng([0, 14, 0]).choice(len(whole), 100, replace=False))  # seed, SALT_SUBSET
    for k in full:
        np.testing.assert_array_equal(full[k][rows], train[k])


TEXTS = ["the cat sat", "", "dog ran the cat sat the dog ran the cat", "Héllo WORLD  naïve café",
         "URL http://x.y/z?q=1 & <b>tags</b>", "日本語のテキスト", "a " * 60, "abc def", "ran.dog,the!"]


@pytest.mark.parametrize("family", ["minilm", "bert", "roberta"])
def test_tokenizer_json_read_directly_equals_transformers(tmp_path, family):
    """load_tokenizer reads a directory's tokenizer.json with the Rust tokenizers library (no
    transformers/PyTorch import): the ids, masks and token types equal transformers' fast tokenizer
    loaded from the same directory, for single texts and pairs, truncated and padded."""
    from transformers import AutoTokenizer

    if family == "minilm":
        path = Path(resolve_tokenizer("minilm-l6"))
    else:
        path = tmp_path / family
        (tiny_bert(tmp_path) if family == "bert" else tiny_roberta()).save_pretrained(str(path))
    fast = tok_mod._load_tokenizer(str(path))
    assert isinstance(fast, tok_mod.JsonTokenizer)
    ref = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    assert fast.vocab_size == ref.vocab_size and len(fast) == len(ref) and fast.get_vocab() == ref.get_vocab()
    for max_length in (4, 9, 40):
        for b in (None, TEXTS[::-1]):
            got, want = tok_mod.encode(fast, TEXTS, b, max_length), tok_mod.encode(ref, TEXTS, b, max_length)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{family} {k} T={max_length} pair={b is not None}")
    assert tok_mod.tokenizer_identity(fast)["vocab_sha256"] != ""


@pytest.mark.parametrize("family, change", [
    ("bert", {"do_lower_case": False}),           # transformers rebuilds the normalizer from the config
    ("bert", {"truncation_side": "left"}),
    ("roberta", {"add_prefix_space": True}),      # ... and RoBERTa's byte-level pre-tokenizer
    ("bert", {"tokenizer_class": "DistilBertTokenizer"}),   # a class not checked here
])
def test_tokenizer_files_that_disagree_go_through_transformers(tmp_path, family, change):
    """Where tokenizer_config.json says something tokenizer.json does not, transformers' reading wins:
    load_tokenizer then uses transformers, and its ids are what tokenize_dataset produces."""
    import json

    from transformers import AutoTokenizer

    path = tmp_path / family
    (tiny_bert(tmp_path) if family == "bert" else tiny_roberta()).save_pretrained(str(path))
    assert tok_mod.json_tokenizer_agrees(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
    assert not tok_mod.json_tokenizer_agrees(path)
    loaded = tok_mod._load_tokenizer(str(path))
    assert not isinstance(loaded, tok_mod.JsonTokenizer)
    want = tok_mod.encode(AutoTokenizer.from_pretrained(str(path), use_fast=True), ["The Cat", "ran"], None, 6)
    got = tok_mod.encode(loaded, ["The Cat", "ran"], None, 6)
    assert all(np.array_equal(got[k], want[k]) for k in want)
