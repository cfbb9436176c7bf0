"""Sequence classification (encoders with a classification head): cross-entropy of the head's
logits, accuracy as the main metric, GLUE / custom text data tokenized per example."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfl_jax.objectives.base import Prepared, StepMetrics, with_head

NAME = "classification"


def loss_fn(model, depth, start_layer: int = 0) -> Callable:
    """``loss(trainable, base, batch) -> (mean_loss, StepMetrics)`` at ``depth`` (static, or a traced int32).

    Examples with ``batch["mask"] == False`` (padding) contribute nothing; a batch
    with no real example has loss 0 and zero gradient. With ``start_layer > 0`` the
    batch carries ``"hidden"`` ``[B, T, H]``, the cached output of the bottom
    ``start_layer`` layers, and the forward pass starts there
    (:meth:`~hfl_jax.models.encoder.EncoderModel.hidden_states`). A batch with ``"segment_ids"``
    is packed (:func:`hfl_jax.data.packing.pack_batch`; labels and mask per slot).
    """

    def loss(trainable, base, batch):
        params = with_head(base, trainable)
        if "segment_ids" in batch:   # packed rows (hfl_jax.data.packing): one logit row per slot
            logits = model.apply(params, batch["input_ids"], None, batch["token_type_ids"], lora=trainable["lora"],
                                 depth=depth, position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
                                 slots=batch["slots"])
        else:
            hidden0 = batch["hidden"] if start_layer else None
            logits = model.apply(params, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                 lora=trainable["lora"], depth=depth, start_layer=start_layer, hidden0=hidden0)
        w = batch["mask"].astype(logits.dtype)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        n = w.sum()
        mean = (ce * w).sum() / jnp.maximum(n, 1.0)
        correct = ((jnp.argmax(logits, -1) == batch["labels"]) * w).sum()
        return mean, StepMetrics(mean, correct, n)

    return loss


def evaluate_fn(model) -> Callable:
    """``evaluate(trainable, base, batches) -> (mean_loss, accuracy)`` (not jitted) over an
    :class:`~hfl_jax.data.EvalBatches` (``lax.map`` over batches; padding rows ignored;
    starts from the batches' cached hidden states when they carry them) or a
    :class:`~hfl_jax.data.packing.PackedEval` (the same sums over packed rows)."""
    from hfl_jax.data.packing import PackedEval

    def evaluate(trainable, base, batches):
        start = batches.hidden_layer
        fn = loss_fn(model, model.num_layers - start, start)
        packed = isinstance(batches, PackedEval)
        tokens = (("input_ids", "token_type_ids", "position_ids", "segment_ids", "slots") if packed
                  else ("input_ids", "attention_mask", "token_type_ids"))

        def one(batch):
            b = {k: batch[k] for k in (*tokens, "labels")}
            if start:
                b["hidden"] = batch["hidden"]
            _, m = fn(trainable, base, dict(b, mask=batch["valid"]))
            return m.loss * m.count, m.correct, m.count
        keys = (*tokens, "labels", "valid") + (("hidden",) if start else ())
        arrays = {k: getattr(batches, k) for k in keys}
        loss_sum, correct, count = jax.lax.map(one, arrays)
        n = jnp.maximum(count.sum(), 1.0)
        return loss_sum.sum() / n, correct.sum() / n

    return evaluate


# --- data -----------------------------------------------------------------------------------------

def load_text(cfg):
    """``(train, evaluation)`` :class:`~hfl_jax.data.TextDataset` of the rows a run uses, untokenized:
    the seeded training subset, and the task's evaluation split or, with ``data.evaluate:
    validation``, the validation set carved from the training split (:func:`hfl_jax.data.splits.training_rows`)."""
    from hfl_jax.data import load_task
    from hfl_jax.data.splits import eval_subset, training_rows

    d = cfg.data
    ds = load_task(d.task, "train", data_dir=d.data_dir, custom=d.custom)
    rows, valid_rows = training_rows(cfg, len(ds))
    train = ds if len(rows) == len(ds) else ds.take(rows)
    if d.evaluate == "validation":
        evals_ds = ds.take(valid_rows)
    else:
        evals_ds = load_task(d.task, "validation", data_dir=d.data_dir, custom=d.custom)
    rows = eval_subset(cfg, len(evals_ds))
    return train, (evals_ds if rows is None else evals_ds.take(rows))


def tokenize_text(cfg, *datasets) -> list[dict]:
    """Each dataset tokenized (and cached) with the run's tokenizer and ``data.max_length``."""
    from hfl_jax.data import tokenize_dataset

    d = cfg.data
    from hfl_jax.models.tiny import TINY_MODELS
    tokenizer = d.tokenizer or ("minilm-l6" if cfg.model.name in TINY_MODELS else cfg.model.name)
    return [tokenize_dataset(ds, tokenizer, d.max_length) for ds in datasets]


def prepare(cfg, start_model: Callable) -> Prepared:
    """Loads and tokenizes the run's text; ``start_model(num_labels=C)`` (a future of
    ``(model, params, lora)``) is called as soon as the classes are known, so the model's
    initialisation runs while the tokenizer works."""
    train_text, eval_text = load_text(cfg)
    future = start_model(num_labels=len(train_text.label_names))
    train, evaluation = tokenize_text(cfg, train_text, eval_text)
    return Prepared(train=train, evaluation=evaluation, classes=np.asarray(train["labels"]),
                    class_names=tuple(train_text.label_names), model=future.result())


def eval_data(cfg, prepared: Prepared, model, prepare_rows: Callable, pack_row_len: int):
    """The evaluation set as the compiled evaluation takes it: packed rows when training packs
    (``pack_row_len > 0``), else padded batches (trimmed and with cached layers by ``prepare_rows``)."""
    from hfl_jax.data import eval_batches

    valid, batch = prepared.evaluation, cfg.train.eval_batch_size
    if pack_row_len:
        from hfl_jax.data.packing import pack_eval, position_offset
        nb = -(-len(valid["labels"]) // batch)
        return pack_eval(valid, row_len=pack_row_len, num_batches=nb, position_offset=position_offset(model.cfg))
    return prepare_rows(eval_batches(valid, batch))


def extra_metrics(cfg, prepared: Prepared, model, trainable, base, metrics: dict) -> dict:
    """Nothing beyond the compiled evaluation's loss and accuracy."""
    return {}
