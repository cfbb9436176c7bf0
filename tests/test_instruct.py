"""Instruction-tuning data: loading, templates, response-only labels, truncation, left-padded
prompts, label words, extractors and the in-process tokenizer (hand-checked values)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from hfl_jax.data.instruct import (
    IGNORE,
    InstructData,
    InstructSpec,
    build_tokenizer,
    builtin_prompt,
    classification_as_instruct,
    instruct_spec,
    label_word_ids,
    load_instruct,
    render_prompts,
    score_label_words,
    tokenize_instruct,
    tokenize_prompts,
)
from hfl_jax.data.metrics_text import (
    EXTRACTORS,
    exact_match,
    gsm8k_prediction,
    gsm8k_reference,
    last_number,
)
from hfl_jax.data.partition import dirichlet
from hfl_jax.data.tasks import DataError, DataNotFoundError, SpecError

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"

# WordLevel vocabulary of the hand-built tokenizer: ids are list positions.
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "a", "b", "c", "d", "e", "f", "Q", ":", "A",
         "user", "system", "assistant", ";"]
W = {w: i for i, w in enumerate(WORDS)}
CHAT = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}")


def word_tokenizer(pad=True, eos=True, bos=True, chat_template=None):
    """Whitespace-split words -> WORDS ids; puts <s> first with special tokens when ``bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(W, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kw = {"pad_token": "<pad>" if pad else None, "eos_token": "</s>" if eos else None,
          "bos_token": "<s>" if bos else None}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **{k: v for k, v in kw.items() if v})
    if chat_template:
        out.chat_template = chat_template
    return out


def data(prompts, responses, inputs=None, categories=None, system=None):
    return InstructData(prompts=list(prompts), inputs=inputs, responses=list(responses),
                        categories=None if categories is None else np.asarray(categories, np.int32),
                        category_names=(), source="hand.jsonl", system=system)


def gsm8k_dir() -> Path:
    if (GSM8K / "train.jsonl").is_file():
        return GSM8K
    reason = f"GSM8K data not found at {GSM8K / 'train.jsonl'} (the shared data folder beside the repo)"
    if os.environ.get("HFL_REQUIRE_DATA") == "1":
        pytest.fail(f"HFL_REQUIRE_DATA=1 but {reason}", pytrace=False)
    pytest.skip(reason)


# ----------------------------------------------------------------------------- labels and truncation


def test_response_only_labels_hand_example():
    tok = word_tokenizer()
    arrays, stats = tokenize_instruct(data(["a b", "c"], ["d e f", "a"]), tok, 64, template="Q : {prompt} A :")
    assert arrays["input_ids"].tolist() == [[1, 10, 11, 4, 5, 12, 11, 7, 8, 9, 2],
                                            [1, 10, 11, 6, 12, 11, 4, 2, 0, 0, 0]]
    assert arrays["labels"].tolist() == [[IGNORE] * 7 + [7, 8, 9, 2],
                                         [IGNORE] * 6 + [4, 2] + [IGNORE] * 3]
    assert arrays["attention_mask"].tolist() == [[1] * 11, [1] * 8 + [0] * 3]
    assert arrays["prompt_length"].tolist() == [7, 6] and arrays["index"].tolist() == [0, 1]
    assert all(v.dtype == np.int32 for v in arrays.values())
    assert stats == {"examples": 2, "kept": 2, "dropped": 0, "prompt_truncated": 0, "response_truncated": 0}


def test_truncation_keeps_the_response():
    tok, d = word_tokenizer(), data(["a b", "c"], ["d e f", "a"], categories=[1, 0])
    # room 8 after BOS: example 0 (6 prompt + 4 response tokens) loses its 2 leftmost prompt tokens
    a, s = tokenize_instruct(d, tok, 9, template="Q : {prompt} A :", prompt_floor=3)
    assert a["input_ids"][0].tolist() == [1, 4, 5, 12, 11, 7, 8, 9, 2]
    assert a["labels"][0].tolist() == [IGNORE] * 5 + [7, 8, 9, 2]
    assert (s["prompt_truncated"], s["response_truncated"], s["dropped"]) == (1, 0, 0)
    # room 5: prompts cut to the floor (3 tokens), then example 0's response to 2 tokens (no EOS)
    a, s = tokenize_instruct(d, tok, 6, template="Q : {prompt} A :", prompt_floor=3)
    assert a["input_ids"].tolist() == [[1, 5, 12, 11, 7, 8], [1, 6, 12, 11, 4, 2]]
    assert a["labels"].tolist() == [[IGNORE] * 4 + [7, 8], [IGNORE] * 4 + [4, 2]]
    assert (s["prompt_truncated"], s["response_truncated"], s["dropped"]) == (2, 1, 0)
    assert a["categories"].tolist() == [1, 0]


