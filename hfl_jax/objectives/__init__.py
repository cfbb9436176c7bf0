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

from hfl_jax.objectives.base import StepMetrics, objective_of

__all__ = ["StepMetrics", "objective_of"]
