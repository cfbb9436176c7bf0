"""Causal language modelling (decoder LLMs): instruction tuning with the loss on response tokens.

Data (:mod:`hfl_jax.data.instruct`): ``input_ids`` ``[N, T]`` (prompt, then response and EOS,
right-padded) and ``labels`` ``[N, T]``: the token id on response tokens, ``-100`` elsewhere. The
logits at position ``t`` predict token ``t + 1`` (as transformers shifts), so the loss of a row is
the mean next-token cross-entropy over its response tokens; a batch's loss is the mean over all its
real response tokens (``StepMetrics.count``: tokens). Packed rows (:mod:`hfl_jax.data.packing`)
carry the labels scattered like the tokens; a target that starts another sequence never counts.

Main metric (``eval_accuracy``, what reports, targets, the bandit's and sweep's choices read):

* a classification dataset as generation (SST-2, AG News, a custom one): the label word the model
  ranks highest at the last prompt position, among the label words' first tokens
  (:func:`hfl_jax.data.instruct.label_word_ids`), against the true label: in the compiled
  evaluation, every evaluation round;
* instruction data with ``evaluation.generate > 0``: exact match of greedy generations (KV cache,
  adapters applied) on that many evaluation examples, through the task's extractor (GSM8K: the
  number after ``####`` against the response's last number), on the host after the compiled
  evaluation (:func:`generation_metric`);
* otherwise next-token accuracy on response tokens.

Every evaluation also reports the response tokens' mean loss and its perplexity ``exp(loss)``.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfl_jax.objectives.base import Prepared, StepMetrics, with_head

NAME = "causal_lm"
IGNORE = -100


def token_loss(logits, labels, weight) -> StepMetrics:
    """Next-token cross-entropy: ``logits [B, T, V]`` at position ``t`` against ``labels[:, t + 1]``
    where ``weight[:, t + 1]`` (bool ``[B, T]``) and the label is not ``-100``."""
    tgt = labels[:, 1:]
    w = (weight[:, 1:] & (tgt >= 0)).astype(jnp.float32)
    lg = logits[:, :-1].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(lg, jnp.maximum(tgt, 0))
    n = w.sum()
    mean = (ce * w).sum() / jnp.maximum(n, 1.0)
    correct = ((jnp.argmax(lg, -1) == tgt) * w).sum()
    return StepMetrics(mean, correct, n)


def loss_fn(model, depth, start_layer: int = 0) -> Callable:
    """``loss(trainable, base, batch) -> (mean_loss, StepMetrics)``: mean next-token cross-entropy
    over the batch's response tokens at fine-tuning ``depth`` (static or a traced int32).

    ``batch``: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` and ``mask`` ``[B]`` (padding
    examples: False); or packed (``segment_ids``, ``position_ids``, ``labels`` ``[R, L]``). With
    ``start_layer > 0`` the batch carries the cached ``hidden`` ``[B, T, H]`` of the bottom layers.
    """

    def loss(trainable, base, batch):
        params = with_head(base, trainable)
        labels = batch["labels"]
        if "segment_ids" in batch:
            seg = batch["segment_ids"]
            logits = model.apply(params, batch["input_ids"], None, None, lora=trainable["lora"], depth=depth,
                                 position_ids=batch["position_ids"], segment_ids=seg)
            # a target in another sequence (or padding) than its predicting token never counts
            weight = jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] == seg[:, :-1]], axis=1) & (seg > 0)
        else:
            hidden0 = batch["hidden"] if start_layer else None
            logits = model.apply(params, batch["input_ids"], batch["attention_mask"], None, lora=trainable["lora"],
                                 depth=depth, start_layer=start_layer, hidden0=hidden0)
            weight = jnp.broadcast_to(batch["mask"][:, None], labels.shape)
        m = token_loss(logits, labels, weight)
        return m.loss, m

    return loss


@flax.struct.dataclass
class LMEval:
    """The evaluation set of a causal-LM run, padded to ``nb`` batches of ``B`` rows.

    Attributes:
      input_ids, attention_mask, token_type_ids: int32 [nb, B, T] (right-padded; token types 0).
      labels: int32 [nb, B, T], ``-100`` off the response.
      valid: bool [nb, B]; False on the rows that fill the last batch.
      answer_pos: int32 [nb, B]: the last prompt token's position (its logits score the label words).
      classes: int32 [nb, B]: the example's class (classification as generation; else 0).
      label_ids: static tuple, the label words' first token ids; empty: no label-word metric.
    """

    input_ids: Any
    attention_mask: Any
    token_type_ids: Any
    labels: Any
    valid: Any
    answer_pos: Any
    classes: Any
    hidden: Any = None
    hidden_layer: int = flax.struct.field(pytree_node=False, default=0)
    label_ids: tuple = flax.struct.field(pytree_node=False, default=())

    @property
    def num_examples(self) -> int:
        return int(np.asarray(self.valid).sum())


def answer_positions(labels: np.ndarray) -> np.ndarray:
    """``[N]`` the position of each row's last prompt token: one before its first response label
    (0 for a row without any)."""
    labels = np.asarray(labels)
    has = (labels != IGNORE).any(-1)
    return np.where(has, np.argmax(labels != IGNORE, axis=-1) - 1, 0).clip(0).astype(np.int32)


def lm_eval(arrays: dict, batch_size: int, classes: np.ndarray | None = None, label_ids=()) -> LMEval:
    """``arrays`` (``input_ids``, ``attention_mask``, ``labels`` ``[N, T]``) padded to whole batches."""
    n = len(arrays["input_ids"])
    if n == 0:
        from hfl_jax.data.tasks import DataError
        raise DataError("the evaluation set is empty")
    nb = -(-n // batch_size)
    pad = nb * batch_size - n

    def fix(x, fill=0):
        x = np.asarray(x)
        x = np.concatenate([x, np.full((pad, *x.shape[1:]), fill, x.dtype)])
        return x.reshape(nb, batch_size, *x.shape[1:])
    ids = np.asarray(arrays["input_ids"], np.int32)
    return LMEval(input_ids=fix(ids), attention_mask=fix(np.asarray(arrays["attention_mask"], np.int32)),
                  token_type_ids=fix(np.zeros_like(ids)), labels=fix(np.asarray(arrays["labels"], np.int32), IGNORE),
                  valid=fix(np.ones(n, bool), False), answer_pos=fix(answer_positions(arrays["labels"])),
                  classes=fix(np.zeros(n, np.int32) if classes is None else np.asarray(classes, np.int32)),
                  label_ids=tuple(int(i) for i in label_ids))


def evaluate_fn(model) -> Callable:
    """``evaluate(trainable, base, lm_eval) -> (mean_loss, main_metric)`` (not jitted): the mean
    next-token loss over all response tokens, and label-word accuracy over the examples when the
    set has label words (:class:`LMEval`), else next-token accuracy over response tokens."""

    def evaluate(trainable, base, batches: LMEval):
        start = batches.hidden_layer
        label_ids = jnp.asarray(batches.label_ids or (0,), jnp.int32)
        params = with_head(base, trainable)

        def one(b):
            hidden0 = b["hidden"] if start else None
            logits = model.apply(params, b["input_ids"], b["attention_mask"], None, lora=trainable["lora"],
                                 depth=0, start_layer=start, hidden0=hidden0)
            weight = jnp.broadcast_to(b["valid"][:, None], b["labels"].shape)
            m = token_loss(logits, b["labels"], weight)
            at = jnp.take_along_axis(logits, b["answer_pos"][:, None, None], axis=1)[:, 0]   # [B, V]
            pred = jnp.argmax(at[:, label_ids], -1)
            label_correct = ((pred == b["classes"]) & b["valid"]).sum()
            return m.loss * m.count, m.correct, m.count, label_correct, b["valid"].sum()
        keys = ("input_ids", "attention_mask", "labels", "valid", "answer_pos", "classes") + (("hidden",) if start else ())
        loss_sum, correct, count, label_correct, examples = jax.lax.map(
            one, {k: getattr(batches, k) for k in keys})
        n = jnp.maximum(count.sum(), 1.0)
        if batches.label_ids:
            return loss_sum.sum() / n, label_correct.sum() / jnp.maximum(examples.sum(), 1)
        return loss_sum.sum() / n, correct.sum() / n

    return evaluate


def generation_metric(model, trainable, base, prompts: dict, references: list, *, tokenizer, extractor: Callable,
                      max_new_tokens: int, batch_size: int) -> tuple[float, list[str]]:
    """Exact match of greedy generations: ``(fraction matched, generated texts)``.

    ``prompts``: ``input_ids``/``attention_mask`` ``[N, Tp]`` left-padded
    (:func:`hfl_jax.data.instruct.tokenize_prompts`); ``references[i]``: the reference response
    text; ``extractor(generated, reference) -> bool`` (:data:`hfl_jax.data.instruct.EXTRACTORS`).
    Generation runs in batches of ``batch_size`` (the last one padded with copies of row 0, whose
    outputs are dropped), so one compiled program serves every batch."""
    from hfl_jax.models.generate import greedy_generate

    ids, mask = np.asarray(prompts["input_ids"]), np.asarray(prompts["attention_mask"])
    n = len(ids)
    params = with_head(base, trainable)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = []
    for s in range(0, n, batch_size):
        b_ids, b_mask = ids[s:s + batch_size], mask[s:s + batch_size]
        fill = batch_size - len(b_ids)
        if fill:
            b_ids = np.concatenate([b_ids, np.repeat(b_ids[:1], fill, 0)])
            b_mask = np.concatenate([b_mask, np.repeat(b_mask[:1], fill, 0)])
        out = np.asarray(greedy_generate(model, params, trainable["lora"], jnp.asarray(b_ids), jnp.asarray(b_mask),
                                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad))
        for row in out[:batch_size - fill]:
            row = [int(t) for t in row]
            if eos in row:
                row = row[:row.index(eos)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    hits = [bool(extractor(g, r)) for g, r in zip(texts, references)]
    return float(np.mean(hits)) if hits else 0.0, texts


# --- data -----------------------------------------------------------------------------------------

def load_tokenizer(cfg, texts):
    """The run's tokenizer: ``data.tokenizer`` (a directory or hub id) or the checkpoint's own
    (transformers' fast tokenizer); for ``model.name: tiny-decoder`` without one, a byte-level BPE
    tokenizer of ``model.tiny.vocab_size`` tokens trained on the run's training texts in-process
    (:func:`hfl_jax.data.instruct.build_tokenizer`: deterministic, offline)."""
    from hfl_jax.data.instruct import build_tokenizer, special_ids

    from hfl_jax.models.tiny import TINY_MODELS
    name = cfg.data.tokenizer or (None if cfg.model.name in TINY_MODELS else cfg.model.name)
    if name is None:
        tok = build_tokenizer(texts, vocab_size=cfg.model.tiny.vocab_size)
    else:
        from pathlib import Path

        from transformers import AutoTokenizer

        from hfl_jax.models.hub import resolve_model_dir
        where = Path(name).expanduser() if Path(name).expanduser().is_dir() else resolve_model_dir(name)
        tok = AutoTokenizer.from_pretrained(str(where), use_fast=True)
    special_ids(tok)   # DataError naming the tokenizer when it has neither pad nor EOS token
    return tok


def _instruct_splits(cfg):
    """``(train, evaluation, label_ids_wanted)`` :class:`~hfl_jax.data.instruct.InstructData` of the rows
    a run uses: ``data.task: instruct`` reads ``data.instruct`` files; any classification task
    (``sst2``, ``custom``, ...) becomes prompt + label-word response."""
    from hfl_jax.data.splits import eval_subset, training_rows

    d = cfg.data
    if d.task == "instruct":
        from hfl_jax.data.instruct import instruct_spec, load_instruct
        spec = instruct_spec(d.instruct)
        full = load_instruct(spec, "train")
        rows, valid_rows = training_rows(cfg, len(full))
        train = full if len(rows) == len(full) else full.take(rows)
        if d.evaluate == "validation" or spec.validation is None:
            if d.evaluate != "validation" and not len(valid_rows):
                from hfl_jax.data.tasks import DataError
                raise DataError(f"data.instruct has no validation file and data.validation_size is 0: "
                                f"nothing to evaluate on (set one of them)")
            evaluation = full.take(valid_rows)
        else:
            evaluation = load_instruct(spec, "validation")
        sub = eval_subset(cfg, len(evaluation))
        return train, (evaluation if sub is None else evaluation.take(sub)), False
    from hfl_jax.data.instruct import classification_as_instruct
    from hfl_jax.objectives.classification import load_text

    convert = lambda ds: classification_as_instruct(ds.text_a, ds.labels, ds.label_names, ds.text_b,
                                                    source=ds.source)
    train_text, eval_text = load_text(cfg)
    return convert(train_text), convert(eval_text), True


def prepare(cfg, start_model: Callable) -> Prepared:
    """Loads the run's instructions (or a classification dataset as generation), builds or loads the
    tokenizer, starts the model (``start_model(vocab_size=V)``), tokenizes with the loss on
    response tokens only (:func:`hfl_jax.data.instruct.tokenize_instruct`), and prepares what the
    evaluation needs: label words, and the left-padded prompts of the examples to generate for."""
    from hfl_jax.data.instruct import label_word_ids, render_prompts, tokenize_instruct, tokenize_prompts

    d, ev = cfg.data, cfg.evaluation
    train, evaluation, as_labels = _instruct_splits(cfg)
    template = d.instruct.get("template", "auto") if d.task == "instruct" else "auto"
    from hfl_jax.data.instruct import builtin_prompt
    inputs = train.inputs or [""] * len(train.prompts)
    corpus = [builtin_prompt(p, i, train.system) for p, i in zip(train.prompts, inputs)] + list(train.responses)
    tok = load_tokenizer(cfg, corpus)   # a built tokenizer learns the template's words too
    future = start_model(vocab_size=len(tok))
    train_arrays, train_stats = tokenize_instruct(train, tok, d.max_length, template)
    eval_arrays, eval_stats = tokenize_instruct(evaluation, tok, d.max_length, template)
    if train.categories is not None:
        classes, names = np.asarray(train.categories, np.int32)[train_arrays["index"]], tuple(train.category_names)
    else:   # no category column: every example one class (IID partitions only)
        classes, names = np.zeros(len(train_arrays["input_ids"]), np.int32), ("all",)
    extras = {"tokenizer": tok, "template": template}
    eval_classes = None
    if as_labels:
        extras["label_ids"] = tuple(int(i) for i in label_word_ids(tok, evaluation.category_names, template))
        eval_classes = np.asarray(evaluation.categories, np.int32)[eval_arrays["index"]]
    if ev.generate:
        n = min(ev.generate, len(evaluation))
        texts = render_prompts(evaluation.take(np.arange(n)), tok, template)
        ids, mask = tokenize_prompts(texts, tok, d.max_length)
        extras["generation"] = {"prompts": {"input_ids": ids, "attention_mask": mask},
                                "references": list(evaluation.responses[:n])}
    train_arrays = {**train_arrays, "token_type_ids": np.zeros_like(train_arrays["input_ids"])}
    eval_arrays = {**eval_arrays, "token_type_ids": np.zeros_like(eval_arrays["input_ids"]),
                   "classes": eval_classes}
    return Prepared(train=train_arrays, evaluation=eval_arrays, classes=classes, class_names=names,
                    model=future.result(), extras=extras,
                    info={"train_truncation": train_stats, "eval_truncation": eval_stats})


def eval_data(cfg, prepared: Prepared, model, prepare_rows: Callable, pack_row_len: int) -> LMEval:
    """The evaluation set as :func:`evaluate_fn` takes it (padded batches, trimmed by ``prepare_rows``)."""
    e = prepared.evaluation
    return prepare_rows(lm_eval(e, cfg.train.eval_batch_size, e.get("classes"),
                                prepared.extras.get("label_ids", ())))


def extra_metrics(cfg, prepared: Prepared, model, trainable, base, metrics: dict) -> dict:
    """Perplexity of the response tokens; with generation configured (``evaluation.generate``), the
    exact match of greedy generations becomes the main metric (``eval_accuracy``; the compiled
    evaluation's metric is kept as ``eval_token_accuracy``/``eval_label_accuracy``)."""
    from hfl_jax.data.metrics_text import EXTRACTORS

    out = {"eval_perplexity": float(np.exp(min(metrics["eval_loss"], 50.0)))}
    gen = prepared.extras.get("generation")
    if gen:
        ev = cfg.evaluation
        key = "eval_label_accuracy" if prepared.extras.get("label_ids") else "eval_token_accuracy"
        out[key] = metrics["eval_accuracy"]
        match, _ = generation_metric(model, trainable, base, gen["prompts"], gen["references"],
                                     tokenizer=prepared.extras["tokenizer"], extractor=EXTRACTORS[ev.extractor],
                                     max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
        out["eval_accuracy"] = out["eval_exact_match"] = match
    return out
