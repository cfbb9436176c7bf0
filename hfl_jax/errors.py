"""Error types shared across layers (the bottom of the package: imports nothing from hfl_jax).

:class:`ConfigError` is the one configuration error of the project: an experiment config
(:mod:`hfl_jax.config`), an algorithm builder (:mod:`hfl_jax.algos`) and a model's
``config.json`` (:mod:`hfl_jax.models.config`) all raise it, and the CLI maps it to exit code 2
with a one-line message. It stays importable as ``hfl_jax.config.ConfigError``,
``hfl_jax.models.config.ConfigError`` and ``hfl_jax.models.ConfigError`` (the same class).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """An unusable configuration (experiment or model); the message names the key or field."""


__all__ = ["ConfigError"]