def test_dropped_examples_and_all_truncated_error():
    tok = word_tokenizer()
    d = data(["a b c d e", "a"], ["f", "f"], categories=[0, 1])
    a, s = tokenize_instruct(d, tok, 4, template="{prompt}", prompt_floor=3)
    assert a["input_ids"].tolist() == [[1, 4, 9, 2]] and a["index"].tolist() == [1]
    assert a["categories"].tolist() == [1]
    assert s == {"examples": 2, "kept": 1, "dropped": 1, "prompt_truncated": 0, "response_truncated": 0}
    with pytest.raises(DataError, match=r"hand\.jsonl.*max_length=4"):
        tokenize_instruct(data(["a b c d e"], ["f"]), tok, 4, template="{prompt}", prompt_floor=3)


def test_pad_eos_rules():
    with pytest.raises(DataError, match="has no EOS token and no pad token") as e:
        tokenize_instruct(data(["a"], ["b"]), word_tokenizer(pad=False, eos=False), 16, "{prompt}")
    assert "\n" not in str(e.value)
    a, _ = tokenize_instruct(data(["a", "a b"], ["c"] * 2), word_tokenizer(pad=False), 16, "{prompt}")
    assert a["input_ids"].tolist() == [[1, 4, 6, 2, 2], [1, 4, 5, 6, 2]]   # padded with EOS (2)
    assert a["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1] * 5]
    a, _ = tokenize_instruct(data(["a"], ["c"]), word_tokenizer(bos=False), 16, "{prompt}")
    assert a["input_ids"].tolist() == [[4, 6, 2]]                              # no BOS to add


# ----------------------------------------------------------------------------- templates


def test_chat_template_path():
    tok = word_tokenizer(chat_template=CHAT)
    d = data(["b c"], ["d"], system="a")
    assert render_prompts(d, tok, "auto") == ["system : a ; user : b c ; assistant :"]
    a, _ = tokenize_instruct(d, tok, 32, "chat")
    assert a["input_ids"].tolist() == [[1, 14, 11, 4, 16, 13, 11, 5, 6, 16, 15, 11, 7, 2]]
    assert a["labels"].tolist() == [[IGNORE] * 12 + [7, 2]]
    # a template writing BOS itself: BOS still once
    tok2 = word_tokenizer(chat_template="{{ bos_token }} " + CHAT)
    a2, _ = tokenize_instruct(d, tok2, 32, "auto")
    assert a2["input_ids"].tolist() == a["input_ids"].tolist()
    # no chat template: auto is the built-in one, chat an error
    assert render_prompts(d, word_tokenizer(), "auto") == [builtin_prompt("b c", "", "a")]
    with pytest.raises(DataError, match="no chat template"):
        render_prompts(d, word_tokenizer(), "chat")


def test_builtin_template_text():
    assert builtin_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    assert builtin_prompt("Sum.", "2 3").endswith("### Instruction:\nSum.\n\n### Input:\n2 3\n\n### Response:\n")
    assert builtin_prompt("Sum.", "2 3").startswith("Below is an instruction that describes a task, paired with")
    assert builtin_prompt("Sum.", system="Be brief.").startswith("Be brief.\n\n### Instruction:")


def test_left_padded_prompts_match_training_prompts():
    tok = word_tokenizer()
    d = data(["a b", "c"], ["d", "e"])
    texts = render_prompts(d, tok, "Q : {prompt} A :")
    ids, mask = tokenize_prompts(texts, tok, 16)
    assert ids.tolist() == [[1, 10, 11, 4, 5, 12, 11], [0, 1, 10, 11, 6, 12, 11]]
    assert mask.tolist() == [[1] * 7, [0] + [1] * 6]
    a, _ = tokenize_instruct(d, tok, 16, "Q : {prompt} A :")
    assert a["input_ids"][0, :a["prompt_length"][0]].tolist() == ids[0].tolist()
    ids, mask = tokenize_prompts(texts, tok, 4)                    # left truncation keeps BOS
    assert ids.tolist() == [[1, 5, 12, 11], [1, 6, 12, 11]] and mask.min() == 1


# ----------------------------------------------------------------------------- classification


def test_classification_label_words_and_scoring():
    d = classification_as_instruct(["a b", "c"], [1, 0], ("neg", "pos"))
    assert d.prompts[0] == "Classify the text. Answer with one of: neg, pos.\n\nText: a b"
    assert d.responses == ["pos", "neg"] and d.categories.tolist() == [1, 0]
    assert d.category_names == ("neg", "pos") and d.categories.dtype == np.int32
    pair = classification_as_instruct(["a"], [0], ("x", "y"), texts_b=["b"], instruction="Same?")
    assert pair.prompts == ["Same?\n\nText 1: a\nText 2: b"]
    tok = word_tokenizer()
    assert label_word_ids(tok, ["d", "e f"], "{prompt}").tolist() == [7, 8]
    with pytest.raises(DataError, match=r"'e f' and 'e'.*first token"):
        label_word_ids(tok, ["e f", "e"], "{prompt}")
    logits = np.array([[0.0, 5.0, 1.0, 2.0], [9.0, 0.0, 3.0, 1.0]])
    pred = score_label_words(logits, np.array([2, 3]))   # class 0 is token 2, class 1 token 3
    assert pred.tolist() == [1, 0] and pred.dtype == np.int32
    import jax.numpy as jnp

    assert score_label_words(jnp.asarray(logits), [3, 2]).tolist() == [0, 1]


def test_label_words_with_bpe_tokenizer():
    names = ["negative", "positive"]
    tok = build_tokenizer(["the film was negative .", "the film was positive ."] * 20, vocab_size=300)
    ids = label_word_ids(tok, names, "builtin")
    d = classification_as_instruct(["the film"], [1], names)
    a, _ = tokenize_instruct(d, tok, 256, "builtin")
    assert a["labels"][0, a["prompt_length"][0]] == ids[1]


# ----------------------------------------------------------------------------- extractors


def test_extractors_on_real_answer_strings():
    assert gsm8k_reference("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72") == "72"
    assert gsm8k_reference("So in total he made $<<109200+5000=114200>>114,200\n#### 114,200") == "114200"
    assert gsm8k_reference("#### 1,234") == "1234" and gsm8k_reference("#### -7") == "-7"
    assert last_number("She earned $1,234.0 in total.") == "1234"
    assert last_number("The answer is 72.") == "72" and last_number("it is 2.50 m") == "2.5"
    assert last_number("from 3 to 5") == "5" and last_number("no numbers") is None
    assert last_number("the average is -7 degrees") == "-7"
    assert gsm8k_prediction("48/2 = 24\n#### 72\nQuestion: 99") == "72"
    m = EXTRACTORS["gsm8k"]
    assert m("so 1,234 apples", "...\n#### 1,234") and not m("so 1,235", "#### 1234")
    assert EXTRACTORS["label_word"](" Positive.", "positive")
    assert not EXTRACTORS["label_word"]("positively", "positive")
    assert EXTRACTORS["exact"](" yes\n", "yes") and not EXTRACTORS["exact"]("yes!", "yes")
    assert exact_match(["72", None, "5"], ["72", "3", "6"]) == pytest.approx(1 / 3)
    with pytest.raises(DataError, match="2 predictions but 1"):
        exact_match(["1", "2"], ["1"])
    with pytest.raises(DataError, match="####"):
        gsm8k_reference("no final line")


# ----------------------------------------------------------------------------- files and spec


def test_alpaca_jsonl_with_inputs_and_categories(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 3", "output": "5", "kind": "math"},
            {"instruction": "Say hi.", "input": "", "output": "hi", "kind": "chat"},
            {"instruction": "Sub.", "input": None, "output": "1", "kind": "math"}]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = instruct_spec({"train": str(path), "prompt": "instruction", "input": "input", "response": "output",
                          "category": "kind"})
    d = load_instruct(spec, "train")
    assert d.prompts == ["Add.", "Say hi.", "Sub."] and d.inputs == ["2 3", "", ""]
    assert d.responses == ["5", "hi", "1"]
    assert d.category_names == ("chat", "math") and d.categories.tolist() == [1, 0, 1]
    assert d.categories.dtype == np.int32
    parts = dirichlet(d.categories, 2, seed=0, alpha=1.0, min_samples=0)
    assert sorted(np.concatenate(parts).tolist()) == [0, 1, 2]
    texts = render_prompts(d, word_tokenizer(), "builtin")
    assert "### Input:\n2 3\n\n" in texts[0] and "### Input" not in texts[1]
    # the same rows as one JSON array (Alpaca's own file format)
    arr = tmp_path / "alpaca.json"
    arr.write_text(json.dumps(rows))
    assert load_instruct({**spec.__dict__, "train": str(arr)}, "train").prompts == d.prompts


def test_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "qa.csv"
    csv_path.write_text('question,answer,topic\n"What is 2+2, really?",4,1\nName a colour.,red,0\n')
    d = load_instruct(InstructSpec(train=str(csv_path), validation=str(csv_path), category="topic"), "dev")
    assert d.prompts == ["What is 2+2, really?", "Name a colour."] and d.responses == ["4", "red"]
    assert d.category_names == ("0", "1") and d.categories.tolist() == [1, 0] and d.split == "validation"
    pq_path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"q": ["Why?", "How?"], "a": ["Because.", "So."]}), pq_path)
    d = load_instruct(InstructSpec(train=[str(pq_path), str(pq_path)], prompt="q", response="a"), "train")
    assert d.prompts == ["Why?", "How?"] * 2 and d.categories is None and d.category_names == ()


