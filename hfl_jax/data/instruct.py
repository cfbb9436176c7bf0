"""Instruction-tuning data for decoder language models (host-side numpy and Python).

* `InstructSpec` / `instruct_spec`: which files and fields hold prompts and responses (JSON Lines,
  a JSON array, CSV, TSV, Parquet; GSM8K's ``question``/``answer`` by default, Alpaca's
  ``instruction``/``input``/``output`` with ``prompt: instruction, input: input, response: output``).
* `load_instruct`: one split as `InstructData` (texts, and integer categories for non-IID
  partitions through `hfl_jax.data.partition`).
* `render_prompts`: the prompt text of each example: the built-in Alpaca template (Taori et al.,
  2023), the tokenizer's chat template, or a custom ``{prompt}``/``{input}`` string.
* `tokenize_instruct`: ``input_ids``/``attention_mask``/``labels`` [N, T] for a causal-LM loss on the
  response tokens only; `tokenize_prompts`: left-padded prompts for batched generation.
* `classification_as_instruct`, `label_word_ids`, `score_label_words`: a classification task
  answered with a label word, scored on the next-token logits after the prompt.
* `build_tokenizer`: a tiny byte-level BPE tokenizer trained in-process, for offline tests and
  smoke models. Answer extractors and exact match live in `hfl_jax.data.metrics_text`.

Tokenizers are transformers tokenizers (``tokenizer(texts, add_special_tokens=False)``,
``bos_token_id``/``eos_token_id``/``pad_token_id``, ``apply_chat_template``); the project's
`JsonTokenizer` (BERT/RoBERTa encoders only) is not one.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hfl_jax.data.metrics_text import (  # noqa: F401 - re-exported: one import for the driver
    EXTRACTORS,
    exact_match,
    gsm8k_prediction,
    gsm8k_reference,
    last_number,
)
from hfl_jax.data.tasks import (
    FORMATS,
    _SPLIT_ALIASES,
    DataError,
    SpecError,
    _as_int,
    _decode,
    _infer_format,
    _paths,
    _read_table,
)

log = logging.getLogger(__name__)

IGNORE = -100   # label of a position outside the loss (transformers' and optax's convention)
TEMPLATES = ("auto", "builtin", "chat")
PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                  "further context. Write a response that appropriately completes the request.")


# ----------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class InstructSpec:
    """Where an instruction dataset lives and which fields hold what (the config's ``data.instruct``).

    Attributes:
      train: path (or paths, concatenated) of the training split.
      validation: path(s) of the evaluation split, or None.
      format: ``auto`` (from each file's suffix: .jsonl/.json, .csv, .tsv, .parquet), or one of
        jsonl, json, csv, tsv, parquet. A JSON file may hold one object a line or one array.
      prompt: field of the instruction / question.
      input: optional field of a second prompt part (Alpaca's ``input``; empty values allowed).
      response: field of the target response.
      category: optional field whose values become integer categories for non-IID partitions.
      system: optional system prompt (chat templates: a system message; the built-in template:
        replaces its "Below is an instruction..." preamble).
      template: ``auto`` (the tokenizer's chat template when it has one, else ``builtin``),
        ``builtin``, ``chat``, or a custom string holding ``{prompt}`` (and ``{input}`` when
        `input` is set; ``{system}`` optional).
      encoding: text encoding of CSV/TSV/JSON files.

    Raises `SpecError` naming the offending key on construction.
    """

    train: str | Sequence[str]
    validation: str | Sequence[str] | None = None
    format: str = "auto"
    prompt: str = "question"
    input: str | None = None
    response: str = "answer"
    category: str | None = None
    system: str | None = None
    template: str = "auto"
    encoding: str = "utf-8"

    def __post_init__(self):
        for k in ("train", "validation"):
            v = getattr(self, k)
            if isinstance(v, list):
                v = tuple(v)
                object.__setattr__(self, k, v)
            ok = (v is None and k == "validation") or (isinstance(v, str) and v.strip()) or (
                isinstance(v, tuple) and v and all(isinstance(x, str) and x.strip() for x in v))
            if not ok:
                raise SpecError(k, f"expected a file path or a non-empty list of paths, got {v!r}")
        for k in ("prompt", "response", "input", "category", "format", "encoding", "template", "system"):
            v = getattr(self, k)
            optional = k in ("input", "category", "system")
            if not ((v is None and optional) or (isinstance(v, str) and v.strip())):
                raise SpecError(k, f"expected a non-empty string{' or null' if optional else ''}, got {v!r}")
        if self.prompt == self.response:
            raise SpecError("response", f"is the same field as prompt ({self.prompt!r})")
        if self.format.lower() not in ("auto", *FORMATS):
            raise SpecError("format", f"unknown format {self.format!r}; one of auto, {', '.join(FORMATS)}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise SpecError("encoding", f"unknown text encoding {self.encoding!r} (e.g. utf-8, latin-1)") from None
        if self.template not in TEMPLATES:
            if "{prompt}" not in self.template:
                raise SpecError("template", f"expected auto, builtin, chat or a string holding '{{prompt}}', "
                                            f"got {self.template!r}")
            if self.input is not None and "{input}" not in self.template:
                raise SpecError("template", f"the input field {self.input!r} is set but the template has no "
                                            "'{input}' to put it in")


def instruct_spec(fields: InstructSpec | Mapping[str, object]) -> InstructSpec:
    """A checked `InstructSpec` from a mapping of its fields (a config section); raises `SpecError`
    naming the key: unknown or missing key, wrong type, unknown format, encoding or template."""
    if isinstance(fields, InstructSpec):
        return fields
    if not isinstance(fields, Mapping):
        raise SpecError("instruct", f"expected a mapping, got {type(fields).__name__}")
    known = [f.name for f in dataclasses.fields(InstructSpec)]
    for k in fields:
        if k not in known:
            raise SpecError(str(k), f"unknown key (known: {', '.join(known)})")
    if fields.get("train") is None:
        raise SpecError("train", "required")
    return InstructSpec(**dict(fields))


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class InstructData:
    """One split of an instruction dataset.

    Attributes:
      prompts: list[str] [N], the instruction / question of each example.
      inputs: list[str] [N] of second prompt parts ("" where absent), or None.
      responses: list[str] [N], the target responses.
      categories: int32 [N] category ids in [0, len(category_names)) for the label partitioners
        of `hfl_jax.data.partition`, or None when the data has no category field: then only IID
        partitions apply (partition ``np.zeros(N)`` with ``iid``).
      category_names: category names in id order (() without categories).
      source: where the data came from (file paths).
      system: system prompt, or None.
      split: canonical split name.
    """

    prompts: list[str]
    inputs: list[str] | None
    responses: list[str]
    categories: np.ndarray | None
    category_names: tuple[str, ...]
    source: str
    system: str | None = None
    split: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: np.ndarray) -> "InstructData":
        """The rows ``idx`` (int array [M]), in that order."""
        idx = np.asarray(idx, np.int64)
        pick = lambda col: None if col is None else [col[i] for i in idx]
        return dataclasses.replace(
            self, prompts=pick(self.prompts), inputs=pick(self.inputs), responses=pick(self.responses),
            categories=None if self.categories is None else self.categories[idx],
            split=f"{self.split}[{len(idx)} rows]")

    def fingerprint(self) -> str:
        """sha256 hex digest of the texts, categories and system prompt (not of `source`), for caches."""
        h = hashlib.sha256(json.dumps([len(self), self.inputs is not None, self.system,
                                       list(self.category_names)]).encode())
        for col in (self.prompts, self.inputs or [], self.responses):
            for s in col:
                h.update(s.encode("utf-8") + b"\x1f")
            h.update(b"\x1e")
        if self.categories is not None:
            h.update(np.ascontiguousarray(self.categories, np.int32).tobytes())
        return h.hexdigest()


def _missing_value(v: object) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _read_rows(path: Path, fmt: str, encoding: str) -> list[dict[str, object]]:
    """Rows of one file: `tasks._read_table`, plus JSON files holding one array of objects."""
    if fmt in ("json", "jsonl") and path.is_file():
        with open(path, "rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            try:
                rows = json.loads(_decode(path, encoding))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
            if not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{path}: a JSON array of objects expected")
            return rows
    rows = _read_table(path, fmt, encoding)
    bad = next((n for n, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path} row {bad}: a JSON object expected, got {type(rows[bad - 1]).__name__}")
    return rows


def _read_split(spec: InstructSpec, split: str) -> tuple[list[dict[str, object]], list[str], str]:
    """Rows of ``split`` (files concatenated), each row's origin (``FILE row N``), and the sources."""
    files = spec.train if split == "train" else spec.validation
    if files is None:
        raise DataError(f"instruction dataset has no {split!r} split (InstructSpec.validation is not set)")
    needed = [spec.prompt, spec.response] + [f for f in (spec.input, spec.category) if f]
    rows: list[dict[str, object]] = []
    origins: list[str] = []
    paths = _paths(files)
    for path in paths:
        fmt = _infer_format(path) if spec.format.lower() == "auto" else spec.format.lower()
        part = _read_rows(path, fmt, spec.encoding)
        if not part:
            raise DataError(f"instruction data file {path} is empty (no rows)")
        missing = [f for f in needed if f not in part[0]]
        if missing:
            raise DataError(f"{path}: no field(s) {missing} (prompt/response/input/category fields of the spec); "
                            f"fields in the file: {list(part[0])}")
        for n, r in enumerate(part, 1):
            lacking = [f for f in needed if f not in r]
            if lacking:
                raise DataError(f"{path} row {n}: no field(s) {lacking}")
        rows.extend(part)
        origins.extend(f"{path} row {n}" for n in range(1, len(part) + 1))
    return rows, origins, ", ".join(str(p) for p in paths)


def _category_key(v: object) -> str:
    i = _as_int(v)
    return str(i) if i is not None else str(v).strip()


def _category_names(keys: Sequence[str]) -> tuple[str, ...]:
    uniq = set(keys)
    if all(_as_int(k) is not None for k in uniq):
        return tuple(sorted(uniq, key=int))
    return tuple(sorted(uniq))


def load_instruct(spec: InstructSpec | Mapping[str, object], split: str) -> InstructData:
    """Load one split of an instruction dataset.

    Args:
      spec: an `InstructSpec` or a mapping of its fields.
      split: ``train`` or ``validation`` (aliases dev, eval, valid).

    Returns:
      `InstructData` with N rows; texts stripped of surrounding whitespace. Categories get ids in
      the training split's sorted order (integer-like values numerically); categories seen only in
      the validation split get the next ids, so the training ids never move.

    Raises:
      DataNotFoundError: a file does not exist.
      DataError: a file is empty, lacks the prompt/response/input/category field (the one-line
        message names the file and the field), a row has no value for it, or cannot be parsed.
    """
    spec = instruct_spec(spec)
    canon = _SPLIT_ALIASES.get(split, split)
    if canon not in ("train", "validation"):
        raise DataError(f"instruction data has no split {split!r}; choose train or validation")
    rows, origins, where = _read_split(spec, canon)

    def text(i: int, field: str, optional: bool = False) -> str:
        v = rows[i][field]
        if _missing_value(v):
            if optional:
                return ""
            raise DataError(f"{origins[i]}: no value in field {field!r}")
        return str(v).strip()

    n = len(rows)
    prompts = [text(i, spec.prompt) for i in range(n)]
    responses = [text(i, spec.response) for i in range(n)]
    inputs = [text(i, spec.input, optional=True) for i in range(n)] if spec.input else None
    categories, names = None, ()
    if spec.category:
        keys = [text(i, spec.category) for i in range(n)]
        keys = [_category_key(k) for k in keys]
        train_keys = keys if canon == "train" else [
            _category_key(r[spec.category]) for r in _read_split(spec, "train")[0] if not _missing_value(r[spec.category])]
        names = _category_names(train_keys)
        extra = sorted(set(keys) - set(names))
        names = names + tuple(extra)
        index = {k: j for j, k in enumerate(names)}
        categories = np.array([index[k] for k in keys], np.int32)
    log.info("instruction data %s (%s): %d rows%s", where, canon, n,
             f", {len(names)} categories" if spec.category else "")
    return InstructData(prompts=prompts, inputs=inputs, responses=responses, categories=categories,
                        category_names=names, source=f"instruction files {where}", system=spec.system,
                        split=canon)


# ----------------------------------------------------------------------------- templates


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def template_kind(tokenizer: Any, template: str) -> str:
    """``builtin``, ``chat`` or ``custom``: what ``template`` means for ``tokenizer`` (``auto`` is
    ``chat`` when the tokenizer has a chat template). ``chat`` without one raises `DataError`."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "builtin"
    if template == "chat" and not has_chat:
        raise DataError(f"template 'chat': tokenizer {_tokenizer_name(tokenizer)} has no chat template; "
                        "use template 'builtin' or a custom string")
    if template in TEMPLATES:
        return template
    if "{prompt}" not in template:
        raise DataError(f"template {template!r} is not auto, builtin, chat, nor a string holding '{{prompt}}'")
    return "custom"


def builtin_prompt(prompt: str, input: str = "", system: str | None = None) -> str:
    """The built-in Alpaca-style prompt: preamble (or ``system``), ``### Instruction:``, an
    ``### Input:`` block only when ``input`` is non-empty, and ``### Response:\\n``."""
    head = system if system is not None else (PREAMBLE_INPUT if input else PREAMBLE)
    body = f"### Instruction:\n{prompt}\n\n" + (f"### Input:\n{input}\n\n" if input else "")
    return f"{head}\n\n{body}### Response:\n"


def render_prompts(data: InstructData, tokenizer: Any, template: str = "auto") -> list[str]:
    """The prompt text of each example [N] (what the model reads before its response).

    ``builtin``: `builtin_prompt`. ``chat``: ``tokenizer.apply_chat_template([system?, user],
    add_generation_prompt=True, tokenize=False)``, the user message being the prompt, then a blank
    line and the input when it is non-empty. A custom string: ``{prompt}``, ``{input}`` and
    ``{system}`` replaced (other braces are left as they are)."""
    kind = template_kind(tokenizer, template)
    inputs = data.inputs or [""] * len(data)
    if kind == "custom" and "{input}" not in template and any(inputs):
        raise DataError(f"{data.source}: the data has inputs but template {template!r} has no '{{input}}'")
    out = []
    for p, x in zip(data.prompts, inputs):
        if kind == "builtin":
            out.append(builtin_prompt(p, x, data.system))
        elif kind == "custom":
            out.append(template.replace("{prompt}", p).replace("{input}", x)
                       .replace("{system}", data.system or ""))
        else:
            msgs = ([{"role": "system", "content": data.system}] if data.system is not None else []) + [
                {"role": "user", "content": f"{p}\n\n{x}" if x else p}]
            try:
                out.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
            except Exception as e:  # noqa: BLE001 - a jinja error of the tokenizer's own template
                raise DataError(f"tokenizer {_tokenizer_name(tokenizer)}: its chat template failed "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return out


# ----------------------------------------------------------------------------- tokenization


def special_ids(tokenizer: Any) -> tuple[int, int, int | None, bool]:
    """``(pad_id, eos_id, bos_id, adds_bos)`` of a tokenizer: pad is EOS when it has no pad token;
    ``adds_bos`` whether it puts BOS first when encoding with special tokens. Raises `DataError`
    (one line, naming the tokenizer) without an EOS token: responses must end with one."""
    eos, pad = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)
    if eos is None:
        raise DataError(f"tokenizer {_tokenizer_name(tokenizer)} has no EOS token"
                        f"{' and no pad token' if pad is None else ''}; instruction tuning ends each "
                        "response with EOS (and pads with it when there is no pad token)")
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = False
    if bos is not None:
        with_sp = tokenizer("a")["input_ids"]
        adds_bos = with_sp[:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
    return (eos if pad is None else pad), eos, bos, adds_bos


def _encode_prompts(texts: Sequence[str], tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    """(head, body) token ids of each prompt: head is ``[bos]`` or ``[]`` (BOS once, whether the
    tokenizer adds it or the rendered chat template starts with it), body the rest."""
    _, _, bos, adds_bos = special_ids(tokenizer)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    heads, bodies = [], []
    for p in ids:
        starts = bos is not None and p[:1] == [bos]
        heads.append([bos] if (starts or adds_bos) else [])
        bodies.append(list(p[1:] if starts else p))
    return heads, bodies


def _fit(head: int, p: int, r: int, max_length: int, floor: int) -> tuple[int, int]:
    """How many prompt tokens (kept from the end) and response tokens (kept from the start) fit in
    ``max_length`` after ``head`` BOS tokens: cut the prompt down to ``min(floor, p)`` first."""
    room = max(max_length - head, 0)
    if p + r <= room:
        return p, r
    keep_p = min(max(room - r, min(floor, p)), p, room)
    return keep_p, max(min(r, room - keep_p), 0)


def tokenize_instruct(data: InstructData, tokenizer: Any, max_length: int, template: str = "auto",
                      *, prompt_floor: int = 8) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Tokenize prompt/response pairs for a causal-LM loss on the response only.

    Each example is ``[BOS] prompt_ids response_ids EOS``: the rendered prompt (`render_prompts`)
    and the response are tokenized separately (no special tokens) and concatenated; BOS once at
    the start when the tokenizer adds one (or its chat template writes one). Labels are aligned with
    input_ids as in transformers (the loss shifts them: position t predicts token t+1).

    Truncation keeps the response: the prompt is cut from the left (its tail holds the
    ``### Response:`` header / generation prompt) down to ``min(prompt_floor, len(prompt))``
    tokens, then the response from the right (a cut response loses its EOS). Examples with no
    response token left are dropped.

    Args:
      data: the examples (N rows).
      tokenizer: a transformers tokenizer with an EOS token (pad = EOS when it has no pad token).
      max_length: the longest sequence kept.
      template: ``auto``, ``builtin``, ``chat`` or a custom string (see `render_prompts`).
      prompt_floor: prompt tokens kept (at least) before the response is cut.

    Returns:
      ``(arrays, stats)``. arrays: int32 ``input_ids`` [M, T] right-padded with the pad id,
      ``attention_mask`` [M, T], ``labels`` [M, T] (the token id on response tokens and the EOS,
      -100 on BOS, prompt and padding), ``prompt_length`` [M] (tokens before the first response
      token, BOS included), ``index`` [M] (each kept row's index in ``data``), and ``categories``
      [M] when the data has them; M = N - dropped, T = the longest kept example (<= max_length).
      stats: ``examples`` (N), ``kept`` (M), ``dropped``, ``prompt_truncated`` and
      ``response_truncated`` (among kept examples).

    Raises:
      DataError: empty data, a bad max_length, a tokenizer without EOS, or every response
        truncated away (naming the source and max_length).
    """
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise DataError(f"max_length must be a positive integer, got {max_length!r}")
    if len(data) == 0:
        raise DataError(f"{data.source}: no examples to tokenize")
    pad, eos, _, _ = special_ids(tokenizer)
    heads, prompts = _encode_prompts(render_prompts(data, tokenizer, template), tokenizer)
    responses = [list(r) + [eos] for r in tokenizer(list(data.responses), add_special_tokens=False)["input_ids"]]
    rows, stats = [], {"examples": len(data), "kept": 0, "dropped": 0, "prompt_truncated": 0,
                       "response_truncated": 0}
    for i, (h, p, r) in enumerate(zip(heads, prompts, responses)):
        kp, kr = _fit(len(h), len(p), len(r), int(max_length), prompt_floor)
        if kr == 0:
            stats["dropped"] += 1
            continue
        stats["prompt_truncated"] += kp < len(p)
        stats["response_truncated"] += kr < len(r)
        rows.append((i, h + p[len(p) - kp:], r[:kr]))
    if not rows:
        raise DataError(f"{data.source}: every response was truncated away at max_length={max_length} "
                        f"(prompts keep {prompt_floor} tokens); raise max_length")
    stats["kept"] = len(rows)
    t = max(len(p) + len(r) for _, p, r in rows)
    m = len(rows)
    ids = np.full((m, t), pad, np.int32)
    labels = np.full((m, t), IGNORE, np.int32)
    mask = np.zeros((m, t), np.int32)
    plen = np.zeros(m, np.int32)
    for j, (_, p, r) in enumerate(rows):
        ids[j, :len(p) + len(r)] = p + r
        labels[j, len(p):len(p) + len(r)] = r
        mask[j, :len(p) + len(r)] = 1
        plen[j] = len(p)
    index = np.array([i for i, _, _ in rows], np.int32)
    arrays = {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_length": plen, "index": index}
    if data.categories is not None:
        arrays["categories"] = np.asarray(data.categories, np.int32)[index]
    if stats["dropped"] or stats["prompt_truncated"] or stats["response_truncated"]:
        log.warning("%s: at max_length=%d, %d of %d prompts and %d responses truncated, %d examples dropped",
                    data.source, max_length, stats["prompt_truncated"], len(data), stats["response_truncated"],
                    stats["dropped"])
    return arrays, stats


def tokenize_prompts(prompts_text: Sequence[str], tokenizer: Any,
                     max_prompt_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Rendered prompts (`render_prompts`) as a LEFT-padded batch for generation.

    Encoded as `tokenize_instruct` encodes prompts (BOS once, then the prompt's ids), truncated from
    the left (BOS kept) to ``max_prompt_length``. Returns int32 ``input_ids`` [N, Tp] (pad id on the
    left) and ``attention_mask`` [N, Tp], Tp = the longest prompt capped at max_prompt_length; the
    last column is every prompt's last token, where generation continues."""
    if not isinstance(max_prompt_length, (int, np.integer)) or max_prompt_length < 1:
        raise DataError(f"max_prompt_length must be a positive integer, got {max_prompt_length!r}")
    if len(prompts_text) == 0:
        raise DataError("tokenize_prompts: no prompts")
    pad, _, _, _ = special_ids(tokenizer)
    heads, bodies = _encode_prompts(prompts_text, tokenizer)
    seqs = []
    for h, p in zip(heads, bodies):
        h = h[:max_prompt_length]
        keep = max_prompt_length - len(h)
        seqs.append(h + (p[max(len(p) - keep, 0):] if keep else []))
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t), pad, np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for j, s in enumerate(seqs):
        if s:
            ids[j, t - len(s):] = s
            mask[j, t - len(s):] = 1
    return ids, mask


# ----------------------------------------------------------------------------- classification


def classification_as_instruct(texts: Sequence[str], labels: Sequence[int] | np.ndarray,
                               label_names: Sequence[str], texts_b: Sequence[str] | None = None,
                               instruction: str | None = None, source: str = "classification") -> InstructData:
    """A classification dataset as instructions answered with a label word.

    Prompt: ``instruction``, a blank line, then ``Text: <a>`` (pairs: ``Text 1: <a>`` and
    ``Text 2: <b>`` on two lines); response: ``label_names[label]``; category: the label (so label
    partitions apply unchanged). The default instruction lists the label words. Labels int [N] in
    [0, C)."""
    labels = np.asarray(labels)
    names = tuple(str(n).strip() for n in label_names)
    if len(labels) != len(texts) or (texts_b is not None and len(texts_b) != len(texts)):
        raise DataError(f"{source}: {len(texts)} texts, {len(labels)} labels"
                        f"{'' if texts_b is None else f', {len(texts_b)} second texts'}: lengths differ")
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f"{source}: labels outside 0..{len(names) - 1} ({list(names)})")
    if instruction is None:
        what = "text" if texts_b is None else "pair of texts"
        instruction = f"Classify the {what}. Answer with one of: {', '.join(names)}."
    if texts_b is None:
        prompts = [f"{instruction}\n\nText: {a}" for a in texts]
    else:
        prompts = [f"{instruction}\n\nText 1: {a}\nText 2: {b}" for a, b in zip(texts, texts_b)]
    return InstructData(prompts=prompts, inputs=None, responses=[names[int(y)] for y in labels],
                        categories=labels.astype(np.int32), category_names=names, source=source)


def label_word_ids(tokenizer: Any, label_names: Sequence[str], template: str = "auto",
                   system: str | None = None) -> np.ndarray:
    """int32 [C]: the first token of each label word as it appears right after the prompt, i.e.
    the first response token `tokenize_instruct` trains on for that word (the same encoding, so
    training and scoring agree). Raises `DataError` naming the label words when one has no token
    or two share their first token (scoring could not tell them apart)."""
    names = [str(n).strip() for n in label_names]
    probe = InstructData(prompts=["x"] * len(names), inputs=None, responses=names, categories=None,
                         category_names=(), source="label words", system=system)
    arrays, _ = tokenize_instruct(probe, tokenizer, max_length=1 << 20, template=template)
    _, eos, _, _ = special_ids(tokenizer)
    ids = arrays["labels"][np.arange(len(names)), arrays["prompt_length"]].astype(np.int32)
    empty = [n for n, i in zip(names, ids) if i == eos]
    if empty:
        raise DataError(f"label word(s) {empty} encode to no token")
    seen: dict[int, str] = {}
    for n, i in zip(names, ids):
        if int(i) in seen:
            tok = tokenizer.convert_ids_to_tokens(int(i)) if hasattr(tokenizer, "convert_ids_to_tokens") else i
            raise DataError(f"label words {seen[int(i)]!r} and {n!r} share their first token {tok!r} "
                            f"(id {int(i)}); choose label names {names} whose first tokens differ")
        seen[int(i)] = n
    return ids


def score_label_words(logits: Any, label_ids: Sequence[int] | np.ndarray) -> Any:
    """Predicted class [...]: argmax over the label words' ids only of next-token logits
    [..., V] (at the last prompt position), as int32; numpy in, numpy out; jax in, jax out."""
    return logits[..., np.asarray(label_ids)].argmax(-1).astype(np.int32)


# ----------------------------------------------------------------------------- tiny tokenizer


def build_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained in-process on ``texts`` (the ``tokenizers`` library), for
    offline tests and tiny smoke models; returns a ``transformers.PreTrainedTokenizerFast``.

    Deterministic: the same texts and vocab_size give the same vocabulary and merges. Special
    tokens ``<pad>`` (id 0, pad), ``<s>`` (1, bos), ``</s>`` (2, eos); the 256 byte symbols follow, so
    vocab_size >= 259. Like ``add_bos_token=True, add_eos_token=False``: encoding with special
    tokens (transformers' default) puts ``<s>`` first and never appends ``</s>`` (its
    post-processor, which ``save_pretrained``/``AutoTokenizer.from_pretrained`` keep); it has no
    chat template, so ``template='auto'`` means the built-in template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    if vocab_size < len(specials) + 256:
        raise DataError(f"build_tokenizer: vocab_size must be >= {len(specials) + 256} "
                        f"(3 special tokens and 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
