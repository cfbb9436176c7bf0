"""The objective interface and the registry (:func:`objective_of`)."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

Array = jax.Array


class StepMetrics(NamedTuple):
    """What one loss evaluation reports (every objective)."""
    loss: Array      # [] mean loss over the real (masked-in) units: examples, or response tokens
    correct: Array   # [] number of correct units (predicted classes, next tokens)
    count: Array     # [] number of real units


def is_decoder(model: Any) -> bool:
    """Whether ``model`` is a decoder LLM (trains on next tokens, has no classification head)."""
    return bool(getattr(model, "is_decoder", False))


def with_head(base: dict, trainable: dict) -> dict:
    """The model's parameters: the frozen ``base`` plus the trainable head when the model has one
    (decoders train LoRA only: their trainable tree has no ``"head"``)."""
    return {**base, "head": trainable["head"]} if "head" in trainable else dict(base)


@dataclasses.dataclass
class Prepared:
    """A run's data as its objective prepared it (host arrays), and the model built beside it.

    ``train``/``evaluation``: token arrays ``[N, T]`` (``input_ids``, ``attention_mask``,
    ``token_type_ids``) and ``labels`` (``[N]`` classes, or ``[N, T]`` next-token targets);
    ``classes`` ``[N]`` int: what partitions and grouping see (the labels, or an instruction
    dataset's categories); ``model``: ``(model, params, lora)``; ``extras``: what the objective's
    evaluation needs besides the arrays (label words, generation prompts, the tokenizer);
    ``info``: counts to report (e.g. truncated examples).
    """
    train: dict
    evaluation: dict
    classes: np.ndarray
    class_names: tuple
    model: tuple
    extras: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)
