"""Loading GLUE tasks (real SST-2, tiny raw GLUE-format files) and custom datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hfl_jax.data import TASKS, CustomSpec, DataError, DataNotFoundError, load_task


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # tests never reach the network; HFL_DATA_DIR from the caller's shell must not leak in
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("HFL_DATA_DIR", raising=False)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- real SST-2


def test_sst2_real_sizes_and_label_counts(sst2_dir):
    train = load_task("sst2", "train", data_dir=sst2_dir)
    dev = load_task("sst2", "validation", data_dir=sst2_dir)
    assert len(train) == 67_349 and len(train.labels) == 67_349
    assert len(dev) == 872
    assert np.bincount(train.labels).tolist() == [29_780, 37_569]
    assert np.bincount(dev.labels).tolist() == [428, 444]
    assert train.labels.dtype == np.int64 and train.text_b is None
    assert train.label_names == ("negative", "positive")
    assert all(s == s.strip() and s for s in train.text_a[:1000])  # trailing spaces stripped
    assert train.text_a[0] == "when are bears bears and"
    assert str(sst2_dir / "SST-2" / "train.tsv") in train.source and "data_dir argument" in train.source


def test_sources_order_data_dir_then_env(sst2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HFL_DATA_DIR", str(sst2_dir))
    # data_dir argument without the file: falls through to HFL_DATA_DIR, which is reported
    ds = load_task("sst2", "dev", data_dir=tmp_path)
    assert len(ds) == 872 and "from HFL_DATA_DIR" in ds.source
    # a data_dir argument that has the file wins over the environment
    _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\na b \t0\n")
    ds = load_task("sst2", "dev", data_dir=tmp_path)
    assert len(ds) == 1 and "from data_dir argument" in ds.source


def test_missing_everywhere_names_every_place_and_the_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_task("qnli", "train", data_dir=tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert str(tmp_path / "QNLI" / "train.tsv") in msg
    assert "HFL_DATA_DIR: not set" in msg
    assert "nyu-mll/glue" in msg and "HF_DATASETS_OFFLINE=1" in msg
    assert "export HFL_DATA_DIR=" in msg and "load_dataset('nyu-mll/glue', 'qnli')" in msg


# ----------------------------------------------------------------------------- raw GLUE pair formats


def test_qnli_string_labels_and_quote_none(tmp_path):
    _write(tmp_path / "QNLI" / "dev.tsv",
           "index\tquestion\tsentence\tlabel\n"
           '0\tWhat is "it?\tIt is a "thing.\tentailment\n'
           "1\tWho? \tNobody .\tnot_entailment\n")
    ds = load_task("qnli", "dev", data_dir=tmp_path)
    assert ds.text_a == ['What is "it?', "Who?"]  # an unbalanced quote is literal text
    assert ds.text_b == ['It is a "thing.', "Nobody ."]
    assert ds.labels.tolist() == [0, 1] and ds.label_names == ("entailment", "not_entailment")


def test_mnli_uses_dev_matched_gold_label(tmp_path):
    cols = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "label2",
            "label3", "label4", "label5", "gold_label"]
    row = lambda s1, s2, g: "\t".join(["0", "1", "2", "fiction", "(x)", "(y)", "(X)", "(Y)", s1, s2,
                                       "neutral", "neutral", "neutral", "neutral", "neutral", g])
    _write(tmp_path / "MNLI" / "dev_matched.tsv", "\t".join(cols) + "\n" + "\n".join(
        [row("p1", "h1", "entailment"), row("p2", "h2", "neutral"), row("p3", "h3", "contradiction")]) + "\n")
    _write(tmp_path / "MNLI" / "dev_mismatched.tsv", "\t".join(cols) + "\n" + row("q", "r", "neutral") + "\n")
    ds = load_task("mnli", "validation", data_dir=tmp_path)
    assert ds.labels.tolist() == [0, 1, 2] and ds.text_a == ["p1", "p2", "p3"] and ds.text_b == ["h1", "h2", "h3"]
    assert "dev_matched.tsv" in ds.source
    assert load_task("mnli", "validation_mismatched", data_dir=tmp_path).text_a == ["q"]


def test_qqp_skips_malformed_rows(tmp_path):
    _write(tmp_path / "QQP" / "train.tsv",
           "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
           "0\t1\t2\tHow?\tWhy?\t0\n"
           "1\t3\t4\tbroken row\n"
           "2\t5\t6\tA\tB\t1\n")
    ds = load_task("qqp", "train", data_dir=tmp_path)
    assert ds.text_a == ["How?", "A"] and ds.labels.tolist() == [0, 1]


def test_task_registry():
    assert set(TASKS) == {"sst2", "qnli", "qqp", "mnli"}
    assert [TASKS[t].num_classes for t in ("sst2", "qnli", "qqp", "mnli")] == [2, 2, 2, 3]
    assert not TASKS["sst2"].is_pair and TASKS["mnli"].is_pair
    assert TASKS["mnli"].hub_splits["validation"] == "validation_matched"


@pytest.mark.parametrize("content, words", [
    ("index\tquestion\tsentence\tlabel\n0\ta\tb\tmaybe\n", ["'maybe'", "outside the declared label set"]),
    ("index\tquestion\tlabel\n0\ta\tentailment\n", ["missing column", "'sentence'"]),
    ("index\tquestion\tsentence\tlabel\n", ["empty"]),
    ("", ["empty"]),
])
def test_bad_glue_files(tmp_path, content, words):
    _write(tmp_path / "QNLI" / "train.tsv", content)
    with pytest.raises(DataError) as e:
        load_task("qnli", "train", data_dir=tmp_path)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_task_and_split():
    with pytest.raises(DataError, match="unknown task 'cola'"):
        load_task("cola", "train")
    with pytest.raises(DataError, match="no labelled split 'test'"):
        load_task("sst2", "test")


# ----------------------------------------------------------------------------- custom files


def test_custom_csv_string_labels_inferred_set(tmp_path):
    _write(tmp_path / "tr.csv", 'text,label\n"good, really",pos\nbad,neg\nok,neu\nfine,pos\n')
    _write(tmp_path / "va.csv", "text,label\nmeh,neu\n")
    spec = CustomSpec(train=str(tmp_path / "tr.csv"), validation=str(tmp_path / "va.csv"),
                      text_a="text", label="label")
    tr = load_task("custom", "train", custom=spec)
    assert tr.label_names == ("neg", "neu", "pos")  # sorted, and reported in source
    assert tr.labels.tolist() == [2, 0, 1, 2] and tr.text_a[0] == "good, really"
    assert "['neg', 'neu', 'pos']" in tr.source
    va = load_task("custom", "validation", custom=dict(spec.__dict__))  # dict form, as from YAML
    assert va.label_names == tr.label_names and va.labels.tolist() == [1]


def test_custom_formats_pairs_and_int_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"a": "x y", "b": "z", "y": 1}, {"a": "u", "b": "v w", "y": 0}]
    _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    _write(tmp_path / "d.tsv", "a\tb\ty\nx y\tz\t1\nu\tv w\t0\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.tsv", "d.parquet"):
        ds = load_task("custom", "train", custom=CustomSpec(train=str(tmp_path / name), text_a="a",
                                                            text_b="b", label="y"))
        assert ds.text_a == ["x y", "u"] and ds.text_b == ["z", "v w"], name
        assert ds.labels.tolist() == [1, 0] and ds.label_names == ("0", "1"), name


def test_custom_declared_label_set(tmp_path):
    _write(tmp_path / "d.csv", "t,l\na,pos\nb,1\nc,0\n")
    ds = load_task("custom", "train", custom=CustomSpec(train=str(tmp_path / "d.csv"), text_a="t",
                                                        label="l", label_names=("neg", "pos")))
    assert ds.labels.tolist() == [1, 1, 0]
    _write(tmp_path / "bad.csv", "t,l\na,pos\nb,2\n")
    with pytest.raises(DataError, match="'2', outside the declared label set"):
        load_task("custom", "train", custom=CustomSpec(train=str(tmp_path / "bad.csv"), text_a="t",
                                                       label="l", label_names=("neg", "pos")))


def test_custom_bad_inputs(tmp_path):
    spec = lambda f, **kw: CustomSpec(train=str(tmp_path / f), text_a="text", label="label", **kw)  # noqa: E731
    with pytest.raises(DataNotFoundError, match="not found"):
        load_task("custom", "train", custom=spec("nope.csv"))
    _write(tmp_path / "nocol.csv", "sentence,label\na,x\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]"):
        load_task("custom", "train", custom=spec("nocol.csv"))
    _write(tmp_path / "empty.csv", "text,label\n")
    with pytest.raises(DataError, match="empty"):
        load_task("custom", "train", custom=spec("empty.csv"))
    _write(tmp_path / "va.csv", "text,label\na,zzz\n")
    _write(tmp_path / "tr.csv", "text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match="'zzz', outside"):
        load_task("custom", "validation", custom=spec("tr.csv", validation=str(tmp_path / "va.csv")))
    with pytest.raises(DataError, match="no 'validation' split"):
        load_task("custom", "validation", custom=spec("tr.csv"))
    with pytest.raises(DataError, match="needs `custom="):
        load_task("custom", "train")


def test_sst2_dir_skips_or_fails_when_data_absent(tmp_path, monkeypatch):
    import conftest

    monkeypatch.setattr(conftest, "GLUE_DIR", tmp_path)
    monkeypatch.delenv("HFL_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="real GLUE SST-2 data not found"):
        conftest.sst2_dir()
    monkeypatch.setenv("HFL_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="HFL_REQUIRE_DATA=1 but real GLUE SST-2"):
        conftest.sst2_dir()


def test_hub_source_is_last_and_maps_columns(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"premise": ["p "], "hypothesis": ["h"], "label": [2]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    ds = load_task("mnli", "validation", data_dir=tmp_path)
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert ds.text_a == ["p"] and ds.text_b == ["h"] and ds.labels.tolist() == [2]
    assert "Hugging Face hub" in ds.source
    with pytest.raises(DataNotFoundError, match="disabled"):
        load_task("mnli", "validation", data_dir=tmp_path, hub=False)