def test_missing_fields_and_empty_files(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "output": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl.*'answer'") as e:
        load_instruct(InstructSpec(train=str(path)), "train")
    assert "\n" not in str(e.value)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("prompt,answer\nq,a\n")
    with pytest.raises(DataError, match=r"bad\.csv.*'question'"):
        load_instruct(InstructSpec(train=str(csv_path)), "train")
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"ragged\.jsonl row 2.*'answer'"):
        load_instruct(InstructSpec(train=str(ragged)), "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        load_instruct(InstructSpec(train=str(empty)), "train")
    with pytest.raises(DataNotFoundError, match="nowhere.jsonl"):
        load_instruct(InstructSpec(train=str(tmp_path / "nowhere.jsonl")), "train")
    with pytest.raises(DataError, match="validation is not set"):
        load_instruct(InstructSpec(train=str(path)), "validation")


@pytest.mark.parametrize("fields, key", [
    ({"train": "a.jsonl", "colour": 1}, "colour"),
    ({"validation": "a.jsonl"}, "train"),
    ({"train": ""}, "train"),
    ({"train": "a.jsonl", "format": "xml"}, "format"),
    ({"train": "a.jsonl", "encoding": "klingon"}, "encoding"),
    ({"train": "a.jsonl", "template": "Q: {question}"}, "template"),
    ({"train": "a.jsonl", "template": "Q: {prompt}", "input": "input"}, "template"),
    ({"train": "a.jsonl", "prompt": ""}, "prompt"),
    ({"train": "a.jsonl", "response": "question"}, "response"),
])
def test_spec_errors_name_the_key(fields, key):
    with pytest.raises(SpecError) as e:
        instruct_spec(fields)
    assert e.value.field == key


# ----------------------------------------------------------------------------- tokenizer


def test_build_tokenizer_is_deterministic_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    texts = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.", "#### 72", "the cat sat on the mat"] * 5
    t1, t2 = build_tokenizer(texts, 300), build_tokenizer(texts, 300)
    assert t1.backend_tokenizer.to_str() == t2.backend_tokenizer.to_str()
    assert 259 < len(t1) <= 300 and (t1.pad_token_id, t1.bos_token_id, t1.eos_token_id) == (0, 1, 2)
    enc = t1("the cat")["input_ids"]
    assert enc[0] == 1 and 2 not in enc and t1("the cat", add_special_tokens=False)["input_ids"] == enc[1:]
    assert t1.decode(enc, skip_special_tokens=True) == "the cat"
    t1.save_pretrained(tmp_path / "tok")
    t3 = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert t3("Natalia sold 48 clips")["input_ids"] == t1("Natalia sold 48 clips")["input_ids"]
    assert (t3.pad_token, t3.bos_token, t3.eos_token) == ("<pad>", "<s>", "</s>")
    assert t3.get_vocab() == t1.get_vocab()
    with pytest.raises(DataError, match="vocab_size"):
        build_tokenizer(texts, 100)


# ----------------------------------------------------------------------------- GSM8K


def test_gsm8k_reading_and_tokenizing():
    root = gsm8k_dir()
    spec = InstructSpec(train=str(root / "train.jsonl"), validation=str(root / "test.jsonl"))
    train, test = load_instruct(spec, "train"), load_instruct(spec, "validation")
    assert (len(train), len(test)) == (7473, 1319)
    assert train.prompts[0].startswith("Natalia sold clips to 48 of her friends in April")
    assert gsm8k_reference(train.responses[0]) == "72"
    refs = [gsm8k_reference(r) for r in test.responses]
    assert refs[201] == "114200" and all(r.lstrip("-").replace(".", "").isdigit() for r in refs)
    assert EXTRACTORS["gsm8k"](test.responses[201], test.responses[201])   # a reference scores itself
    tok = build_tokenizer(test.prompts[:300] + test.responses[:300], vocab_size=512)
    a, s = tokenize_instruct(test, tok, 256, "auto")
    assert s["examples"] == 1319 and s["dropped"] == 0 and s["kept"] == 1319
    assert a["input_ids"].shape[1] <= 256 and s["prompt_truncated"] + s["response_truncated"] > 0
    j = int(np.flatnonzero(a["attention_mask"].sum(1) < 256)[0])   # an untruncated example
    resp = a["labels"][j][a["labels"][j] != IGNORE]
    assert resp[-1] == tok.eos_token_id and tok.decode(resp[:-1]) == test.responses[a["index"][j]]
    assert tok.decode(a["input_ids"][j, 1:a["prompt_length"][j]]) == builtin_prompt(test.prompts[a["index"][j]])
