"""Objectives: what a run trains for, and how it is scored.

An objective owns its loss (``loss_fn(model, depth, start_layer)``), its metrics, its
evaluation set and evaluation, and its data preparation. The federated engine, every
algorithm, grouping, checkpoints and the sweep see only "a trainable pytree, a loss, a
main metric" (``eval_accuracy``), so adding an objective touches no algorithm file.

=====================  ===========================================  =================================
objective              models                                       main metric (``eval_accuracy``)
=====================  ===========================================  =================================
``classification``     encoders with a classification head          accuracy of the head
``causal_lm``          decoder LLMs (Llama, Qwen2, Mistral)          label-word accuracy (a
                                                                    classification dataset as
                                                                    generation), exact match of
                                                                    greedy generations (instruction
                                                                    data with ``evaluation.
                                                                    generate``), else next-token
                                                                    accuracy on response tokens
=====================  ===========================================  =================================

Which one a run uses follows from its model: :func:`objective_of`.
"""
from __future__ import annotations

from hfl_jax.objectives import causal_lm, classification
from hfl_jax.objectives.base import Prepared, StepMetrics, is_decoder

OBJECTIVES = {classification.NAME: classification, causal_lm.NAME: causal_lm}


def objective_of(model):
    """The objective of a built model: causal LM for decoder LLMs, classification for encoders."""
    return causal_lm if is_decoder(model) else classification


def model_kind(name: str) -> str:
    """``"decoder"`` or ``"encoder"`` for a ``model.name``: ``tiny`` (random BERT), ``tiny-decoder``
    (random Llama), a packaged alias, or a checkpoint directory / hub id whose ``config.json`` says."""
    import json

    from hfl_jax.models.families import is_decoder_type
    from hfl_jax.models.hub import resolve_model_dir
    from hfl_jax.models.tiny import TINY_MODELS
    if name in TINY_MODELS:
        return "decoder" if is_decoder_type(TINY_MODELS[name][1]) else "encoder"
    model_type = json.loads((resolve_model_dir(name) / "config.json").read_text()).get("model_type")
    return "decoder" if is_decoder_type(model_type) else "encoder"


def objective_for(model_name: str):
    """The objective of a run whose ``model.name`` is ``model_name``, before the model is built."""
    return causal_lm if model_kind(model_name) == "decoder" else classification


__all__ = ["OBJECTIVES", "Prepared", "StepMetrics", "model_kind", "objective_for", "objective_of"]
